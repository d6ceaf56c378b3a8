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
