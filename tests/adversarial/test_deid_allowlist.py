"""De-identified copies keep only what is on the allow list, and burned-in images are withheld.

PHI is planted (tests/dicom_factory.plant_phi) in 24 attributes, in nested sequences, inside the
items of sequences a copy keeps, in private tags and in the file meta, on pydicom-data's real chest
CR and on files written by the factory; the real ingest pipeline then writes the copies. Each
copy's bytes are searched for every planted string, and every element of the copy, at any depth,
must be on the allow list.
"""

import datetime as dt

import numpy as np
import pydicom
import pytest
from dicom_factory import plant_phi, upscale, write_cxr
from hospital_fl.data.ingest.consent import read_consent
from hospital_fl.data.ingest.labels import read_labels
from hospital_fl.data.ingest.phi import DEIDENTIFICATION_METHOD, KEPT_ATTRIBUTES, KEPT_SEQUENCES, deidentify
from hospital_fl.data.ingest.pipeline import IngestConfig, ingest
from pydicom.data import get_testdata_file

TODAY = dt.date(2026, 11, 23)
# Written by the de-identification itself (dummy/pseudonymised, blanked type-2, replaced UIDs, method).
WRITTEN = {
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
    "ReferringPhysicianName", "StudyID", "ContentDate", "ContentTime", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "FrameOfReferenceUID", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
}  # fmt: skip
CODE_ITEM = {"CodeValue", "CodingSchemeDesignator", "CodeMeaning"}
BLANKED = {"PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber", "ContentDate", "ContentTime"}


@pytest.fixture(scope="module")
def export(tmp_path_factory, federated_data):
    root = tmp_path_factory.mktemp("deid")
    pacs = root / "pacs"
    pacs.mkdir()
    planted: dict[str, list[str]] = {}

    real = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    planted["real.dcm"] = plant_phi(real)
    real.save_as(pacs / "real.dcm", enforce_file_format=True)
    images = federated_data.sites[0].train.images
    extra = {
        "factory.dcm": {},
        "derived.dcm": {"ImageType": ["DERIVED", "PRIMARY"]},  # processed radiograph: copied
        "burned.dcm": {"BurnedInAnnotation": "YES"},
        "screen.dcm": {"ImageType": ["DERIVED", "SECONDARY"]},  # a screen capture
    }
    for i, (name, tags) in enumerate(extra.items()):
        path = write_cxr(pacs / name, upscale(images[i], 256), patient_id="placeholder", **tags)
        ds = pydicom.dcmread(path)
        planted[name] = plant_phi(ds)
        ds.save_as(path, enforce_file_format=True)
    (root / "labels.csv").write_text("file,label\n" + "".join(f"{n},1\n" for n in planted))
    (root / "consent.csv").write_text("patient_id,status,date\nMRN123-JD,granted,2026-01-01\n")
    return root, planted


def _ingest(root, copies, **cfg):
    return ingest(
        root / "pacs",
        read_labels(root / "labels.csv"),
        root / "site",
        read_consent(root / "consent.csv", today=TODAY),
        IngestConfig(image_size=28, workers=1, deidentify_to=str(copies), **cfg),
        today=TODAY,
    )


def _copies_by_source(root, copies) -> dict:
    """{source file name: copy path}, matched through the pixels (copies are named by pseudonym)."""
    source_of = {pydicom.dcmread(p).PixelData: p.name for p in (root / "pacs").iterdir()}
    return {source_of[pydicom.dcmread(c).PixelData]: c for c in copies.glob("*.dcm")}


def _every_element_allowed(ds, allowed, path="") -> list[str]:
    wrong = []
    for elem in ds:
        where = f"{path}{elem.keyword or elem.tag}"
        if elem.tag.is_private or elem.keyword not in allowed:
            wrong.append(where)
        elif elem.VR == "SQ":
            inner = CODE_ITEM if elem.keyword == "DeidentificationMethodCodeSequence" else KEPT_SEQUENCES[elem.keyword]
            for item in elem.value:
                wrong += _every_element_allowed(item, inner, where + ">")
    return wrong


