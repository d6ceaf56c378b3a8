"""Sensitivity and specificity at an operating threshold chosen on a site's validation data.

Screening for pneumonia fixes a sensitivity first: the threshold is the highest one whose
sensitivity on the site's validation scores reaches the target (default 0.95), so it flags
as few healthy patients as that sensitivity allows. It is then applied unchanged to the
site's test scores, where the sensitivity actually achieved is reported (it can fall below
the target: that gap is what a clinical team needs to see).

A score s is called positive when s >= threshold (as in training.metrics.binary_metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical._checks import binary_labels_and_scores

__all__ = [
    "DEFAULT_TARGET_SENSITIVITY",
    "OperatingPoint",
    "SiteOperatingPoint",
    "sensitivity_specificity",
    "site_operating_point",
    "threshold_for_sensitivity",
]

DEFAULT_TARGET_SENSITIVITY = 0.95


@dataclass(frozen=True)
class OperatingPoint:
    """Confusion counts and rates of one test set at one threshold (positive: score >= threshold)."""

    threshold: float
    tp: int
    fn: int
    tn: int
    fp: int

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp)

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "tp": self.tp,
            "fn": self.fn,
            "tn": self.tn,
            "fp": self.fp,
        }


@dataclass(frozen=True)
class SiteOperatingPoint:
    """A site's threshold for a target sensitivity, at validation (where it was chosen) and test."""

    target_sensitivity: float
    threshold: float
    validation_sensitivity: float
    test: OperatingPoint

    def to_dict(self) -> dict:
        return {
            "target_sensitivity": self.target_sensitivity,
            "threshold": self.threshold,
            "validation_sensitivity": self.validation_sensitivity,
            "test": self.test.to_dict(),
        }


def _require_both_classes(labels: np.ndarray, name: str) -> None:
    if not labels.any():
        raise InputError(
            name,
            "no positive labels",
            "sensitivity needs at least one pneumonia case",
            "use a test set holding both classes",
        )
    if labels.all():
        raise InputError(
            name,
            "no negative labels",
            "specificity needs at least one normal case",
            "use a test set holding both classes",
        )


def sensitivity_specificity(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> OperatingPoint:
    """Confusion counts at ``threshold`` (positive: score >= threshold).

    Raises:
        InputError: bad inputs, or a test set without positives or without negatives.
    """
    labels, scores = binary_labels_and_scores(y_true, y_score, probabilities=False)
    _require_both_classes(labels, "y_true")
    if not np.isfinite(threshold):
        raise InputError("threshold", threshold, "it must be a finite number", "pass e.g. 0.5")
    called = scores >= threshold
    return OperatingPoint(
        threshold=float(threshold),
        tp=int((called & labels).sum()),
        fn=int((~called & labels).sum()),
        tn=int((~called & ~labels).sum()),
        fp=int((called & ~labels).sum()),
    )


def threshold_for_sensitivity(
    y_true: np.ndarray, y_score: np.ndarray, target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
) -> float:
    """The highest threshold whose sensitivity on (y_true, y_score) is >= the target.

    Sensitivity only changes at positive scores, so the answer is one of them: the largest
    positive score s with #(positive scores >= s) / #positives >= target.

    Raises:
        InputError: the target is outside (0, 1], or there is no positive label.
    """
    if isinstance(target_sensitivity, bool) or not (
        isinstance(target_sensitivity, (int, float)) and 0 < target_sensitivity <= 1
    ):
        raise InputError(
            "target_sensitivity",
            target_sensitivity,
            "it must lie in (0, 1]",
            "pass a fraction such as 0.95 (not a percentage)",
        )
    labels, scores = binary_labels_and_scores(y_true, y_score, probabilities=False)
    if not labels.any():
        raise InputError(
            "validation y_true",
            "no positive labels",
            "a threshold for a target sensitivity needs at least one pneumonia case",
            "choose the threshold on a validation split that holds pneumonia cases",
        )
    positives = np.sort(scores[labels])[::-1]  # descending
    # sensitivity at threshold positives[k] counts every positive >= it (ties included)
    reached = np.searchsorted(-positives, -positives, side="right") / len(positives)
    return float(positives[np.argmax(reached >= target_sensitivity)])


def site_operating_point(
    val_true: np.ndarray,
    val_score: np.ndarray,
    test_true: np.ndarray,
    test_score: np.ndarray,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
) -> SiteOperatingPoint:
    """Choose the threshold on a site's validation scores, then measure it on its test scores."""
    threshold = threshold_for_sensitivity(val_true, val_score, target_sensitivity)
    labels, scores = binary_labels_and_scores(val_true, val_score, probabilities=False)
    return SiteOperatingPoint(
        target_sensitivity=float(target_sensitivity),
        threshold=threshold,
        validation_sensitivity=float((scores[labels] >= threshold).mean()),
        test=sensitivity_specificity(test_true, test_score, threshold),
    )
