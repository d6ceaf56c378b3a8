"""Percentile bootstrap confidence intervals for any metric of (labels, scores).

training.metrics.bootstrap_auc_ci gives the report's AUC interval; this module generalises
it to any metric and says how many resamples counted. Resamples are drawn exactly as there
(one ``rng.integers(0, n, n)`` per resample from ``default_rng(seed)``), so for the AUC both
give the same interval. A resample that holds only one class has no AUC (the metric returns
NaN): it is skipped and counted in ``n_skipped``; the interval is refused when more than
``max_skipped_fraction`` of the resamples had to be skipped, because the remaining ones are
then a biased subset (a test set with very few cases of one class).

The seed is for reproducible evaluation; it is not privacy randomness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical._checks import binary_labels_and_scores
from hospital_fl.training.metrics import rank_auc

__all__ = ["ConfidenceInterval", "bootstrap_auc", "bootstrap_ci"]

MetricFn = Callable[[np.ndarray, np.ndarray], float]  # (scores, labels) -> value, like rank_auc


@dataclass(frozen=True)
class ConfidenceInterval:
    """A point estimate on the full data and its percentile bootstrap interval.

    Attributes:
        estimate: the metric on the full (not resampled) data.
        low / high: the (1 - level) / 2 and (1 + level) / 2 percentiles over valid resamples.
        level: e.g. 0.95.
        n_boot: resamples drawn.
        n_skipped: resamples where the metric was undefined (NaN), e.g. one class only.
    """

    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    n_skipped: int

    def to_dict(self) -> dict:
        return {
            "estimate": self.estimate,
            "ci": [self.low, self.high],
            "level": self.level,
            "n_boot": self.n_boot,
            "n_skipped": self.n_skipped,
        }


def bootstrap_ci(
    metric: MetricFn,
    y_true: np.ndarray,
    y_score: np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    max_skipped_fraction: float = 0.5,
) -> ConfidenceInterval:
    """Percentile bootstrap interval of ``metric(scores, labels)``.

    Args:
        metric: called as metric(scores, labels) (training.metrics' order); NaN means
            "undefined on this resample".
        y_true: (N,) 0/1 labels.
        y_score: (N,) scores (any real numbers).
        n_boot: resamples (>= 100).
        level: interval coverage in (0, 1).
        seed: seeds numpy's generator, for reproducible reports.
        max_skipped_fraction: refuse when more resamples than this were undefined.

    Raises:
        InputError: bad inputs, a metric undefined on the full data, or too many
            undefined resamples.
    """
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 100:
        raise InputError("n_boot", n_boot, "it must be an integer >= 100", "use 1000 (the report's default)")
    if not 0 < level < 1:
        raise InputError("level", level, "it must lie in (0, 1)", "use 0.95 for a 95% interval")
    labels, scores = binary_labels_and_scores(y_true, y_score, probabilities=False)
    labels = labels.astype(np.int64)
    estimate = float(metric(scores, labels))
    if not np.isfinite(estimate):
        raise InputError(
            "y_true",
            f"{int(labels.sum())} positives of {len(labels)}",
            "the metric is undefined on the full data (an AUC needs both classes)",
            "evaluate on a test set holding both classes",
        )
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = np.array([metric(scores[idx], labels[idx]) for idx in (rng.integers(0, n, n) for _ in range(n_boot))])
    valid = values[np.isfinite(values)]
    skipped = n_boot - len(valid)
    if skipped > max_skipped_fraction * n_boot:
        raise InputError(
            "y_true",
            f"{int(labels.sum())} positives of {n}; {skipped} of {n_boot} resamples undefined",
            f"at most {max_skipped_fraction:.0%} of resamples may lack a class",
            "report no interval for this site, or pool more test images",
        )
    tail = (1 - level) / 2 * 100
    return ConfidenceInterval(
        estimate=estimate,
        low=float(np.percentile(valid, tail)),
        high=float(np.percentile(valid, 100 - tail)),
        level=float(level),
        n_boot=int(n_boot),
        n_skipped=int(skipped),
    )


def bootstrap_auc(
    y_true: np.ndarray, y_score: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> ConfidenceInterval:
    """AUC (training.metrics.rank_auc) with its percentile bootstrap interval."""
    return bootstrap_ci(rank_auc, y_true, y_score, n_boot=n_boot, level=level, seed=seed)
