"""Calibration of predicted pneumonia probabilities: ECE and reliability-diagram data.

Definition used throughout (positive-class, equal-width binning):

- the range [0, 1] is cut into ``n_bins`` equal bins; an image with probability p falls in
  bin ``min(floor(p * n_bins), n_bins - 1)``, so bin b holds b/B <= p < (b+1)/B and the last
  bin also holds p = 1;
- per non-empty bin: mean predicted probability (the "confidence" of the bin) and the
  observed fraction of pneumonia cases among its images;
- ECE = sum over bins of (n_b / N) * |mean probability_b - positive fraction_b|.

This is the binary reliability view a clinician reads ("of the X-rays the model called 70%
pneumonia, how many had pneumonia?"), not the top-label ECE of multi-class papers, which
folds p < 0.5 onto 1 - p.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical._checks import binary_labels_and_scores

__all__ = ["ReliabilityDiagram", "expected_calibration_error", "plot_reliability", "reliability_diagram"]


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin data of a reliability diagram; NaN where a bin holds no image.

    Attributes:
        edges: the n_bins + 1 bin edges, 0 ... 1.
        mean_confidence: mean predicted probability per bin.
        positive_fraction: observed fraction of positive labels per bin.
        counts: images per bin.
        ece: expected calibration error over these bins (see the module docstring).
    """

    edges: np.ndarray
    mean_confidence: np.ndarray
    positive_fraction: np.ndarray
    counts: np.ndarray
    ece: float

    @property
    def n_bins(self) -> int:
        return len(self.counts)


def _check_bins(n_bins: int) -> None:
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise InputError("n_bins", n_bins, "it must be an integer >= 1", "use e.g. 10 (or 5 for a small test set)")


def reliability_diagram(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> ReliabilityDiagram:
    """Bin predicted probabilities into ``n_bins`` equal-width bins and compare each bin's
    mean probability with its observed positive fraction.

    Args:
        y_true: (N,) 0/1 labels.
        y_prob: (N,) predicted probabilities of the positive class, in [0, 1].
        n_bins: number of equal-width bins over [0, 1].

    Raises:
        InputError: mismatched lengths, non-binary labels, probabilities outside [0, 1],
            or n_bins < 1.
    """
    _check_bins(n_bins)
    labels, probs = binary_labels_and_scores(y_true, y_prob)
    bins = np.minimum(np.floor(probs * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    prob_sum = np.bincount(bins, weights=probs, minlength=n_bins)
    pos_sum = np.bincount(bins, weights=labels.astype(np.float64), minlength=n_bins)
    filled = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(filled, prob_sum / np.maximum(counts, 1), np.nan)
        pos_frac = np.where(filled, pos_sum / np.maximum(counts, 1), np.nan)
    gaps = np.abs(mean_conf[filled] - pos_frac[filled])
    ece = float(np.sum(counts[filled] / len(probs) * gaps))
    return ReliabilityDiagram(
        edges=np.linspace(0.0, 1.0, n_bins + 1),
        mean_confidence=mean_conf,
        positive_fraction=pos_frac,
        counts=counts,
        ece=ece,
    )


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> float:
    """ECE with ``n_bins`` equal-width bins (definition in the module docstring); 0 is perfect."""
    return reliability_diagram(y_true, y_prob, n_bins).ece


def plot_reliability(diagrams: dict[str, ReliabilityDiagram], path: str | Path, title: str = "Calibration") -> Path:
    """Reliability diagram of one or more named models (observed pneumonia fraction against
    mean predicted probability per bin, the diagonal being perfect calibration), with the
    number of images per bin underneath; writes a PNG and returns its path."""
    from hospital_fl.evaluation.clinical._figures import plt, save_figure

    if not diagrams:
        raise InputError(
            "diagrams", {}, "at least one model's diagram is needed", "pass {name: reliability_diagram(...)}"
        )
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfect calibration")
    n = len(diagrams)
    for i, (name, d) in enumerate(diagrams.items()):
        filled = d.counts > 0
        ax.plot(d.mean_confidence[filled], d.positive_fraction[filled], marker="o", label=f"{name} (ECE {d.ece:.3f})")
        width = (d.edges[1] - d.edges[0]) / n
        ax_n.bar(d.edges[:-1] + width * i, d.counts, width=width, align="edge", label=name)
    ax.set(ylabel="observed pneumonia fraction", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    ax_n.set(xlabel="predicted probability of pneumonia", ylabel="images")
    return save_figure(fig, path)
