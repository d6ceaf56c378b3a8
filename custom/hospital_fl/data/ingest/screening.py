"""Reading a DICOM file and deciding, from its header, whether it is a usable chest radiograph.

Every refusal is a :class:`DicomRejected` with a short stable ``reason`` code (for counting in
reports) and a ``detail`` sentence naming the value seen, the rule and what to do. Details never
quote identifying values or file paths, so a reason can be summarised beyond the site.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from os import PathLike

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from hospital_fl.errors import InputError

__all__ = [
    "BAD_HEADER",
    "BODY_PART_NOT_CHEST",
    "CHEST_TERMS",
    "DECODE_FAILED",
    "MODALITY_NOT_ALLOWED",
    "MULTIFRAME",
    "MULTIFRAME_POLICIES",
    "NOT_DICOM",
    "NO_PIXEL_DATA",
    "REASONS",
    "TOO_SMALL",
    "TRUNCATED_PIXEL_DATA",
    "UNSUPPORTED_PHOTOMETRIC",
    "DicomRejected",
    "ScreeningConfig",
    "header_info",
    "read_dicom",
    "screen_header",
]

NOT_DICOM = "not_dicom"
NO_PIXEL_DATA = "no_pixel_data"
MODALITY_NOT_ALLOWED = "modality_not_allowed"
BODY_PART_NOT_CHEST = "body_part_not_chest"
UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"
TRUNCATED_PIXEL_DATA = "truncated_pixel_data"
TOO_SMALL = "too_small"
MULTIFRAME = "multiframe"
DECODE_FAILED = "decode_failed"
BAD_HEADER = "bad_header"

REASONS: tuple[str, ...] = (
    NOT_DICOM,
    NO_PIXEL_DATA,
    MODALITY_NOT_ALLOWED,
    BODY_PART_NOT_CHEST,
    UNSUPPORTED_PHOTOMETRIC,
    TRUNCATED_PIXEL_DATA,
    TOO_SMALL,
    MULTIFRAME,
    DECODE_FAILED,
    BAD_HEADER,
)

MULTIFRAME_POLICIES: tuple[str, ...] = ("reject", "first")

# A BodyPartExamined word that starts with one of these names the chest ("CHEST PA", "LUNGS",
# "THORAX_AP"); TORAX/TORACE are the Spanish/Portuguese and Italian spellings vendors ship.
CHEST_TERMS: tuple[str, ...] = ("CHEST", "THORAX", "TORAX", "TORACE", "LUNG", "CXR")

_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
_IMAGE_PIXEL_ATTRIBUTES = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
)
_REEXPORT = "re-export the image from the PACS"


class DicomRejected(Exception):
    """A file that cannot be used, with a stable reason code and a human explanation.

    Attributes:
        reason: one of :data:`REASONS`, stable across releases (reports count by it).
        detail: a sentence naming the value seen, the rule and what to do.
    """

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise InputError(
                "reason", reason, f"it must be one of {', '.join(REASONS)}", "use a screening.REASONS code"
            )
        # Both go to Exception so the error pickles across the ingest worker processes.
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def _reject(reason: str, seen: str, rule: str, fix: str) -> DicomRejected:
    """A DicomRejected whose detail reads ``<seen>; <rule>. Fix: <fix>``."""
    return DicomRejected(reason, f"{seen}; {rule}. Fix: {fix}")


@dataclass(frozen=True)
class ScreeningConfig:
    """Which DICOM images a site accepts for chest radiograph training.

    Attributes:
        allowed_modalities: Modality values accepted (CR: computed radiography, DX: digital
            radiography). Compared case-insensitively.
        min_size: both Rows and Columns must be at least this many pixels (>= 16); smaller
            images are thumbnails or secondary captures, not diagnostic radiographs.
        multiframe: what to do with a multi-frame object. "reject": a chest radiograph is one
            frame, so several frames mean a different kind of acquisition. "first": keep frame 0,
            for vendors that wrap a single view in a multi-frame object.
    """

    allowed_modalities: tuple[str, ...] = ("CR", "DX")
    min_size: int = 256
    multiframe: str = "reject"

    def __post_init__(self):
        mods = self.allowed_modalities
        if isinstance(mods, str) or not mods or not all(isinstance(m, str) and m.strip() for m in mods):
            raise InputError(
                "allowed_modalities",
                mods,
                "it must be a non-empty tuple of Modality codes",
                'use e.g. allowed_modalities=("CR", "DX")',
            )
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 16:
            raise InputError(
                "min_size", self.min_size, "it must be a whole number of pixels >= 16", "use e.g. min_size=256"
            )
        _check_multiframe_policy(self.multiframe)


def _check_multiframe_policy(policy: str) -> None:
    if policy not in MULTIFRAME_POLICIES:
        raise InputError(
            "multiframe", policy, f"it must be one of {', '.join(MULTIFRAME_POLICIES)}", 'use "reject" or "first"'
        )


def read_dicom(path: str | PathLike[str]) -> Dataset:
    """Read a DICOM Part 10 file, refusing anything that is not one.

    Args:
        path: the file to read.

    Returns:
        The dataset, pixel data included (not yet decoded).

    Raises:
        DicomRejected: ``not_dicom`` for an empty, text, garbage or preamble-less file, or one
            that holds no data elements.
        OSError: the path is missing or unreadable (a problem of the caller, not of the file).
    """
    try:
        ds = pydicom.dcmread(path, force=False)
    except OSError:
        raise
    except Exception as exc:  # any parse failure of untrusted bytes means "not a DICOM file"
        # pydicom messages can quote the path, which may carry a patient's name.
        message = str(exc).replace(str(path), "<file>")
        raise _reject(
            NOT_DICOM,
            f"the file could not be read as DICOM ({type(exc).__name__}: {message})",
            "a DICOM Part 10 file starts with a 128-byte preamble and 'DICM'",
            f"{_REEXPORT} as DICOM files, not as images or reports",
        ) from exc
    if len(ds) == 0:
        raise _reject(
            NOT_DICOM,
            "the file has a DICOM preamble but no data elements",
            "an image file holds at least its header and pixel data",
            f"{_REEXPORT}; this copy is empty or cut short",
        )
    return ds


def screen_header(ds: Dataset, cfg: ScreeningConfig) -> None:
    """Raise :class:`DicomRejected` unless ``ds`` looks like a usable chest radiograph.

    Checks, in order: pixel data present; Modality in ``cfg.allowed_modalities``;
    BodyPartExamined names the chest (see :data:`CHEST_TERMS`; an absent or empty
    BodyPartExamined is accepted, since many CR/DX exports leave this type 3 attribute out);
    the Image Pixel attributes are present; grayscale (MONOCHROME1/2, one sample per pixel);
    Rows and Columns >= ``cfg.min_size``; a single frame unless ``cfg.multiframe`` is "first";
    for uncompressed transfer syntaxes, PixelData holds every byte the header promises.

    Args:
        ds: a dataset from :func:`read_dicom`.
        cfg: the site's screening settings.

    Raises:
        DicomRejected: with the reason of the first failed check.
    """
    _require_pixel_data(ds)
    _require_modality(ds, cfg.allowed_modalities)
    _require_chest(ds)
    _require_image_pixel_attributes(ds)
    _require_grayscale(ds)
    _require_size(ds, cfg.min_size)
    _require_frame_policy(ds, cfg.multiframe)
    _require_complete_pixel_data(ds)


def header_info(ds: Dataset) -> dict:
    """Plain-Python header fields the ingest keeps for each image.

    The result holds identifying values (``patient_id``, ``sop_instance_uid``): it stays at the
    site, and only pseudonyms of them (see ``phi.pseudonym``) may go further.

    Args:
        ds: a dataset from :func:`read_dicom` (ideally already screened).

    Returns:
        ``sop_instance_uid``, ``patient_id``, ``view_position`` (upper case, "" when absent),
        ``modality``, ``rows``, ``columns``, ``frames`` (1 when NumberOfFrames is absent),
        ``transfer_syntax`` (UID string), ``transfer_syntax_name``, ``photometric`` and
        ``bits_stored``. Absent text fields are "", absent numbers None.
    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return {
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "patient_id": _text(ds, "PatientID"),
        "view_position": _text(ds, "ViewPosition").upper(),
        "modality": _text(ds, "Modality").upper(),
        "rows": _number(ds, "Rows"),
        "columns": _number(ds, "Columns"),
        "frames": _number(ds, "NumberOfFrames") or 1,
        "transfer_syntax": str(ts) if ts else "",
        "transfer_syntax_name": UID(ts).name if ts else "",
        "photometric": _text(ds, "PhotometricInterpretation").upper(),
        "bits_stored": _number(ds, "BitsStored"),
    }


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _number(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(ds.get(keyword))
    except (TypeError, ValueError):
        return None


def _require_pixel_data(ds: Dataset) -> None:
    if "PixelData" not in ds:
        raise _reject(
            NO_PIXEL_DATA,
            "the file has no PixelData (7FE0,0010)",
            "only image objects can be used; reports, presentation states and cut-short files cannot",
            f"{_REEXPORT} with its pixel data",
        )


def _require_modality(ds: Dataset, allowed: tuple[str, ...]) -> None:
    modality = _text(ds, "Modality").upper()
    accepted = tuple(m.strip().upper() for m in allowed)
    if modality not in accepted:
        raise _reject(
            MODALITY_NOT_ALLOWED,
            f"Modality is {modality!r}",
            f"only {', '.join(accepted)} images are used",
            "export the chest radiograph series only, or add the modality to ScreeningConfig.allowed_modalities",
        )


def _require_chest(ds: Dataset) -> None:
    value = ds.get("BodyPartExamined")
    if value is None:
        value = ""
    body_part = " ".join(str(v) for v in value) if isinstance(value, (list, MultiValue)) else str(value)
    words = re.split(r"[^A-Z0-9]+", body_part.upper())
    if not body_part.strip() or any(w.startswith(CHEST_TERMS) for w in words if w):
        return
    raise _reject(
        BODY_PART_NOT_CHEST,
        f"BodyPartExamined is {body_part.strip()!r}",
        f"a chest radiograph's body part starts with one of {', '.join(CHEST_TERMS)} (or is absent)",
        "export only chest studies",
    )


def _require_image_pixel_attributes(ds: Dataset) -> None:
    missing = [k for k in _IMAGE_PIXEL_ATTRIBUTES if ds.get(k) in (None, "")]
    if missing:
        raise _reject(
            BAD_HEADER,
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing",
            "the Image Pixel module needs them to lay out the pixels",
            f"{_REEXPORT}; the header is incomplete",
        )
    _transfer_syntax(ds)
    _frame_count(ds)


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise _reject(
            BAD_HEADER,
            "the file meta has no TransferSyntaxUID (0002,0010)",
            "the pixel data encoding cannot be known without it",
            f"{_REEXPORT} as a DICOM Part 10 file",
        )
    return UID(ts)


def _frame_count(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        frames = int(value)
    except (TypeError, ValueError):
        frames = 0
    if frames < 1:
        raise _reject(
            BAD_HEADER,
            f"NumberOfFrames is {str(value)!r}",
            "it must be a whole number >= 1",
            f"{_REEXPORT}; the header is corrupt",
        )
    return frames


def _require_grayscale(ds: Dataset) -> None:
    photometric = _text(ds, "PhotometricInterpretation").upper()
    samples = int(ds.SamplesPerPixel)
    if photometric not in _GRAYSCALE or samples != 1:
        raise _reject(
            UNSUPPORTED_PHOTOMETRIC,
            f"PhotometricInterpretation is {photometric!r} with {samples} sample(s) per pixel",
            "a chest radiograph is grayscale: MONOCHROME1 or MONOCHROME2 with 1 sample per pixel",
            "export the original radiograph, not a colour screenshot or secondary capture",
        )


def _require_size(ds: Dataset, min_size: int) -> None:
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows < min_size or cols < min_size:
        raise _reject(
            TOO_SMALL,
            f"the image is {rows} x {cols} pixels",
            f"both sides must be >= {min_size} pixels for a diagnostic radiograph",
            "export the full-resolution image, or lower ScreeningConfig.min_size",
        )


def _require_frame_policy(ds: Dataset, policy: str) -> None:
    frames = _frame_count(ds)
    if frames > 1 and policy == "reject":
        raise _reject(
            MULTIFRAME,
            f"NumberOfFrames is {frames}",
            "a chest radiograph is a single frame",
            'set ScreeningConfig.multiframe="first" if this vendor wraps one view in a multi-frame object',
        )


def _expected_pixel_bytes(ds: Dataset) -> int:
    pixels = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * _frame_count(ds)
    bits = int(ds.BitsAllocated)
    # 1-bit data is packed eight pixels to a byte.
    return math.ceil(pixels / 8) if bits == 1 else pixels * math.ceil(bits / 8)


def _require_complete_pixel_data(ds: Dataset) -> None:
    if _transfer_syntax(ds).is_encapsulated:
        return  # compressed lengths are only known after decoding
    expected, present = _expected_pixel_bytes(ds), len(ds.PixelData)
    if present < expected:
        raise _reject(
            TRUNCATED_PIXEL_DATA,
            f"PixelData holds {present} bytes",
            f"Rows x Columns x samples x frames x bytes per sample needs {expected}",
            f"{_REEXPORT}; this copy was cut short",
        )


def _check_decodable(ds: Dataset, multiframe: str) -> None:
    """The header checks decoding itself relies on (no site policy)."""
    _require_pixel_data(ds)
    _require_image_pixel_attributes(ds)
    _require_grayscale(ds)
    _require_frame_policy(ds, multiframe)
    _require_complete_pixel_data(ds)