def test_planted_phi_is_absent_from_every_copy_and_only_allowed_elements_remain(export, tmp_path):
    root, planted = export
    copies = tmp_path / "copies"

    result = _ingest(root, copies)

    by_source = _copies_by_source(root, copies)
    assert set(by_source) == {"real.dcm", "factory.dcm", "derived.dcm"}
    for source, copy in by_source.items():
        data = copy.read_bytes()
        leaked = [s for s in planted[source] if s.encode() in data or s.upper().encode() in data]
        assert leaked == [], (source, leaked)
        ds = pydicom.dcmread(copy)
        assert _every_element_allowed(ds, KEPT_ATTRIBUTES | set(KEPT_SEQUENCES) | WRITTEN) == []
        assert all(ds[k].value in ("", None) for k in BLANKED if k in ds)
        assert set(ds.file_meta.dir()) <= {"FileMetaInformationGroupLength", "FileMetaInformationVersion",
                                           "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                                           "TransferSyntaxUID", "ImplementationClassUID", "ImplementationVersionName"}  # fmt: skip
        original = pydicom.dcmread(root / "pacs" / source)
        assert np.array_equal(ds.pixel_array, original.pixel_array)
        assert (ds.Modality, ds.ViewPosition, ds.PhotometricInterpretation) == (
            original.Modality,
            original.ViewPosition,
            original.PhotometricInterpretation,
        )
        assert ds.DeidentificationMethod == DEIDENTIFICATION_METHOD and ds.PatientIdentityRemoved == "YES"
    withheld = {r["file"]: r["detail"] for r in result.report["rejected_files"] if r["reason"] == "copy_withheld_burned_in"}
    assert set(withheld) == {"burned.dcm", "screen.dcm"}
    assert "BurnedInAnnotation is YES" in withheld["burned.dcm"] and "SECONDARY" in withheld["screen.dcm"]
    assert result.report["accepted"] == 5  # withheld copies still train: only sharing is refused


def test_burned_in_copies_only_when_the_operator_allows_them_and_removed_when_that_is_withdrawn(export, tmp_path):
    root, planted = export
    copies = tmp_path / "copies"

    _ingest(root, copies, copy_burned_in=True)
    allowed = {source: copy.read_bytes() for source, copy in _copies_by_source(root, copies).items()}
    _ingest(root, copies)
    after = _copies_by_source(root, copies)

    assert set(allowed) == set(planted)
    for source in ("burned.dcm", "screen.dcm"):
        assert not [s for s in planted[source] if s.encode() in allowed[source]]  # the header is still cleaned
    assert set(after) == {"real.dcm", "factory.dcm", "derived.dcm"}


def test_a_copy_from_the_earlier_blocklist_method_is_rewritten(export, tmp_path):
    root, planted = export
    copies = tmp_path / "copies"
    _ingest(root, copies)
    copy = _copies_by_source(root, copies)["factory.dcm"]
    stale = pydicom.dcmread(copy)
    stale.DeidentificationMethod = "DICOM PS3.15 E.1 Basic Application Confidentiality Profile"
    stale.ReviewerName = "REVIEWER^ALICIA"  # what the blocklist kept
    stale.save_as(copy, enforce_file_format=True)

    _ingest(root, copies)

    assert b"REVIEWER^ALICIA" not in copy.read_bytes()


def test_deidentify_drops_attributes_it_has_never_heard_of():
    """An allow list, not a block list: a future or retired attribute holding text is dropped too."""
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.add_new(0x00400280, "ST", "retired comment JDOE-RETIRED")  # CommentsOnThePerformedProcedureStep
    ds.add_new(0x00324000, "LT", "StudyComments JDOE-RETIRED2")  # retired Study Comments
    ds.PatientWeight = 71.5
    clean = deidentify(ds, b"site-secret-0123456789abcdef")

    text = str(clean) + str(clean.to_json_dict())
    assert "JDOE-RETIRED" not in text and "PatientWeight" not in clean
