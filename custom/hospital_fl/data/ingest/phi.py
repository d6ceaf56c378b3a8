"""Finding and removing identifying information in DICOM headers (PS3.15 Annex E, basic profile).

:func:`phi_findings` reports which identifying attributes a file carries, by keyword only, so the
result may leave the site. :func:`deidentify` applies the Basic Application Confidentiality
Profile to a copy: identifying attributes removed or blanked, private attributes, curves and
overlays removed, instance UIDs replaced by salted deterministic ones, the patient id replaced by
a salted pseudonym. Burned-in text in the pixels is not touched: callers must flag or refuse
files whose BurnedInAnnotation is YES.

The salt is the site's secret. Without it nobody can recompute a pseudonym from a patient id, and
with a different salt the same patient gets an unrelated pseudonym, so sites cannot be linked.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
from os import PathLike
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from hospital_fl.data.ingest.screening import read_dicom
from hospital_fl.errors import InputError

__all__ = [
    "image_pseudonym",
    "patient_pseudonym",
    "DEIDENTIFICATION_METHOD",
    "PHI_KEYWORDS",
    "PROFILE_CODE",
    "PSEUDONYM_HEX_CHARS",
    "deidentify",
    "deidentify_file",
    "phi_findings",
    "pseudonym",
]

# 96 bits: among a billion ids the chance that any two share a pseudonym is about 6e-12
# (birthday bound n^2 / 2^97), while the value still fits a 64-character LO or UI field.
PSEUDONYM_HEX_CHARS = 24

DEIDENTIFICATION_METHOD = "DICOM PS3.15 E.1 Basic Application Confidentiality Profile"
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

_MIN_SALT_BYTES = 16
_ANONYMOUS = "ANONYMOUS"

_REMOVE, _EMPTY, _DUMMY = "X", "Z", "D"

# Annex E actions for the identifying attributes a radiograph can carry. Where the profile allows
# several (X/Z/D: "depends on the IOD"), attributes that are type 2 in the CR and DX IODs are
# blanked (Z) so the copy stays valid, the rest removed (X). PatientName and PatientID get dummy
# values (D): the pseudonym keeps one patient's images together for patient-level splits.
_ACTIONS: dict[str, str] = {
    # patient
    "PatientName": _DUMMY,
    "PatientID": _DUMMY,
    "PatientBirthDate": _EMPTY,
    "PatientSex": _EMPTY,
    "IssuerOfPatientID": _REMOVE,
    "IssuerOfPatientIDQualifiersSequence": _REMOVE,
    "PatientBirthTime": _REMOVE,
    "PatientBirthName": _REMOVE,
    "PatientBirthDateInAlternativeCalendar": _REMOVE,
    "PatientDeathDateInAlternativeCalendar": _REMOVE,
    "PatientAlternativeCalendar": _REMOVE,
    "OtherPatientIDs": _REMOVE,
    "OtherPatientIDsSequence": _REMOVE,
    "OtherPatientNames": _REMOVE,
    "PatientMotherBirthName": _REMOVE,
    "PatientAge": _REMOVE,
    "PatientSize": _REMOVE,
    "PatientWeight": _REMOVE,
    "PatientAddress": _REMOVE,
    "PatientTelephoneNumbers": _REMOVE,
    "PatientTelecomInformation": _REMOVE,
    "MilitaryRank": _REMOVE,
    "BranchOfService": _REMOVE,
    "MedicalRecordLocator": _REMOVE,
    "MedicalAlerts": _REMOVE,
    "Allergies": _REMOVE,
    "CountryOfResidence": _REMOVE,
    "RegionOfResidence": _REMOVE,
    "EthnicGroup": _REMOVE,
    "Occupation": _REMOVE,
    "SmokingStatus": _REMOVE,
    "AdditionalPatientHistory": _REMOVE,
    "PregnancyStatus": _REMOVE,
    "LastMenstrualDate": _REMOVE,
    "PatientReligiousPreference": _REMOVE,
    "PatientSexNeutered": _REMOVE,
    "PatientComments": _REMOVE,
    "PatientState": _REMOVE,
    "PatientInsurancePlanCodeSequence": _REMOVE,
    "PatientPrimaryLanguageCodeSequence": _REMOVE,
    "ResponsiblePerson": _REMOVE,
    "ResponsibleOrganization": _REMOVE,
    "ReferencedPatientSequence": _REMOVE,
    "ReferencedPatientAliasSequence": _REMOVE,
    "ReferencedPatientPhotoSequence": _REMOVE,
    # visit and request
    "AdmissionID": _REMOVE,
    "IssuerOfAdmissionIDSequence": _REMOVE,
    "CurrentPatientLocation": _REMOVE,
    "PatientInstitutionResidence": _REMOVE,
    "VisitComments": _REMOVE,
    "ServiceEpisodeID": _REMOVE,
    "ServiceEpisodeDescription": _REMOVE,
    "AdmittingDiagnosesDescription": _REMOVE,
    "AdmittingDiagnosesCodeSequence": _REMOVE,
    "RequestAttributesSequence": _REMOVE,
    "RequestedProcedureID": _REMOVE,
    "RequestedProcedureDescription": _REMOVE,
    "RequestedProcedureComments": _REMOVE,
    "ReasonForTheRequestedProcedure": _REMOVE,
    "ReasonForStudy": _REMOVE,
    "RequestingPhysician": _REMOVE,
    "RequestingService": _REMOVE,
    "ImagingServiceRequestComments": _REMOVE,
    "PlacerOrderNumberImagingServiceRequest": _REMOVE,
    "FillerOrderNumberImagingServiceRequest": _REMOVE,
    "OrderEnteredBy": _REMOVE,
    "OrderEntererLocation": _REMOVE,
    "OrderCallbackPhoneNumber": _REMOVE,
    "StudyComments": _REMOVE,
    "ScheduledPerformingPhysicianName": _REMOVE,
    "ScheduledStationName": _REMOVE,
    "ScheduledStationAETitle": _REMOVE,
    "ScheduledProcedureStepLocation": _REMOVE,
    "PerformedProcedureStepID": _REMOVE,
    "PerformedProcedureStepStartDate": _REMOVE,
    "PerformedProcedureStepStartTime": _REMOVE,
    "PerformedProcedureStepEndDate": _REMOVE,
    "PerformedProcedureStepEndTime": _REMOVE,
    "PerformedProcedureStepDescription": _REMOVE,
    "PerformedStationName": _REMOVE,
    "PerformedStationAETitle": _REMOVE,
    "PerformedLocation": _REMOVE,
    "ReferencedStudySequence": _REMOVE,
    "ReferencedPerformedProcedureStepSequence": _REMOVE,
    # study, series, instance
    "AccessionNumber": _EMPTY,
    "StudyID": _EMPTY,
    "StudyDate": _EMPTY,
    "StudyTime": _EMPTY,
    "ContentDate": _EMPTY,
    "ContentTime": _EMPTY,
    "SeriesDate": _REMOVE,
    "SeriesTime": _REMOVE,
    "AcquisitionDate": _REMOVE,
    "AcquisitionTime": _REMOVE,
    "AcquisitionDateTime": _REMOVE,
    "InstanceCreationDate": _REMOVE,
    "InstanceCreationTime": _REMOVE,
    "InstanceCoercionDateTime": _REMOVE,
    "OverlayDate": _REMOVE,
    "OverlayTime": _REMOVE,
    "CurveDate": _REMOVE,
    "CurveTime": _REMOVE,
    "TimezoneOffsetFromUTC": _REMOVE,
    "StudyDescription": _REMOVE,
    "SeriesDescription": _REMOVE,
    "ProtocolName": _REMOVE,
    "ImageComments": _REMOVE,
    "FrameComments": _REMOVE,
    "DerivationDescription": _REMOVE,
    "SourceImageSequence": _REMOVE,
    "IconImageSequence": _REMOVE,
    "ContentSequence": _REMOVE,
    "OriginalAttributesSequence": _REMOVE,
    "ModifiedAttributesSequence": _REMOVE,
    "DigitalSignaturesSequence": _REMOVE,
    # people
    "ReferringPhysicianName": _EMPTY,
    "ReferringPhysicianAddress": _REMOVE,
    "ReferringPhysicianTelephoneNumbers": _REMOVE,
    "ReferringPhysicianIdentificationSequence": _REMOVE,
    "ConsultingPhysicianName": _REMOVE,
    "ConsultingPhysicianIdentificationSequence": _REMOVE,
    "PhysiciansOfRecord": _REMOVE,
    "PhysiciansOfRecordIdentificationSequence": _REMOVE,
    "PerformingPhysicianName": _REMOVE,
    "PerformingPhysicianIdentificationSequence": _REMOVE,
    "NameOfPhysiciansReadingStudy": _REMOVE,
    "PhysiciansReadingStudyIdentificationSequence": _REMOVE,
    "OperatorsName": _REMOVE,
    "OperatorIdentificationSequence": _REMOVE,
    "ContentCreatorName": _EMPTY,
    "ContentCreatorIdentificationCodeSequence": _REMOVE,
    "PersonName": _REMOVE,
    "VerifyingObserverName": _REMOVE,
    "VerifyingOrganization": _REMOVE,
    "AuthorObserverSequence": _REMOVE,
    "ParticipantSequence": _REMOVE,
    "CustodialOrganizationSequence": _REMOVE,
    # institution and equipment
    "InstitutionName": _REMOVE,
    "InstitutionAddress": _REMOVE,
    "InstitutionCodeSequence": _REMOVE,
    "InstitutionalDepartmentName": _REMOVE,
    "InstitutionalDepartmentTypeCodeSequence": _REMOVE,
    "StationName": _REMOVE,
    "DeviceSerialNumber": _REMOVE,
    "DetectorID": _REMOVE,
    "PlateID": _REMOVE,
    "CassetteID": _REMOVE,
    "GantryID": _REMOVE,
    "AcquisitionDeviceProcessingDescription": _REMOVE,
    "AcquisitionComments": _REMOVE,
    "DateOfLastCalibration": _REMOVE,
    "TimeOfLastCalibration": _REMOVE,
    "ContributingEquipmentSequence": _REMOVE,
}

PHI_KEYWORDS: tuple[str, ...] = tuple(sorted(_ACTIONS))

# UIDs that name a kind of object or an encoding, not this patient's objects: kept. Any UID under
# the DICOM root 1.2.840.10008 is a well-known one and is kept too; every other UID is replaced.
_KEPT_UIDS = frozenset(
    {
        "SOPClassUID",
        "MediaStorageSOPClassUID",
        "ReferencedSOPClassUID",
        "ReferencedSOPClassUIDInFile",
        "RelatedGeneralSOPClassUID",
        "OriginalSpecializedSOPClassUID",
        "TransferSyntaxUID",
        "ReferencedTransferSyntaxUIDInFile",
        "ImplementationClassUID",
        "CodingSchemeUID",
        "ContextGroupExtensionCreatorUID",
    }
)
_DICOM_ROOT = "1.2.840.10008."

# Not identifying by definition, but it may hold leftover bytes from the writer's buffers.
_TRAILING_PADDING = 0xFFFCFFFC

# File meta attributes naming the sending systems (AE titles can name a station or a hospital).
_META_REMOVE = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "SourcePresentationAddress",
    "SendingPresentationAddress",
    "ReceivingPresentationAddress",
    "PrivateInformationCreatorUID",
    "PrivateInformation",
)


def pseudonym(value: str, salt: bytes) -> str:
    """A salted, deterministic stand-in for an identifier (patient id, SOP Instance UID).

    HMAC-SHA256 keyed by ``salt``, as :data:`PSEUDONYM_HEX_CHARS` lowercase hex characters.

    Args:
        value: the identifier.
        salt: the site's secret, at least 16 bytes.

    Returns:
        The same string for the same value and salt; unrelated strings across salts.

    Raises:
        InputError: ``salt`` is not bytes of length >= 16.
    """
    _check_salt(salt)
    return _hmac(salt, value)[:PSEUDONYM_HEX_CHARS]


def patient_pseudonym(patient_id: str, salt: bytes) -> str:
    """A manifest's patient pseudonym: domain-separated from image ids and from the PatientID a
    de-identified copy carries, so shared copies cannot be joined to the site's manifest."""
    return pseudonym(f"patient|{patient_id}", salt)


