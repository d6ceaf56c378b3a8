"""Input checks shared by the clinical metrics: scores and binary labels of one test set."""

from __future__ import annotations

import numpy as np

from hospital_fl.errors import InputError

__all__ = ["binary_labels_and_scores"]


def binary_labels_and_scores(
    y_true: np.ndarray, y_score: np.ndarray, *, probabilities: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(labels as bool, scores as float64), both 1-D and of equal length, or InputError.

    Args:
        y_true: 0/1 (or bool) labels.
        y_score: one score per image; with ``probabilities`` they must lie in [0, 1].
    """
    labels = np.asarray(y_true).reshape(-1)
    scores = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if len(labels) != len(scores):
        raise InputError(
            "y_true/y_score",
            f"{len(labels)} labels, {len(scores)} scores",
            "there must be one score per label",
            "score every test image once and pass the labels in the same order",
        )
    if len(labels) == 0:
        raise InputError("y_true", "0 labels", "at least one image is needed", "pass a non-empty test set")
    if not np.isin(labels, (0, 1)).all():
        raise InputError(
            "y_true", sorted(set(np.unique(labels).tolist()))[:5], "labels must be 0 or 1", "binarise the labels"
        )
    if not np.isfinite(scores).all():
        raise InputError(
            "y_score",
            f"{int((~np.isfinite(scores)).sum())} non-finite values",
            "scores must be finite",
            "drop the images the model could not score, or fix the model",
        )
    if probabilities and (scores.min() < 0 or scores.max() > 1):
        raise InputError(
            "y_score",
            f"range [{scores.min():.4g}, {scores.max():.4g}]",
            "probabilities must lie in [0, 1]",
            "pass sigmoid probabilities (training.loops.predict_proba), not logits",
        )
    return labels.astype(bool), scores
