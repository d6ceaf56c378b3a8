"""From a screened DICOM dataset to the model's input: a square uint8 image, 0 = black.

The steps follow the DICOM grayscale pipeline (PS3.4 N.2: Modality LUT, VOI LUT, Presentation),
so the array is what a radiologist's viewer shows, then shrink it to the model's size:

1. decode frame 0 of the pixel data (compressed transfer syntaxes through pydicom's plugins);
2. Modality LUT or Rescale Slope/Intercept: stored values to the modality's physical units;
3. VOI LUT, else the first Window Center/Width, else a 0.5-99.5 percentile window;
4. scale to [0, 1]; invert MONOCHROME1 so the same anatomy gives the same array as MONOCHROME2;
5. keep the aspect ratio: shrink the longer side to ``size`` with an antialiased bilinear
   filter and centre the result on a black square (letterbox); pixels are taken as square;
6. round to uint8.

Steps 2-4 act on each stored value alone, so for 8/16-bit data they are computed once per
possible value (at most 65536) and applied to the image as one table lookup.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.pixels.processing import apply_voi, apply_windowing
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from hospital_fl.data.ingest.screening import (
    DECODE_FAILED,
    _check_decodable,
    _check_multiframe_policy,
    _reject,
    _transfer_syntax,
)
from hospital_fl.errors import InputError

__all__ = ["DECODER_PACKAGES", "PERCENTILE_WINDOW", "PREPROCESSING_VERSION", "to_model_image"]

# Bump whenever to_model_image would return a different array for the same file: cached
# preprocessed images and models trained on them are keyed by it.
PREPROCESSING_VERSION = "cxr-pixels-1"

# Window used when the file carries no VOI LUT and no Window Center/Width: robust to the few
# saturated pixels of collimator edges and markers.
PERCENTILE_WINDOW: tuple[float, float] = (0.5, 99.5)

# What to pip install when a compressed transfer syntax has no working decoder.
DECODER_PACKAGES: dict[str, str] = {
    JPEGBaseline8Bit: "pylibjpeg pylibjpeg-libjpeg",
    JPEGExtended12Bit: "pylibjpeg pylibjpeg-libjpeg",
    JPEGLossless: "pylibjpeg pylibjpeg-libjpeg",
    JPEGLosslessSV1: "pylibjpeg pylibjpeg-libjpeg",
    JPEGLSLossless: "pylibjpeg pylibjpeg-libjpeg",
    JPEGLSNearLossless: "pylibjpeg pylibjpeg-libjpeg",
    JPEG2000Lossless: "pylibjpeg pylibjpeg-openjpeg",
    JPEG2000: "pylibjpeg pylibjpeg-openjpeg",
    HTJ2KLossless: "pylibjpeg pylibjpeg-openjpeg",
    HTJ2KLosslessRPCL: "pylibjpeg pylibjpeg-openjpeg",
    HTJ2K: "pylibjpeg pylibjpeg-openjpeg",
    RLELossless: "pylibjpeg pylibjpeg-rle",
}

_REEXPORT = "re-export the image from the PACS"


def to_model_image(ds: Dataset, size: int, multiframe: str = "reject") -> np.ndarray:
    """The model's view of a grayscale radiograph: (size, size) uint8, 0 = black on a display.

    See the module docstring for the steps. ``ds`` is not modified.

    Args:
        ds: a dataset from ``screening.read_dicom`` (screened or not: the header facts that
            decoding relies on are checked again here).
        size: side of the square output in pixels (>= 16).
        multiframe: "reject" refuses multi-frame objects; "first" uses frame 0.

    Returns:
        A C-contiguous ``np.uint8`` array of shape (size, size).

    Raises:
        DicomRejected: no_pixel_data, bad_header, unsupported_photometric, multiframe or
            truncated_pixel_data from the header; decode_failed when no installed plugin can
            decode the transfer syntax (the detail names the pip packages) or decoding fails.
        InputError: bad ``size`` or ``multiframe``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise InputError("size", size, "the model input size must be a whole number >= 16", "use e.g. 224")
    _check_multiframe_policy(multiframe)
    _check_decodable(ds, multiframe)
    stored = _decode_first_frame(ds)
    unit = _unit_intensities(stored, ds)
    return _letterbox(unit, size)


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    """Frame 0 as stored values, shape (Rows, Columns)."""
    ts = _transfer_syntax(ds)
    seen = f"the transfer syntax is {ts.name} ({ts})"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise _reject(
            DECODE_FAILED,
            seen,
            "pydicom has no decoder for it",
            f"{_REEXPORT} uncompressed, JPEG 2000, JPEG-LS or JPEG lossless",
        ) from None
    if not decoder.is_available:
        packages = DECODER_PACKAGES.get(ts, "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle")
        raise _reject(DECODE_FAILED, seen, "no installed plugin decodes it", f"pip install {packages}")
    try:
        # index=0 decodes only the first frame: all there is, or what the "first" policy keeps.
        frame = pixel_array(ds, index=0)
    except Exception as exc:  # decoder plugins raise many types for corrupt streams
        raise _reject(
            DECODE_FAILED,
            f"{seen} and decoding failed ({type(exc).__name__}: {' '.join(str(exc).split())})",
            "the pixel data must decode to Rows x Columns values",
            f"{_REEXPORT}; this copy is probably corrupt",
        ) from exc
    if frame.shape != (int(ds.Rows), int(ds.Columns)):
        raise _reject(
            DECODE_FAILED,
            f"{seen} and frame 0 decoded to shape {frame.shape}",
            f"it must be (Rows, Columns) = ({int(ds.Rows)}, {int(ds.Columns)})",
            f"{_REEXPORT}; the header and the pixel data disagree",
        )
    return frame if frame.dtype.isnative else frame.astype(frame.dtype.newbyteorder("="))


