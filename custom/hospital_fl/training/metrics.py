"""Classification metrics: MONAI for the point estimates, a rank AUC for fast bootstrap."""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_roc_auc, get_confusion_matrix

__all__ = ["binary_metrics", "roc_auc", "rank_auc", "bootstrap_auc_ci", "roc_curve", "reportable_metrics"]


def reportable_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics a site sends: those it could compute. An AUC on a one-class validation split
    is NaN; the server rejects a whole update that carries a non-finite metric (a lying site
    could send one), so an honest site leaves such a metric out instead."""
    return {
        name: float(v)
        for name, v in metrics.items()
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)
    }


def roc_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """AUC via MONAI (macro over columns for multi-label)."""
    return float(compute_roc_auc(torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels)))


def rank_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC (ties counted half): same value as roc_auc, vectorised for bootstrap."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(probs, kind="mergesort")
    ranks = np.empty(len(probs))
    sorted_p = np.asarray(probs)[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auc_ci(probs: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the AUC."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = [rank_auc(probs[idx], labels[idx]) for idx in (rng.integers(0, n, n) for _ in range(n_boot))]
    values = np.asarray(values)[~np.isnan(values)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def binary_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity and F1 at ``threshold`` (MONAI metrics)."""
    labels = np.asarray(labels).reshape(-1)
    pred = (np.asarray(probs).reshape(-1) >= threshold).astype(np.float32)
    y_pred = torch.as_tensor(np.stack([1 - pred, pred], 1))
    y = torch.as_tensor(np.stack([1 - labels, labels], 1).astype(np.float32))
    # per-sample matrices summed over the batch: one (tp, fp, tn, fn) for the positive class
    cm = get_confusion_matrix(y_pred, y, include_background=False).sum(dim=0)
    out = {"auc": roc_auc(probs, labels)}
    for key, name in (
        ("accuracy", "accuracy"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("f1", "f1 score"),
    ):
        out[key] = float(compute_confusion_matrix_metric(name, cm).reshape(-1)[0])
    return out


def roc_curve(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct threshold."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(probs), kind="mergesort")
    tp = np.concatenate([[0], np.cumsum(labels[order])])
    fp = np.concatenate([[0], np.cumsum(~labels[order])])
    return fp / max(fp[-1], 1), tp / max(tp[-1], 1)
