import hashlib
import json

import numpy as np
import pydicom
import pytest
from dicom_factory import cr_skeleton
from hospital_fl.data.ingest.phi import (
    DEIDENTIFICATION_METHOD,
    PHI_KEYWORDS,
    PSEUDONYM_HEX_CHARS,
    deidentify,
    deidentify_file,
    phi_findings,
    pseudonym,
)
from hospital_fl.errors import InputError
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian

SALT = b"site-secret-0123456789abcdef"
OTHER_SALT = b"another-site-secret-987654321"
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "MRN-0042"


def _identified(**tags) -> FileDataset:
    """A small CR image carrying identifying attributes, private tags, an overlay and references."""
    ds = cr_skeleton("1.2.826.0.1.3680043.2.1125.1.11")
    ds.file_meta.SourceApplicationEntityTitle = "GENHOSP_CR1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.1.12"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.1.13"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.1125.1.14"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAddress = "1 Main Street"
    ds.InstitutionName = "General Hospital"
    ds.OperatorsName = "SMITH^BOB"
    ds.AccessionNumber = "ACC123"
    ds.StudyDate = "20260101"
    ds.SeriesDate = "20260101"
    ds.ReferringPhysicianName = ""  # present but empty: not a finding
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.BurnedInAnnotation = "NO"
    request = Dataset()
    request.RequestedProcedureID = "RP-9"
    ds.RequestAttributesSequence = [request]
    reference = Dataset()
    reference.ReferencedSOPClassUID = ComputedRadiographyImageStorage
    reference.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.1.99"
    ds.ReferencedImageSequence = [reference]
    block = ds.private_block(0x0009, "VENDOR PRIVATE", create=True)
    block.add_new(0x01, "LO", "DOE JANE")
    block.add_new(0x02, "LO", "bed 4")
    ds.add_new(0x60000010, "US", 4)  # overlay rows
    ds.add_new(0x60003000, "OW", bytes(8))  # overlay data
    ds.Rows, ds.Columns = 16, 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(256, dtype=np.uint16).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def test_findings_list_identifying_keywords_without_their_values():
    ds = _identified()

    findings = phi_findings(ds)

    assert findings == {
        "identifying_tags": [
            "AccessionNumber",
            "InstitutionName",
            "OperatorsName",
            "PatientAddress",
            "PatientBirthDate",
            "PatientID",
            "PatientName",
            "PatientSex",
            "RequestAttributesSequence",
            "RequestedProcedureID",
            "SeriesDate",
            "StudyDate",
        ],
        "burned_in_annotation": False,
        "private_tags": 3,  # the creator and its two elements
        "patient_identity_removed": False,
    }
    text = json.dumps(findings) + repr(findings)
    for value in (PATIENT_NAME, "DOE", PATIENT_ID, "19700101", "General Hospital", "RP-9"):
        assert value not in text


@pytest.mark.parametrize("value, expected", [("YES", True), ("NO", False), (None, None)])
def test_burned_in_annotation_is_reported_as_yes_no_or_unknown(value, expected):
    ds = _identified()
    if value is None:
        del ds.BurnedInAnnotation
    else:
        ds.BurnedInAnnotation = value

    assert phi_findings(ds)["burned_in_annotation"] is expected


def test_deidentify_removes_identifying_private_and_overlay_data_and_keeps_pixels():
    ds = _identified()

    clean = deidentify(ds, SALT)

    findings = phi_findings(clean)
    assert findings["identifying_tags"] == ["PatientID", "PatientName"]  # now dummy values
    assert findings["private_tags"] == 0
    assert findings["patient_identity_removed"] is True
    assert clean.PatientName == "ANONYMOUS"
    assert clean.PatientID == pseudonym(PATIENT_ID, SALT)
    assert clean.PatientBirthDate == "" and clean.StudyDate == "" and clean.AccessionNumber == ""
    assert "InstitutionName" not in clean and "SeriesDate" not in clean and "RequestAttributesSequence" not in clean
    assert not [e for e in clean if e.tag.group == 0x6000]
    assert "SourceApplicationEntityTitle" not in clean.file_meta
    assert clean.PixelData == ds.PixelData
    assert clean.Modality == "CR" and clean.BodyPartExamined == "CHEST"


def test_deidentify_leaves_the_original_untouched():
    ds = _identified()
    before = ds.to_json()

    deidentify(ds, SALT)

    assert ds.to_json() == before
    assert ds.PatientName == PATIENT_NAME


def test_deidentify_records_the_profile():
    clean = deidentify(_identified(), SALT)

    code = clean.DeidentificationMethodCodeSequence[0]
    assert clean.PatientIdentityRemoved == "YES"
    assert clean.DeidentificationMethod == DEIDENTIFICATION_METHOD
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        "113100",
        "DCM",
        "Basic Application Confidentiality Profile",
    )
    assert len(deidentify(clean, SALT).DeidentificationMethodCodeSequence) == 1  # not appended twice


