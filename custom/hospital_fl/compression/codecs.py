"""Lossy codecs for model updates: fp16, int8 with a per-tensor scale, top-k with error feedback.

``encode`` turns {name: ndarray} into a payload of smaller arrays and ``decode`` undoes it.
Only floating-point tensors are compressed; integer tensors (counters) travel as they are.
Top-k keeps the largest-magnitude fraction of each tensor of a weight *difference*; with
error feedback what was not sent is kept at the site (the residual) and added to the next
round's update, so over rounds every coordinate's change is eventually transmitted.

A payload comes from a site the server does not trust: ``decode`` checks every entry's
names, shapes, dtypes and index ranges against the global model's layout (``layout_of``)
before it allocates anything, so a few bytes cannot name a 200 MB tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hospital_fl.errors import InputError

__all__ = [
    "CODECS",
    "MAX_DECODED_VALUES",
    "CompressionConfig",
    "encode",
    "decode",
    "layout_of",
    "payload_bytes",
    "is_payload",
]

CODECS = ("none", "fp16", "int8", "topk")
_MARK = "__hospital_fl_codec__"
# Without a layout to check against (a site decoding the server's model), the most values a
# payload may expand to: 2**27 (512 MB of float32), ~18x DenseNet-121.
MAX_DECODED_VALUES = 2**27

Layout = Mapping[str, tuple[tuple[int, ...], np.dtype]]


@dataclass(frozen=True)
class CompressionConfig:
    """One direction's compression.

    Attributes:
        codec: none, fp16 (2x), int8 (per-tensor max-abs scale, ~4x) or topk (weight
            differences only).
        topk_fraction: share of each tensor's values top-k sends, in (0, 1].
        error_feedback: top-k keeps the unsent remainder at the site for the next round.
    """

    codec: str = "none"
    topk_fraction: float = 0.01
    error_feedback: bool = True

    def __post_init__(self):
        if self.codec not in CODECS:
            raise InputError("compression.codec", self.codec, f"it must be one of {CODECS}", "use e.g. int8")
        if not (isinstance(self.topk_fraction, (int, float)) and 0 < self.topk_fraction <= 1):
            raise InputError(
                "compression.topk_fraction",
                self.topk_fraction,
                "it must lie in (0, 1] (the share of values sent)",
                "use e.g. 0.01 for 1%",
            )

    @property
    def enabled(self) -> bool:
        return self.codec != "none"


def _topk(x: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    flat = x.ravel()
    k = min(flat.size, max(1, math.ceil(fraction * flat.size)))
    idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :] if k < flat.size else np.arange(flat.size)
    idx = np.sort(idx).astype(np.int32)
    return idx, flat[idx].astype(np.float32)


def encode(
    update: Mapping[str, np.ndarray],
    cfg: CompressionConfig,
    residual: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Compress ``update``; returns (payload, the new residual for top-k error feedback).

    Args:
        update: weights (fp16/int8) or weight differences (any codec).
        cfg: the codec.
        residual: top-k's unsent remainder from the previous round (None: none yet).
    """
    payload: dict = {_MARK: cfg.codec}
    new_residual: dict[str, np.ndarray] = {}
    for key, value in update.items():
        arr = np.asarray(value)
        if arr.dtype.kind != "f" or cfg.codec == "none":
            payload[key] = {"raw": arr}
        elif cfg.codec == "fp16":
            payload[key] = {"fp16": arr.astype(np.float16), "dtype": arr.dtype.str}
        elif cfg.codec == "int8":
            peak = float(np.max(np.abs(arr))) if arr.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            q = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
            payload[key] = {"q": q, "scale": np.asarray(scale, dtype=np.float32), "dtype": arr.dtype.str}
        else:
            full = arr.astype(np.float32)
            if cfg.error_feedback and residual is not None and key in residual:
                full = full + residual[key].astype(np.float32)
            idx, val = _topk(full, cfg.topk_fraction)
            payload[key] = {"idx": idx, "val": val, "shape": list(arr.shape), "dtype": arr.dtype.str}
            if cfg.error_feedback:
                rest = full.ravel().copy()
                rest[idx] = 0.0
                new_residual[key] = rest.reshape(arr.shape)
    return payload, new_residual


def is_payload(data: object) -> bool:
    return isinstance(data, Mapping) and _MARK in data


