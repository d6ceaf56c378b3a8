"""Sample-weighted federated averaging (FedAvg's server step)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["weighted_mean"]

Weights = Mapping[str, np.ndarray]


def weighted_mean(updates: Sequence[Weights], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Average ``updates`` key by key with the given (e.g. sample-count) weights.

    Integer entries (such as counters) are averaged then rounded back to their dtype.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update, got {len(updates)} updates and {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(w)}")
    w = w / w.sum()
    out = {}
    for key, ref in updates[0].items():
        ref = np.asarray(ref)
        acc = sum(wi * np.asarray(u[key], dtype=np.float64) for wi, u in zip(w, updates))
        out[key] = np.rint(acc).astype(ref.dtype) if ref.dtype.kind in "iub" else acc.astype(ref.dtype)
    return out