def image_pseudonym(sop_instance_uid: str, salt: bytes) -> str:
    """A manifest's image id (domain-separated like ``patient_pseudonym``)."""
    return pseudonym(f"image|{sop_instance_uid}", salt)


def phi_findings(ds: Dataset) -> dict:
    """Which identifying attributes ``ds`` carries, without any of their values.

    Args:
        ds: a dataset, searched through all nested sequences.

    Returns:
        ``identifying_tags``: sorted keywords from :data:`PHI_KEYWORDS` present with a non-empty
        value; ``burned_in_annotation``: True for BurnedInAnnotation YES, False for NO, None when
        absent or another value; ``private_tags``: number of private elements (creators
        included); ``patient_identity_removed``: True when PatientIdentityRemoved is YES, in
        which case PatientName and PatientID hold dummy values. Safe to send off site.
    """
    found: set[str] = set()
    private = 0
    for elem in ds.iterall():
        if elem.tag.is_private:
            private += 1
        elif elem.keyword in _ACTIONS and _has_value(elem.value):
            found.add(elem.keyword)
    burned_in = _upper(ds.get("BurnedInAnnotation"))
    return {
        "identifying_tags": sorted(found),
        "burned_in_annotation": {"YES": True, "NO": False}.get(burned_in),
        "private_tags": private,
        "patient_identity_removed": _upper(ds.get("PatientIdentityRemoved")) == "YES",
    }


