"""Finding and removing identifying information in DICOM headers (PS3.15 Annex E).

:func:`phi_findings` reports which identifying attributes a file carries, by keyword only, so the
result may leave the site. :func:`deidentify` builds a copy by an ALLOW list: only the attributes in
:data:`KEPT_ATTRIBUTES` (pixel module, image geometry, modality, view, photometric interpretation,
bits, rescale and window, SOP class) survive; PatientName and PatientID become a dummy and a salted
pseudonym, the instance UIDs salted deterministic ones, a few type-2 attributes stay present but
empty; every other attribute, every sequence not in :data:`KEPT_SEQUENCES` (whose items are
filtered by their own allow list) and every private tag is dropped. An attribute this module has
never heard of is therefore removed, not kept: free text in a vendor's comment, a reviewer's name
or a scheduled step's description cannot slip through a list of known identifiers.

Burned-in text in the pixels is not touched: :func:`burned_in_risk` names the files whose pixels
may show identifying text (BurnedInAnnotation YES, secondary captures), and
:func:`deidentify_file` refuses them unless the caller allows it explicitly.

The salt is the site's secret. Without it nobody can recompute a pseudonym from a patient id, and
with a different salt the same patient gets an unrelated pseudonym, so sites cannot be linked.

One module (~560 lines): the de-identification allow list and the code applying it must change
together; most lines are the PS3.15 tables.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
from os import PathLike
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from hospital_fl.data.ingest.screening import read_dicom
from hospital_fl.errors import InputError

__all__ = [
    "BurnedInWithheld",
    "KEPT_ATTRIBUTES",
    "KEPT_SEQUENCES",
    "burned_in_risk",
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

DEIDENTIFICATION_METHOD = "PS3.15 E.1 Basic Profile by allow list (hospital_fl 2)"  # LO: <= 64 chars
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

_MIN_SALT_BYTES = 16
_ANONYMOUS = "ANONYMOUS"

_REMOVE, _EMPTY, _DUMMY = "X", "Z", "D"

# Annex E actions for the identifying attributes a radiograph can carry: what phi_findings reports
# (by keyword) and what a de-identified copy must not carry. Where the profile allows
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

# What a de-identified copy keeps, as in the source. Everything here describes how the image was
# encoded, acquired and should be displayed; none of it is free text, a date, a name or an id.
# (In the spirit of PS3.15 Table E.1-1's retain options: the pixel and geometry modules stay, the
# device identity, dates, descriptions and all patient/visit/request data go.)
KEPT_ATTRIBUTES: frozenset[str] = frozenset(
    {
        # SOP common, general series/image (codes and numbers only)
        "SpecificCharacterSet",
        "SOPClassUID",
        "Modality",
        "BodyPartExamined",
        "ViewPosition",
        "Laterality",
        "ImageLaterality",
        "PatientOrientation",
        "ImageType",
        "SeriesNumber",
        "InstanceNumber",
        "AcquisitionNumber",
        "BurnedInAnnotation",
        "RecognizableVisualFeatures",
        # image pixel module
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PlanarConfiguration",
        "PixelAspectRatio",
        "SmallestImagePixelValue",
        "LargestImagePixelValue",
        "NumberOfFrames",
        "PixelData",
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
        # geometry
        "PixelSpacing",
        "ImagerPixelSpacing",
        "PixelSpacingCalibrationType",
        "EstimatedRadiographicMagnificationFactor",
        "DistanceSourceToDetector",
        "DistanceSourceToPatient",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "SliceThickness",
        "SpacingBetweenSlices",
        # rescale, window and presentation
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "PresentationLUTShape",
        "PresentationIntentType",
        "PixelIntensityRelationship",
        "PixelIntensityRelationshipSign",
        # exposure (acquisition physics, no device identity)
        "KVP",
        "ExposureTime",
        "XRayTubeCurrent",
        "Exposure",
        "ExposureInuAs",
    }
)

# Sequences a copy keeps, each item filtered by its own allow list (items of any other sequence,
# at any depth, are dropped with it).
KEPT_SEQUENCES: dict[str, frozenset[str]] = {
    "VOILUTSequence": frozenset({"LUTDescriptor", "LUTData"}),
    "ModalityLUTSequence": frozenset({"LUTDescriptor", "LUTData", "ModalityLUTType"}),
    "ReferencedImageSequence": frozenset({"ReferencedSOPClassUID", "ReferencedSOPInstanceUID", "ReferencedFrameNumber"}),
}

# Type 2 in the CR and DX IODs: present but empty, so the copy stays a valid instance.
_BLANKED = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
            "StudyID", "ContentDate", "ContentTime")  # fmt: skip
# Instance UIDs: replaced by salted deterministic ones, so references between copies still hold.
_REPLACED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
_META_KEPT = ("MediaStorageSOPClassUID", "TransferSyntaxUID")  # the rest pydicom writes afresh on save

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame .1-.4 variants
_DICOM_ROOT = "1.2.840.10008."  # well-known UIDs (classes, syntaxes): kept, they name no patient

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


def burned_in_risk(ds: Dataset) -> str | None:
    """Why the pixels of ``ds`` may show identifying text, or None.

    BurnedInAnnotation YES says so outright. A secondary capture (ImageType SECONDARY, or a
    Secondary Capture SOP class) is a picture of a screen or a document, where names and dates are
    commonly drawn into the pixels. ImageType DERIVED alone is not a reason: processed radiographs
    are routinely DERIVED\\PRIMARY. A missing BurnedInAnnotation is not one either (most CR/DX
    exports omit it), which is why copies are meant for reviewed sharing, not publication.
    """
    if _upper(ds.get("BurnedInAnnotation")) == "YES":
        return "BurnedInAnnotation is YES"
    image_type = ds.get("ImageType")
    values = [_upper(v) for v in image_type] if isinstance(image_type, (MultiValue, list, tuple)) else [_upper(image_type)]
    if "SECONDARY" in values:
        return "ImageType says SECONDARY (a screen or document capture)"
    if str(ds.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE):
        return "the SOP class is Secondary Capture (a screen or document capture)"
    return None


class BurnedInWithheld(InputError):
    """A de-identified copy was refused: the pixels may show identifying text."""


def deidentify(ds: Dataset, salt: bytes) -> Dataset:
    """A copy of ``ds`` that keeps only what is known to be safe (see the module docstring).

    The copy holds :data:`KEPT_ATTRIBUTES` as in ``ds``; :data:`KEPT_SEQUENCES` with each item
    reduced to its own allow list; PatientName "ANONYMOUS" and PatientID its :func:`pseudonym`;
    the type-2 attributes :data:`_BLANKED` empty; Study, Series, SOP Instance and Frame of
    Reference UIDs (and referenced SOP instances) as ``2.25.<128 bits of HMAC-SHA256(salt, uid)>``,
    so the same input and salt always give the same UIDs and references between files stay
    intact. Nothing else: no other attribute, sequence, private tag, curve or overlay. The file
    meta keeps only the SOP class and transfer syntax (the rest is written afresh on save).
    PatientIdentityRemoved is YES, DeidentificationMethod names the method and
    DeidentificationMethodCodeSequence holds code 113100 (DCM).

    Pixel data is untouched: text burned into the image stays (see :func:`burned_in_risk`).

    Args:
        ds: the dataset to de-identify; not modified.
        salt: the site's secret, at least 16 bytes.

    Returns:
        The de-identified copy.

    Raises:
        InputError: ``salt`` is not bytes of length >= 16.
    """
    _check_salt(salt)
    clean = FileDataset("", Dataset(), preamble=b"\0" * 128)
    for elem in ds:
        keyword = elem.keyword
        if elem.tag.is_private or not keyword:
            continue
        if keyword in KEPT_ATTRIBUTES and elem.VR != "SQ":
            clean.add(copy.deepcopy(elem))
        elif keyword in KEPT_SEQUENCES and elem.VR == "SQ":
            items = Sequence([_kept_item(item, KEPT_SEQUENCES[keyword], salt) for item in elem.value])
            clean.add(DataElement(elem.tag, "SQ", items))
        elif keyword in _BLANKED:
            clean.add(DataElement(elem.tag, elem.VR, ""))
        elif keyword in _REPLACED_UIDS and _has_value(elem.value):
            clean.add(DataElement(elem.tag, "UI", _replacement(str(elem.value), salt)))
    if "PatientName" in ds:
        clean.PatientName = _ANONYMOUS
    if "PatientID" in ds:
        # An empty id stays empty: one shared pseudonym would merge unrelated patients.
        clean.PatientID = pseudonym(str(ds.PatientID), salt) if _has_value(ds.PatientID) else ""
    clean.PatientIdentityRemoved = "YES"
    clean.DeidentificationMethod = DEIDENTIFICATION_METHOD
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = PROFILE_CODE
    clean.DeidentificationMethodCodeSequence = Sequence([item])
    meta = FileMetaDataset()
    source_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    for keyword in _META_KEPT:
        if keyword in source_meta:
            meta.add(copy.deepcopy(source_meta[keyword]))
    if "SOPInstanceUID" in clean:
        meta.MediaStorageSOPInstanceUID = clean.SOPInstanceUID
    clean.file_meta = meta
    return clean


def _kept_item(item: Dataset, allowed: frozenset[str], salt: bytes) -> Dataset:
    out = Dataset()
    for elem in item:
        if elem.tag.is_private or elem.keyword not in allowed or elem.VR == "SQ":
            continue
        if elem.keyword == "ReferencedSOPInstanceUID":
            out.add(DataElement(elem.tag, "UI", _replacement(str(elem.value), salt)))
        else:
            out.add(copy.deepcopy(elem))
    return out


def deidentify_file(
    src: str | PathLike[str], dst: str | PathLike[str], salt: bytes, allow_burned_in: bool = False
) -> None:
    """Write a de-identified copy of the DICOM file ``src`` to ``dst`` (see :func:`deidentify`).

    ``dst`` appears complete or not at all (written aside, then renamed); an existing ``dst`` is
    replaced, ``src`` never.

    Args:
        src: the original file.
        dst: where the copy goes; its folder must exist.
        salt: the site's secret, at least 16 bytes.
        allow_burned_in: also copy an image whose pixels may show identifying text
            (:func:`burned_in_risk`); only after a person has reviewed such images.

    Raises:
        BurnedInWithheld: the pixels may show identifying text and ``allow_burned_in`` is False.
        InputError: ``dst`` is ``src``, or a bad salt.
        DicomRejected: ``src`` is not a DICOM file (``not_dicom``).
    """
    src_path, dst_path = Path(src), Path(dst)
    if src_path.resolve() == dst_path.resolve() or (dst_path.exists() and os.path.samefile(src_path, dst_path)):
        raise InputError(
            "dst", str(dst), "the de-identified copy must not replace the original", "write it to another folder"
        )
    _check_salt(salt)
    ds = read_dicom(src_path)
    risk = burned_in_risk(ds)
    if risk and not allow_burned_in:
        raise BurnedInWithheld(
            "burned-in annotation",
            risk,
            "the pixels may show a name or other identifying text, which de-identifying the header cannot remove",
            "review the images, then allow their copies explicitly (hospital-fl ingest --copy-burned-in)",
        )
    clean = deidentify(ds, salt)
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


def _replacement(uid: str, salt: bytes) -> str:
    uid = uid.strip("\0 ")
    return uid if uid.startswith(_DICOM_ROOT) or not uid else _new_uid(uid, salt)
