"""Monitoring metrics a site sends, released through a Gaussian mechanism.

Per round a site draws a Poisson sample of its training records (rate q = min(1,
METRICS_SAMPLE/n): cheap at large sites, and subsampling amplifies privacy) and releases
three sums over it, each bounded per record:
the record count (sensitivity 1), the per-record loss clipped to [0, LOSS_BOUND] and the
per-record gradient norm clipped to [0, GRAD_NORM_BOUND]. Each gets Gaussian noise of
std z * bound, i.e. three (z, q) releases per round, accounted apart from training under
the job's ``metrics_budget`` (part of the job's total epsilon). Means (and the count scaled by
1/q) are post-processing. The sample and the noise come from the OS's cryptographic source
(hospital_fl.privacy.randomness) unless a test passes its own generator.
"""

from __future__ import annotations

import numpy as np

from hospital_fl.privacy.accounting import Release
from hospital_fl.privacy.randomness import privacy_rng

__all__ = [
    "METRICS_SAMPLE",
    "metrics_sample_rate",
    "poisson_sample",
    "LOSS_BOUND",
    "GRAD_NORM_BOUND",
    "RELEASES_PER_ROUND",
    "metric_releases",
    "release_metrics",
]

LOSS_BOUND = 5.0  # BCE per record; above this a record is confidently wrong either way
GRAD_NORM_BOUND = 10.0
RELEASES_PER_ROUND = 3
METRICS_SAMPLE = 256  # expected records per round's metric sample


def metrics_sample_rate(n_samples: int) -> float:
    return min(1.0, METRICS_SAMPLE / max(n_samples, 1))


def metric_releases(noise_multiplier: float, sample_rate: float, rounds: int) -> list[Release]:
    return [(noise_multiplier, sample_rate, RELEASES_PER_ROUND * rounds)]


def poisson_sample(n_samples: int, sample_rate: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of a Poisson sample: each record kept independently with ``sample_rate``."""
    rng = rng or privacy_rng()
    return np.flatnonzero(rng.random(n_samples) < sample_rate)


def release_metrics(
    losses: np.ndarray,
    grad_norms: np.ndarray,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
    sample_rate: float = 1.0,
) -> dict[str, float]:
    """Noisy {n_samples, train_loss, grad_norm} from the per-record losses and gradient
    norms of a Poisson sample drawn at ``sample_rate`` (n_samples estimates the whole site)."""
    rng = rng or privacy_rng()
    n = len(losses)
    noisy_n = n + rng.normal(0.0, noise_multiplier)
    loss_sum = float(np.clip(losses, 0.0, LOSS_BOUND).sum()) + rng.normal(0.0, noise_multiplier * LOSS_BOUND)
    grad_sum = float(np.clip(grad_norms, 0.0, GRAD_NORM_BOUND).sum()) + rng.normal(
        0.0, noise_multiplier * GRAD_NORM_BOUND
    )
    denom = max(noisy_n, 1.0)
    return {
        "n_samples": float(max(noisy_n / sample_rate, 1.0)),
        "train_loss": float(np.clip(loss_sum / denom, 0.0, LOSS_BOUND)),
        "grad_norm": float(np.clip(grad_sum / denom, 0.0, GRAD_NORM_BOUND)),
    }