def deidentify(ds: Dataset, salt: bytes) -> Dataset:
    """A copy of ``ds`` under the Basic Application Confidentiality Profile (PS3.15 E.1).

    On the copy, everywhere including nested sequences: the :data:`PHI_KEYWORDS` attributes are
    removed or blanked, PatientName becomes "ANONYMOUS" and PatientID its :func:`pseudonym`;
    private attributes, curves (50xx) and overlays (60xx) are removed; every instance UID
    (Study, Series, SOP Instance, Frame of Reference, references, and the file meta's
    MediaStorageSOPInstanceUID) becomes ``2.25.<128 bits of HMAC-SHA256(salt, uid)>``, so the
    same input and salt always give the same UIDs and references between files stay intact.
    PatientIdentityRemoved is set to YES, DeidentificationMethod names the profile and
    DeidentificationMethodCodeSequence gains code 113100 (DCM).

    Pixel data is untouched: text burned into the image (BurnedInAnnotation YES) stays, so such
    files must be flagged or refused by the caller.

    Args:
        ds: the dataset to de-identify; not modified.
        salt: the site's secret, at least 16 bytes.

    Returns:
        The de-identified copy.

    Raises:
        InputError: ``salt`` is not bytes of length >= 16.
    """
    _check_salt(salt)
    clean = copy.deepcopy(ds)
    _scrub(clean, salt)
    meta = getattr(clean, "file_meta", None)
    if meta is not None:
        for keyword in _META_REMOVE:
            if keyword in meta:
                del meta[keyword]
        _replace_uids(meta, salt)
        if "SOPInstanceUID" in clean:
            meta.MediaStorageSOPInstanceUID = clean.SOPInstanceUID
    clean.PatientIdentityRemoved = "YES"
    # Earlier de-identification steps stay on record (the attribute is multi-valued).
    earlier = clean.get("DeidentificationMethod")
    methods = [str(m) for m in earlier] if isinstance(earlier, MultiValue) else [str(earlier)] if earlier else []
    if DEIDENTIFICATION_METHOD not in methods:
        methods.append(DEIDENTIFICATION_METHOD)
    clean.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
    codes = clean.get("DeidentificationMethodCodeSequence") or Sequence()
    if not any(item.get("CodeValue") == PROFILE_CODE[0] for item in codes):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = PROFILE_CODE
        codes.append(item)
    clean.DeidentificationMethodCodeSequence = codes
    return clean


