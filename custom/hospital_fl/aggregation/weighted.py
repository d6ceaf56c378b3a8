"""Sample-weighted federated averaging and the checks an update must pass first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["update_problem", "weighted_mean"]

Weights = Mapping[str, np.ndarray]


def update_problem(update: Weights, n_samples: object, reference: Weights | None = None) -> str | None:
    """Why ``update`` must not be aggregated, or None when it is acceptable.

    Args:
        update: a site's model weights.
        n_samples: the number of training samples the site claims.
        reference: weights whose keys and shapes the update must match (e.g. the first
            accepted update of the round).
    """
    if not isinstance(n_samples, (int, np.integer)) or isinstance(n_samples, bool) or n_samples <= 0:
        return f"n_samples must be a positive integer, got {n_samples!r}"
    if not update:
        return "the update holds no weights"
    if reference is not None:
        if set(update) != set(reference):
            diff = sorted(set(update) ^ set(reference))[:3]
            return f"its weight names differ from the other sites' (e.g. {diff})"
        for key, ref in reference.items():
            if np.shape(update[key]) != np.shape(ref):
                return f"{key} has shape {np.shape(update[key])}, expected {np.shape(ref)}"
    for key, value in update.items():
        arr = np.asarray(value)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return f"{key} contains NaN or infinite values"
    return None


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
