"""Build DICOM files for tests: a PACS-like export wrapping given pixels, with controllable tags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def cr_skeleton(sop_uid: str | None = None, filename: str = "synthetic.dcm") -> FileDataset:
    """An empty CR instance: file meta (explicit VR little endian) and SOP class/instance UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(filename, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def write_cxr(
    path: str | Path,
    pixels: np.ndarray,
    patient_id: str = "MRN0001",
    sop_uid: str | None = None,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    body_part: str | None = "CHEST",
    view: str = "PA",
    patient_name: str = "DOE^JANE",
    bits: int = 12,
    **tags,
) -> Path:
    """Write ``pixels`` (H, W) unsigned ints as an uncompressed single-frame radiograph."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = cr_skeleton(sop_uid, str(path))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "General Hospital"
    ds.StudyDate = "20260101"
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    """A small uint8 image as a 12-bit (size, size) radiograph (nearest neighbour)."""
    idx = (np.arange(size) * image.shape[0] / size).astype(int)
    return image[np.ix_(idx, idx)].astype(np.uint16) * 16


def read_back(path: str | Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def plant_phi(ds: pydicom.Dataset) -> list[str]:
    """Put identifying text where PACS exports carry it: 24 attributes (names, ids, free-text
    comments and descriptions, dates, device and institution), nested sequences (a structured
    report's content tree, a scheduled step, a reference item and a LUT item of sequences a copy
    keeps) and private tags, at the top and inside items. Returns the planted strings, each unique,
    to search a copy's bytes for."""
    from pydicom.dataset import Dataset

    planted = {
        "PatientName": "DOE^JOHNATHAN",
        "PatientID": "MRN123-JD",
        "PatientBirthDate": "19450317",
        "PatientComments": "pt John Doe lives at 12 Elm Rd",
        "AdditionalPatientHistory": "smoker per wife Mary Doe",
        "Occupation": "FIREFIGHTER-STN9",
        "ReviewerName": "REVIEWER^ALICIA",
        "PhysicianApprovingInterpretation": "APPROVER^BORIS",
        "PerformingPhysicianName": "PERFORMER^CARLA",
        "OperatorsName": "OPERATOR^DMITRI",
        "CommentsOnThePerformedProcedureStep": "pt John Doe, MRN123",
        "StudyDescription": "CHEST for JDOE-STUDY",
        "SeriesDescription": "PA JDOE-SERIES",
        "ImageComments": "recheck JDOE-IMGCOMMENT",
        "DerivationDescription": "derived JDOE-DERIV",
        "InstitutionName": "St Elsewhere Infirmary",
        "StationName": "ELSEWHERE-CR7",
        "DeviceSerialNumber": "SN-778899",
        "AccessionNumber": "ACC-556677",
        "AcquisitionDate": "20250302",
        "ContentDate": "20250303",
        "InstanceCreationDate": "20250304",
        "ReviewDate": "20250305",
        "InterpretationApprovalDate": "20250306",
    }
    for keyword, value in planted.items():
        setattr(ds, keyword, value)
    ds.file_meta.SourceApplicationEntityTitle = "ELSEWHERE_AE"
    # a structured-report content tree, two levels deep
    leaf = Dataset()
    leaf.PersonName = "NESTED^PERSON"
    leaf.TextValue = "leaf note JDOE-LEAF"
    node = Dataset()
    node.TextValue = "pt John Doe, MRN123 TEXTVALUE"
    node.ContentSequence = [leaf]
    ds.ContentSequence = [node]
    step = Dataset()
    step.ScheduledProcedureStepDescription = "sched JDOE-SCHED"
    step.ScheduledProcedureStepStartDate = "20250307"
    ds.ScheduledProcedureStepSequence = [step]
    # inside sequences a copy keeps: only their allowed elements may survive
    ref = Dataset()
    ref.ReferencedSOPClassUID = CR_STORAGE
    ref.ReferencedSOPInstanceUID = generate_uid()
    purpose = Dataset()
    purpose.CodeMeaning = "prior of JDOE-PURPOSE"
    ref.PurposeOfReferenceCodeSequence = [purpose]
    ref.add_new(0x00091010, "LO", "REFPRIV")  # a private tag without a creator, inside an item
    ds.ReferencedImageSequence = [ref]
    lut = Dataset()
    lut.add_new(0x00283002, "US", [2, 0, 12])  # LUTDescriptor: 2 entries from 0, 12 bits
    lut.add_new(0x00283006, "US", [0, 4095])  # LUTData
    lut.LUTExplanation = "LUT by JDOE-LUT"
    ds.VOILUTSequence = [lut]
    block = ds.private_block(0x0011, "ELSEWHERE PRIVATE", create=True)
    block.add_new(0x01, "LO", "PRIVATE JDOE-PRIV")
    block.add_new(0x02, "SH", "BED-4B")
    return [*planted.values(), "ELSEWHERE_AE", "ELSEWHERE PRIVATE", "NESTED^PERSON", "JDOE-LEAF",
            "TEXTVALUE", "JDOE-SCHED", "20250307", "JDOE-PURPOSE", "REFPRIV", "JDOE-LUT", "JDOE-PRIV", "BED-4B"]  # fmt: skip


def ingest_export(
    export: Path, label_rows: list[str], consent_rows: list[str], csv_dir: Path, site: str, out: Path
) -> None:
    """Write a PACS export's labels and consent CSVs (``site``-prefixed, in ``csv_dir``) and
    ingest the export into ``out`` at the demo's 28x28, as a site operator would."""
    from hospital_fl.data.ingest.consent import read_consent
    from hospital_fl.data.ingest.labels import read_labels
    from hospital_fl.data.ingest.pipeline import IngestConfig, ingest

    labels, consent = csv_dir / f"{site}-labels.csv", csv_dir / f"{site}-consent.csv"
    labels.write_text("\n".join(["file,label", *label_rows]) + "\n")
    consent.write_text("\n".join(["patient_id,status,date", *consent_rows]) + "\n")
    ingest(export, read_labels(labels), out, read_consent(consent), IngestConfig(image_size=28, workers=1))