def deidentify_file(src: str | PathLike[str], dst: str | PathLike[str], salt: bytes) -> None:
    """Write a de-identified copy of the DICOM file ``src`` to ``dst`` (see :func:`deidentify`).

    ``dst`` appears complete or not at all (written aside, then renamed); an existing ``dst`` is
    replaced, ``src`` never.

    Args:
        src: the original file.
        dst: where the copy goes; its folder must exist.
        salt: the site's secret, at least 16 bytes.

    Raises:
        InputError: ``dst`` is ``src``, or a bad salt.
        DicomRejected: ``src`` is not a DICOM file (``not_dicom``).
    """
    src_path, dst_path = Path(src), Path(dst)
    if src_path.resolve() == dst_path.resolve() or (dst_path.exists() and os.path.samefile(src_path, dst_path)):
        raise InputError(
            "dst", str(dst), "the de-identified copy must not replace the original", "write it to another folder"
        )
    _check_salt(salt)
    clean = deidentify(read_dicom(src_path), salt)
    partial = dst_path.with_name(f".{dst_path.name}.partial")
    try:
        clean.save_as(partial, enforce_file_format=True)
        os.replace(partial, dst_path)
    finally:
        partial.unlink(missing_ok=True)


def _check_salt(salt: bytes) -> None:
    if not isinstance(salt, (bytes, bytearray)) or len(salt) < _MIN_SALT_BYTES:
        # Never echo the salt itself: it is the secret that protects every pseudonym.
        seen = f"{len(salt)} bytes" if isinstance(salt, (bytes, bytearray)) else type(salt).__name__
        raise InputError(
            "salt",
            seen,
            f"it must be at least {_MIN_SALT_BYTES} secret bytes, or patient ids could be recovered by "
            "hashing every possible id",
            "use the site secret from ingest, or secrets.token_bytes(32) kept at the site",
        )


