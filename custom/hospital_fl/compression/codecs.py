"""Lossy codecs for model updates: fp16, int8 with a per-tensor scale, top-k with error feedback.

``encode`` turns {name: ndarray} into a payload of smaller arrays and ``decode`` undoes it.
Only floating-point tensors are compressed; integer tensors (counters) travel as they are.
Top-k keeps the largest-magnitude fraction of each tensor of a weight *difference*; with
error feedback what was not sent is kept at the site (the residual) and added to the next
round's update, so over rounds every coordinate's change is eventually transmitted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hospital_fl.errors import InputError

__all__ = ["CODECS", "CompressionConfig", "encode", "decode", "payload_bytes", "is_payload"]

CODECS = ("none", "fp16", "int8", "topk")
_MARK = "__hospital_fl_codec__"


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


def decode(payload: Mapping) -> dict[str, np.ndarray]:
    """The update a payload from ``encode`` stands for."""
    if not is_payload(payload):
        raise ValueError("not a compressed update (no codec marker); was the sender's compression filter configured?")
    out = {}
    for key, part in payload.items():
        if key == _MARK:
            continue
        if "raw" in part:
            out[key] = np.asarray(part["raw"])
        elif "fp16" in part:
            out[key] = part["fp16"].astype(np.dtype(part["dtype"]))
        elif "q" in part:
            out[key] = (part["q"].astype(np.float32) * np.float32(part["scale"])).astype(np.dtype(part["dtype"]))
        else:
            shape = tuple(int(s) for s in part["shape"])
            flat = np.zeros(int(np.prod(shape)), dtype=np.float32)
            flat[np.asarray(part["idx"], dtype=np.int64)] = part["val"]
            out[key] = flat.reshape(shape).astype(np.dtype(part["dtype"]))
    return out


def payload_bytes(data: object) -> int:
    """Bytes of the array data in an update or a payload (what dominates the wire size)."""
    if isinstance(data, np.ndarray | np.generic):
        return int(data.nbytes)
    if isinstance(data, Mapping):
        return sum(payload_bytes(v) for v in data.values())
    return 0
