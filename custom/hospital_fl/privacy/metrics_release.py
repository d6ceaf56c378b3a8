"""Monitoring metrics a site sends, released through a Gaussian mechanism.

Per round a site releases three sums over its training records, each bounded per record:
the record count (sensitivity 1), the per-record loss clipped to [0, LOSS_BOUND] and the
per-record gradient norm clipped to [0, GRAD_NORM_BOUND]. Each gets Gaussian noise of
std z * bound, i.e. three (z, q=1) releases per round, accounted apart from training
under the job's ``metrics_epsilon``. Means are post-processing of the noisy sums.
"""

from __future__ import annotations

import numpy as np

from hospital_fl.privacy.accounting import Release

__all__ = ["LOSS_BOUND", "GRAD_NORM_BOUND", "RELEASES_PER_ROUND", "metric_releases", "release_metrics"]

LOSS_BOUND = 5.0  # BCE per record; above this a record is confidently wrong either way
GRAD_NORM_BOUND = 10.0
RELEASES_PER_ROUND = 3


def metric_releases(noise_multiplier: float, rounds: int) -> list[Release]:
    return [(noise_multiplier, 1.0, RELEASES_PER_ROUND * rounds)]


def release_metrics(
    losses: np.ndarray, grad_norms: np.ndarray, noise_multiplier: float, rng: np.random.Generator
) -> dict[str, float]:
    """Noisy {n_samples, train_loss, grad_norm} from per-record losses and gradient norms."""
    n = len(losses)
    noisy_n = n + rng.normal(0.0, noise_multiplier)
    loss_sum = float(np.clip(losses, 0.0, LOSS_BOUND).sum()) + rng.normal(0.0, noise_multiplier * LOSS_BOUND)
    grad_sum = float(np.clip(grad_norms, 0.0, GRAD_NORM_BOUND).sum()) + rng.normal(
        0.0, noise_multiplier * GRAD_NORM_BOUND
    )
    denom = max(noisy_n, 1.0)
    return {
        "n_samples": float(max(noisy_n, 1.0)),
        "train_loss": float(np.clip(loss_sum / denom, 0.0, LOSS_BOUND)),
        "grad_norm": float(np.clip(grad_sum / denom, 0.0, GRAD_NORM_BOUND)),
    }
