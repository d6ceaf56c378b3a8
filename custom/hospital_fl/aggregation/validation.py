"""Checks a site's update must pass before the server aggregates it (pure numpy).

An update that fails is rejected with a reason naming the site's problem; the round goes
on with the others. ``norm_outliers`` flags updates whose size is far from the round's
typical one: the cheap first line against a scaled or random update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["update_problem", "update_norm", "norm_outliers", "metrics_problem"]

Weights = Mapping[str, np.ndarray]


def update_problem(update: Weights, n_samples: object, reference: Weights | None = None) -> str | None:
    """Why ``update`` must not be aggregated, or None when it is acceptable.

    Args:
        update: a site's model weights or weight differences.
        n_samples: the number of training samples the site claims.
        reference: weights whose names, shapes and dtypes the update must match (the
            global model, or the first accepted update of the round).
    """
    if not isinstance(n_samples, (int, np.integer)) or isinstance(n_samples, bool) or n_samples <= 0:
        return f"n_samples must be a positive integer, got {n_samples!r}"
    if not update:
        return "the update holds no weights"
    for key, value in update.items():
        if not isinstance(value, np.ndarray):
            return f"{key} is a {type(value).__name__}, expected a numpy array"
    if reference is not None:
        missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
        if missing:
            return f"it lacks {len(missing)} weight(s) the model has (e.g. {missing[:3]})"
        if extra:
            return f"it holds {len(extra)} weight(s) the model does not have (e.g. {extra[:3]})"
        for key, ref in reference.items():
            if update[key].shape != np.shape(ref):
                return f"{key} has shape {update[key].shape}, expected {np.shape(ref)}"
            if update[key].dtype != np.asarray(ref).dtype:
                return f"{key} has dtype {update[key].dtype}, expected {np.asarray(ref).dtype}"
    for key, value in update.items():
        if value.dtype.kind not in "fciub":
            return f"{key} has non-numeric dtype {value.dtype}"
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            return f"{key} contains NaN or infinite values"
    return None


def update_norm(update: Weights) -> float:
    """L2 norm of the whole update (all floating-point entries)."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values() if v.dtype.kind == "f"))
    )


def norm_outliers(norms: Sequence[float], factor: float) -> list[int]:
    """Indices of updates whose norm exceeds ``factor`` x the round's median norm.

    The median of a round with at least 3 updates cannot be moved far by one bad site, so
    a scaled (x50) or random update stands out; with fewer updates nothing is flagged.
    """
    if factor <= 1:
        raise ValueError(f"factor must be > 1, got {factor}")
    if len(norms) < 3:
        return []
    median = float(np.median(norms))
    return [i for i, n in enumerate(norms) if n > factor * max(median, 1e-12)]


def metrics_problem(metrics: object) -> str | None:
    """Why a site's reported metrics must not be averaged, or None when they are acceptable.

    Metrics are a flat {name: finite real number} mapping; text, NaN, infinity, booleans or
    nested values are refused before any arithmetic, so one site cannot fail the round.
    """
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        return f"its metrics are a {type(metrics).__name__}, expected a mapping of names to numbers"
    for name, value in metrics.items():
        if not isinstance(name, str):
            return f"metric name {name!r} is not text"
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            return f"metric {name!r} is a {type(value).__name__} ({str(value)[:40]!r}), expected a finite number"
        if not np.isfinite(float(value)):
            return f"metric {name!r} is {float(value)}, expected a finite number"
    return None