def layout_of(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a model: what every decoded payload must match."""
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in weights.items()}


def _bad(key: str, value: object, rule: str) -> InputError:
    return InputError(
        f"compressed update entry {key!r}",
        value,
        rule,
        "the site must encode the global model's weights with hospital_fl.compression.codecs.encode",
    )


def _array(key: str, part: Mapping, field_: str, kinds: str, ndim: int | None = None) -> np.ndarray:
    value = part.get(field_)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds:
        what = type(value).__name__ if not isinstance(value, np.ndarray) else f"a {value.dtype} array"
        raise _bad(key, what, f"its {field_!r} must be a numpy array of kind {kinds!r}")
    if ndim is not None and value.ndim != ndim:
        raise _bad(key, value.shape, f"its {field_!r} must have {ndim} dimension(s)")
    return value


def _dtype(key: str, part: Mapping) -> np.dtype:
    text = part.get("dtype")
    try:
        dtype = np.dtype(text) if isinstance(text, str) and len(text) < 16 else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "f":
        raise _bad(key, str(text)[:40], "its dtype must name a floating-point type")
    return dtype


def _check_part(key: str, part: object, expected: tuple | None) -> tuple[tuple[int, ...], np.dtype | None]:
    """The (shape, dtype) an entry will decode to, checked before anything is allocated."""
    if not isinstance(part, Mapping):
        raise _bad(key, type(part).__name__, "every entry must be a mapping")
    if "raw" in part:
        raw = _array(key, part, "raw", "fciub")
        shape, dtype = raw.shape, raw.dtype
    elif "fp16" in part:
        shape, dtype = _array(key, part, "fp16", "f").shape, _dtype(key, part)
    elif "q" in part:
        scale = _array(key, part, "scale", "f")
        if scale.size != 1 or not np.isfinite(scale).all():
            raise _bad(key, scale.tolist() if scale.size < 4 else scale.shape, "its scale must be one finite number")
        shape, dtype = _array(key, part, "q", "i").shape, _dtype(key, part)
    elif "idx" in part:
        named = part.get("shape")
        if not isinstance(named, (list, tuple)) or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 0 <= s for s in named
        ):
            raise _bad(key, str(named)[:60], "its shape must be a list of non-negative integers")
        shape, dtype = tuple(int(s) for s in named), _dtype(key, part)
    else:
        raise _bad(key, sorted(map(str, part))[:5], "it must hold raw, fp16, q or idx/val")
    if expected is not None:
        if tuple(shape) != tuple(expected[0]):
            raise _bad(key, tuple(shape), f"the global model's {key} has shape {tuple(expected[0])}")
        if dtype is not None and dtype != np.dtype(expected[1]):
            raise _bad(key, str(dtype), f"the global model's {key} has dtype {np.dtype(expected[1])}")
    return tuple(shape), dtype


def _check_topk(key: str, part: Mapping, size: int) -> tuple[np.ndarray, np.ndarray]:
    idx = _array(key, part, "idx", "iu", ndim=1)
    val = _array(key, part, "val", "f", ndim=1)
    if len(idx) != len(val) or len(idx) > size:
        raise _bad(key, (len(idx), len(val)), f"idx and val must have one length of at most the tensor's {size} values")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise _bad(key, (int(idx.min()), int(idx.max())), f"every index must lie in [0, {size})")
    if not np.isfinite(val).all():
        raise _bad(key, "NaN or infinity", "its values must be finite")
    return idx, val


def decode(payload: Mapping, layout: Layout | None = None) -> dict[str, np.ndarray]:
    """The update a payload from ``encode`` stands for, checked before it is expanded.

    Args:
        payload: what ``encode`` produced (from an untrusted sender).
        layout: the global model's {name: (shape, dtype)} (``layout_of``); the payload must
            hold exactly these names with these shapes and dtypes. None (no model at hand):
            only the total size is bounded, by MAX_DECODED_VALUES.

    Raises:
        InputError: naming the entry and what is wrong with it; nothing was allocated for it.
    """
    if not is_payload(payload):
        raise ValueError("not a compressed update (no codec marker); was the sender's compression filter configured?")
    keys = [k for k in payload if k != _MARK]
    if layout is not None:
        missing, extra = sorted(set(layout) - set(keys)), sorted(set(keys) - set(layout))
        if missing or extra:
            raise InputError(
                "compressed update",
                f"{len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(extra)} unknown (e.g. {[str(e)[:40] for e in extra[:3]]})",
                "it must hold exactly the global model's weights",
                "the site must send the weights of the model it received",
            )
    plan = {k: _check_part(str(k), payload[k], layout[k] if layout is not None else None) for k in keys}
    total = sum(int(np.prod(shape, dtype=np.float64)) for shape, _ in plan.values())
    if total > MAX_DECODED_VALUES:
        raise InputError(
            "compressed update",
            f"{total} values",
            f"a payload may expand to at most {MAX_DECODED_VALUES}",
            "send the weights of the model the server sent",
        )
    out = {}
    for key in keys:
        part, (shape, dtype) = payload[key], plan[key]
        if "raw" in part:
            out[key] = np.asarray(part["raw"])
        elif "fp16" in part:
            out[key] = part["fp16"].astype(dtype)
        elif "q" in part:
            out[key] = (part["q"].astype(np.float32) * np.float32(part["scale"].item())).astype(dtype)
        else:
            size = int(np.prod(shape, dtype=np.int64))
            idx, val = _check_topk(str(key), part, size)
            flat = np.zeros(size, dtype=np.float32)
            flat[idx.astype(np.int64)] = val
            out[key] = flat.reshape(shape).astype(dtype)
    return out


def payload_bytes(data: object) -> int:
    """Bytes of the array data in an update or a payload (what dominates the wire size)."""
    if isinstance(data, np.ndarray | np.generic):
        return int(data.nbytes)
    if isinstance(data, Mapping):
        return sum(payload_bytes(v) for v in data.values())
    return 0