def _hmac(salt: bytes, value: str) -> str:
    return hmac.new(bytes(salt), value.encode("utf-8"), hashlib.sha256).hexdigest()


def _new_uid(uid: str, salt: bytes) -> str:
    # 2.25 is the root for UIDs made from a 128-bit number (ISO/IEC 9834-8): at most 44 chars.
    return f"2.25.{int(_hmac(salt, uid)[:32], 16)}"


def _upper(value: object) -> str:
    return "" if value is None else str(value).strip().upper()


def _has_value(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, Sequence):
        return len(value) > 0
    if isinstance(value, (MultiValue, list, tuple)):
        return any(_has_value(v) for v in value)
    if isinstance(value, (bytes, bytearray)):
        return len(value.strip(b"\0 ")) > 0
    return str(value).strip() != ""


def _is_curve_or_overlay(group: int) -> bool:
    return group % 2 == 0 and (0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF)


def _scrub(ds: Dataset, salt: bytes) -> None:
    """Apply the profile to ``ds`` in place, recursing into sequences."""
    for elem in list(ds):
        tag = elem.tag
        action = _ACTIONS.get(elem.keyword)
        if tag.is_private or _is_curve_or_overlay(tag.group) or action == _REMOVE or tag == _TRAILING_PADDING:
            del ds[tag]
        elif action == _EMPTY:
            elem.value = ""
        elif action == _DUMMY:
            if elem.keyword == "PatientName":
                elem.value = _ANONYMOUS
            else:
                # An empty id stays empty: one shared pseudonym would merge unrelated patients.
                elem.value = pseudonym(str(elem.value), salt) if _has_value(elem.value) else ""
        elif elem.VR == "SQ":
            for item in elem.value:
                _scrub(item, salt)
    _replace_uids(ds, salt)


def _replace_uids(ds: Dataset, salt: bytes) -> None:
    """Replace the instance UIDs at this level of ``ds`` (not inside sequences)."""
    for elem in ds:
        if elem.VR != "UI" or elem.keyword in _KEPT_UIDS or not _has_value(elem.value):
            continue
        if isinstance(elem.value, MultiValue):
            elem.value = [_replacement(str(v), salt) for v in elem.value]
        else:
            elem.value = _replacement(str(elem.value), salt)


def _replacement(uid: str, salt: bytes) -> str:
    uid = uid.strip("\0 ")
    return uid if uid.startswith(_DICOM_ROOT) or not uid else _new_uid(uid, salt)