def _unit_intensities(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> display intensities in [0, 1] (float32), 0 = black."""
    table_path = stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2
    if table_path:
        # Every bit pattern the array can hold, and the stored value DICOM reads from it.
        bits = 8 * stored.dtype.itemsize
        patterns = stored.view(f"u{stored.dtype.itemsize}")
        values = _stored_values(bits, min(int(ds.BitsStored), bits), signed=stored.dtype.kind == "i")
    else:
        values = stored
    # Modality LUT / rescale first: window centres and VOI LUTs are defined on its output.
    modality = apply_modality_lut(values, ds)
    # The VOI step is the display window the vendor set for this image, i.e. what was read.
    voi = _apply_voi(modality, ds)
    if voi is not None:
        display, low, high = voi
    elif table_path:
        # No window in the file: the percentiles of the image, from its histogram.
        counts = np.bincount(patterns.ravel(), minlength=values.size)
        display = modality
        low, high = _weighted_percentiles(modality, counts, PERCENTILE_WINDOW)
    else:
        display = modality
        low, high = (float(v) for v in np.percentile(modality, PERCENTILE_WINDOW))
    # [0, 1] over the window, whatever the bit depth; a constant image maps to one level.
    scale = 1.0 / (high - low) if high > low else 0.0
    unit = np.clip((display.astype(np.float32, copy=False) - np.float32(low)) * np.float32(scale), 0.0, 1.0)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1: the lowest value is white
    return np.take(unit, patterns) if table_path else unit


def _stored_values(bits: int, bits_stored: int, signed: bool) -> np.ndarray:
    """For each ``bits``-wide pattern, the value of its low ``bits_stored`` bits (two's complement
    when signed). Unused high bits must be ignored (PS3.5 8.1.1); old files keep overlays there."""
    values = np.arange(2**bits, dtype=np.int64) & ((1 << bits_stored) - 1)
    if signed:
        sign = 1 << (bits_stored - 1)
        values = (values ^ sign) - sign
    return values


def _voi_kind(ds: Dataset) -> str | None:
    """Which VOI step applies ("lut", "window" or None), chosen as apply_voi_lut(prefer_lut=True) does."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        return "window"
    return None


def _apply_voi(modality: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float] | None:
    """The VOI transform of ``modality`` and its output range, or None when the file has none
    usable (then the percentile window applies)."""
    kind = _voi_kind(ds)
    if kind is None:
        return None
    if kind == "lut" and modality.dtype.kind == "f":
        modality = np.rint(modality).astype(np.int64)  # a VOI LUT is indexed by whole values
    try:
        display = apply_voi_lut(modality, ds, index=0, prefer_lut=True)
        low, high = _voi_output_range(ds, kind)
    except (ValueError, TypeError, NotImplementedError):
        return None  # e.g. Window Width 0 or an unknown VOI LUT Function
    return display, low, high


def _voi_output_range(ds: Dataset, kind: str) -> tuple[float, float]:
    """The range the VOI step maps into, so that [0, 1] spans the window rather than the data."""
    if kind == "lut":
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries = apply_voi(np.arange(descriptor[1], descriptor[1] + (descriptor[0] or 2**16)), ds, index=0)
        return float(entries.min()), float(entries.max())
    # Inputs far outside the window land on pydicom's own output bounds for any VOI LUT Function.
    with np.errstate(over="ignore"):
        ends = apply_windowing(np.array([-1e30, 1e30]), ds, index=0)
    return float(ends.min()), float(ends.max())


def _weighted_percentiles(values: np.ndarray, counts: np.ndarray, percents: tuple[float, ...]) -> tuple[float, ...]:
    """np.percentile (linear interpolation) of an image given as its histogram over ``values``."""
    keep = counts > 0
    order = np.argsort(values[keep], kind="stable")
    sorted_values = values[keep][order].astype(np.float64)
    cumulative = np.cumsum(counts[keep][order])
    n = int(cumulative[-1])
    out = []
    for q in percents:
        rank = q / 100 * (n - 1)
        below = int(np.floor(rank))
        above = min(below + 1, n - 1)
        # the k-th smallest pixel (0-based) is the first value whose cumulative count exceeds k
        v_below, v_above = sorted_values[np.searchsorted(cumulative, [below, above], side="right")]
        out.append(float(v_below + (v_above - v_below) * (rank - below)))
    return tuple(out)


def _letterbox(unit: np.ndarray, size: int) -> np.ndarray:
    """Aspect-preserving antialiased resize onto a black size x size canvas, as uint8."""
    rows, cols = unit.shape
    scale = size / max(rows, cols)
    new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    # Pillow's float ("F") resize widens the bilinear kernel by the shrink factor, so a 9x
    # reduction averages every pixel instead of sampling a few and aliasing the rib edges.
    # (Pillow, not torch: decoding workers then start without importing torch.)
    image = Image.fromarray(np.ascontiguousarray(unit, dtype=np.float32), mode="F")
    small = np.asarray(image.resize((new_cols, new_rows), resample=Image.Resampling.BILINEAR), dtype=np.float32)
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    canvas[top : top + new_rows, left : left + new_cols] = small
    return np.rint(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