UID_KEYWORDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def test_uids_are_replaced_deterministically_per_salt():
    ds = _identified()

    a, b, c = deidentify(ds, SALT), deidentify(ds, SALT), deidentify(ds, OTHER_SALT)

    for keyword in UID_KEYWORDS:
        assert a[keyword].value != ds[keyword].value
        assert a[keyword].value.startswith("2.25.") and len(a[keyword].value) <= 64
        assert a[keyword].value == b[keyword].value
        assert a[keyword].value != c[keyword].value
    assert len({a[k].value for k in UID_KEYWORDS}) == len(UID_KEYWORDS)
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert a.SOPClassUID == ds.SOPClassUID  # what kind of object it is stays known
    assert a.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_references_between_files_survive_deidentification():
    referenced = _identified(SOPInstanceUID="1.2.826.0.1.3680043.2.1125.1.99")
    referring = _identified()

    clean_referenced, clean_referring = deidentify(referenced, SALT), deidentify(referring, SALT)

    item = clean_referring.ReferencedImageSequence[0]
    assert item.ReferencedSOPInstanceUID == clean_referenced.SOPInstanceUID
    assert item.ReferencedSOPClassUID == ComputedRadiographyImageStorage


def test_deidentified_file_reads_back_with_pixels_bit_identical(tmp_path):
    src, dst = tmp_path / "original.dcm", tmp_path / "out" / "clean.dcm"
    dst.parent.mkdir()
    _identified().save_as(src, enforce_file_format=True)
    src_sha = hashlib.sha256(src.read_bytes()).hexdigest()

    deidentify_file(src, dst, SALT)

    back, original = pydicom.dcmread(dst), pydicom.dcmread(src)
    assert back.PixelData == original.PixelData
    assert np.array_equal(back.pixel_array, original.pixel_array)
    assert back.PatientName == "ANONYMOUS" and "InstitutionName" not in back
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert PATIENT_NAME.encode() not in dst.read_bytes() and b"DOE JANE" not in dst.read_bytes()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == src_sha
    assert sorted(p.name for p in dst.parent.iterdir()) == ["clean.dcm"]  # no partial file left behind


def test_real_radiograph_is_deidentified():
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))

    clean = deidentify(ds, SALT)

    assert "InstitutionName" in phi_findings(ds)["identifying_tags"]
    assert phi_findings(clean)["identifying_tags"] == ["PatientID", "PatientName"]
    assert clean.PixelData == ds.PixelData
    assert "DataSetTrailingPadding" not in clean


def test_deidentify_file_refuses_to_overwrite_the_source(tmp_path):
    src = tmp_path / "original.dcm"
    _identified().save_as(src, enforce_file_format=True)
    before = src.read_bytes()

    with pytest.raises(InputError, match="the de-identified copy must not replace the original. Fix: write it to"):
        deidentify_file(src, tmp_path / "sub" / ".." / "original.dcm", SALT)

    assert src.read_bytes() == before


def test_pseudonym_is_deterministic_salted_and_hex():
    a = pseudonym(PATIENT_ID, SALT)

    assert a == pseudonym(PATIENT_ID, SALT)
    assert a != pseudonym(PATIENT_ID, OTHER_SALT)
    assert a != pseudonym("MRN-0043", SALT)
    assert len(a) == PSEUDONYM_HEX_CHARS == 24
    assert int(a, 16) >= 0 and a == a.lower()


@pytest.mark.parametrize("salt, seen", [(b"short", "'5 bytes'"), ("a text salt of 20 ch", "'str'")])
def test_weak_salt_is_refused_without_echoing_it(salt, seen):
    with pytest.raises(InputError) as caught:
        pseudonym(PATIENT_ID, salt)

    assert str(caught.value).startswith(f"salt: got {seen}; it must be at least 16 secret bytes")
    assert "short" not in str(caught.value) and "text salt" not in str(caught.value)
    with pytest.raises(InputError):
        deidentify(_identified(), salt)


def test_phi_keywords_are_dicom_keywords_covering_the_basic_identifiers():
    required = {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "OtherPatientIDs",
        "OtherPatientNames",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "AccessionNumber",
        "StationName",
        "StudyDate",
        "SeriesDate",
        "ContentDate",
        "StudyTime",
        "DeviceSerialNumber",
    }

    assert required <= set(PHI_KEYWORDS)
    assert [k for k in PHI_KEYWORDS if k not in keyword_dict] == []
    assert list(PHI_KEYWORDS) == sorted(PHI_KEYWORDS)
