"""Byzantine-robust aggregation rules over {name: ndarray} updates (pure numpy).

Each rule takes the round's accepted updates (weight differences to the global model) and
returns one combined difference. Updates are flattened into an (n_sites, n_values)
float32 matrix once, so every rule costs O(n_sites x n_values) (Krum: plus one n x n Gram
matrix), i.e. linear in the number of sites for a fixed model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "flatten_updates",
    "unflatten",
    "trimmed_mean",
    "coordinate_median",
    "norm_bounded_mean",
    "krum_scores",
    "multi_krum",
]

Weights = Mapping[str, np.ndarray]


def flatten_updates(updates: Sequence[Weights]) -> tuple[np.ndarray, list[tuple[str, tuple, np.dtype]]]:
    """Stack updates into an (n, d) float32 matrix plus the layout to undo it."""
    layout = [(k, np.shape(v), np.asarray(v).dtype) for k, v in updates[0].items()]
    d = sum(int(np.prod(s)) for _, s, _ in layout)
    matrix = np.empty((len(updates), d), dtype=np.float32)
    for i, u in enumerate(updates):
        offset = 0
        for key, shape, _ in layout:
            size = int(np.prod(shape))
            matrix[i, offset : offset + size] = np.asarray(u[key], dtype=np.float32).ravel()
            offset += size
    return matrix, layout


def unflatten(vector: np.ndarray, layout: list[tuple[str, tuple, np.dtype]]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for key, shape, dtype in layout:
        size = int(np.prod(shape))
        part = vector[offset : offset + size].reshape(shape)
        out[key] = np.rint(part).astype(dtype) if np.dtype(dtype).kind in "iub" else part.astype(dtype)
        offset += size
    return out


def _need(n: int, minimum: int, rule: str) -> None:
    if n < minimum:
        raise ValueError(f"{rule} needs at least {minimum} updates, got {n}")


def trimmed_mean(updates: Sequence[Weights], trim: int) -> dict[str, np.ndarray]:
    """Coordinate-wise mean after dropping the ``trim`` largest and ``trim`` smallest values."""
    _need(len(updates), 2 * trim + 1, f"a trimmed mean dropping {trim} per side")
    matrix, layout = flatten_updates(updates)
    if trim:
        matrix.sort(axis=0)
        matrix = matrix[trim : len(updates) - trim]
    return unflatten(matrix.mean(axis=0), layout)


def coordinate_median(updates: Sequence[Weights]) -> dict[str, np.ndarray]:
    """Coordinate-wise median."""
    _need(len(updates), 1, "the median")
    matrix, layout = flatten_updates(updates)
    return unflatten(np.median(matrix, axis=0), layout)


def norm_bounded_mean(
    updates: Sequence[Weights], weights: Sequence[float], bound: float | None = None
) -> tuple[dict[str, np.ndarray], float]:
    """Weighted mean after scaling every update down to L2 norm <= ``bound``.

    With ``bound=None`` the bound is the round's median update norm, so an honest majority
    sets it and a single scaled update contributes no more than a typical one.
    Returns the mean and the bound used.
    """
    _need(len(updates), 1, "a norm-bounded mean")
    matrix, layout = flatten_updates(updates)
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    bound = float(np.median(norms)) if bound is None else float(bound)
    scale = np.minimum(1.0, bound / np.maximum(norms, 1e-12))
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return unflatten((w * scale).astype(np.float32) @ matrix, layout), bound


def krum_scores(matrix: np.ndarray, byzantine: int) -> np.ndarray:
    """Krum score of each row: summed squared distance to its n - f - 2 nearest others."""
    n = len(matrix)
    _need(n, 2 * byzantine + 3, f"Krum tolerating {byzantine} faulty site(s)")
    sq = np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64)
    dist = sq[:, None] + sq[None, :] - 2.0 * (matrix @ matrix.T).astype(np.float64)
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(np.maximum(dist, 0.0), axis=1)[:, : n - byzantine - 2]
    return nearest.sum(axis=1)


def multi_krum(
    updates: Sequence[Weights], weights: Sequence[float], byzantine: int, select: int
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Weighted mean of the ``select`` updates with the lowest Krum scores (select=1: Krum).

    Returns the mean and the indices of the selected updates.
    """
    if not 1 <= select <= len(updates):
        raise ValueError(f"select must lie in 1..{len(updates)}, got {select}")
    matrix, layout = flatten_updates(updates)
    chosen = sorted(np.argsort(krum_scores(matrix, byzantine), kind="stable")[:select].tolist())
    w = np.asarray([weights[i] for i in chosen], dtype=np.float64)
    w = (w / w.sum()).astype(np.float32)
    return unflatten(w @ matrix[chosen], layout), chosen
