"""Client-level DP on plain {name: ndarray} updates: clipping, Gaussian noise, adaptive clip.

A site's update (trained weights minus the received global weights) is clipped to L2 norm
C, so replacing a site's entire dataset changes it by at most C; Gaussian noise of std z*C
then makes each release (z, q=1) Gaussian mechanism. Locally (each site adds z*C) or
centrally (the server averages m clipped updates and adds z*C/m to the mean).

Adaptive clipping (Andrew et al., "Differentially Private Learning with Adaptive
Clipping", 2021): C <- C * exp(-lr * (b - gamma)), where b is the noisy fraction of sites
whose update norm was within C and gamma the target quantile. The count is a second
Gaussian release, accounted with the updates.

Noise comes from the OS's cryptographic source (hospital_fl.privacy.randomness) unless a
caller passes its own generator (tests of the maths only; no mechanism does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hospital_fl.privacy.accounting import Release
from hospital_fl.privacy.randomness import privacy_rng

__all__ = [
    "update_norm",
    "clip_update",
    "add_gaussian_noise",
    "privatize_local",
    "central_dp_mean",
    "adapt_clip_norm",
    "client_level_releases",
    "COUNT_NOISE_RATIO",
]

Update = Mapping[str, np.ndarray]
# Noise on the adaptive-clipping count, relative to the update noise multiplier: at 3x its
# RDP cost is 1/9 of the updates' (a small share of the budget).
COUNT_NOISE_RATIO = 3.0


def _is_float(a: np.ndarray) -> bool:
    return np.asarray(a).dtype.kind == "f"


def update_norm(update: Update) -> float:
    """Global L2 norm over every floating-point entry."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in update.values() if _is_float(v)))
    )


def clip_update(update: Update, clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``update`` to norm <= clip_norm; returns (clipped, original norm)."""
    norm = update_norm(update)
    factor = min(1.0, clip_norm / (norm + 1e-12))
    return {
        k: (np.asarray(v) * factor).astype(np.asarray(v).dtype) if _is_float(v) else v for k, v in update.items()
    }, norm


def add_gaussian_noise(update: Update, std: float, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    rng = rng or privacy_rng()
    return {
        k: (np.asarray(v) + rng.normal(0.0, std, np.shape(v))).astype(np.asarray(v).dtype) if _is_float(v) else v
        for k, v in update.items()
    }


def privatize_local(
    update: Update, clip_norm: float, noise_multiplier: float, rng: np.random.Generator | None = None
) -> tuple[dict[str, np.ndarray], float]:
    """Local client-level DP: clip to C, add N(0, (z*C)^2) per coordinate."""
    clipped, norm = clip_update(update, clip_norm)
    return add_gaussian_noise(clipped, noise_multiplier * clip_norm, rng), norm


def central_dp_mean(
    updates: Sequence[Update], clip_norm: float, noise_multiplier: float, rng: np.random.Generator | None = None
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Central client-level DP: the unweighted mean of the clipped updates plus
    N(0, (z*C/m)^2). Equal weights: weighting by sample count would let one large site
    move the mean by more than C/m."""
    if not updates:
        raise ValueError("central_dp_mean needs at least one update")
    clipped, norms = zip(*(clip_update(u, clip_norm) for u in updates))
    m = len(updates)
    mean = {
        k: (sum(np.asarray(c[k], np.float64) for c in clipped) / m).astype(np.asarray(v).dtype) if _is_float(v) else v
        for k, v in clipped[0].items()
    }
    return add_gaussian_noise(mean, noise_multiplier * clip_norm / m, rng), list(norms)


def adapt_clip_norm(
    clip_norm: float,
    norms: Sequence[float],
    target_quantile: float,
    learning_rate: float,
    count_noise_std: float,
    rng: np.random.Generator | None = None,
) -> float:
    """The next round's clip norm from this round's update norms (geometric update)."""
    rng = rng or privacy_rng()
    within = sum(1.0 for n in norms if n <= clip_norm) + rng.normal(0.0, count_noise_std)
    fraction = float(np.clip(within / max(len(norms), 1), 0.0, 1.0))
    return float(clip_norm * np.exp(-learning_rate * (fraction - target_quantile)))


def client_level_releases(noise_multiplier: float, rounds: int, adaptive: bool) -> list[Release]:
    """What ``rounds`` of client-level DP release: the updates, plus the clip count when adaptive."""
    releases: list[Release] = [(noise_multiplier, 1.0, rounds)]
    if adaptive:
        releases.append((noise_multiplier * COUNT_NOISE_RATIO, 1.0, rounds))
    return releases
