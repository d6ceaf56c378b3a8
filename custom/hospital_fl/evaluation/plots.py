"""Plots a clinical team reads: ROC curves, AUC per round, per-site bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hospital_fl.training.metrics import roc_curve  # noqa: E402

__all__ = ["plot_roc", "plot_rounds", "plot_sites"]


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray, path: Path) -> Path:
    """ROC of each named model's held-out probabilities."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, probs in curves.items():
        fpr, tpr = roc_curve(probs, labels)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC on the held-out test split")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_rounds(report: dict, path: Path) -> Path:
    """AUC of the global model per round, as the sites measured it on their local test data."""
    curve = report["rounds_curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [c["round"] for c in curve],
        [c["site_weighted_test_auc"] for c in curve],
        marker="o",
        label="global model at round start (sites' local tests)",
    )
    ax.axhline(report["federated"]["auc"], c="C1", ls="--", label="final federated (held-out test)")
    ax.axhline(report["centralized"]["auc"], c="C2", ls=":", label="centralized (held-out test)")
    ax.set(xlabel="round", ylabel="AUC", title="Global model AUC per round", ylim=(0.4, 1.0))
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_sites(report: dict, path: Path) -> Path:
    """Per-site AUC on each site's local test: federated vs local-only vs centralized."""
    sites = report["sites"]
    x = np.arange(len(sites))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (key, name) in enumerate(
        (("auc", "federated"), ("auc_local_only", "local-only"), ("auc_centralized", "centralized"))
    ):
        ax.bar(x + (i - 1) * 0.27, [s[key] for s in sites], width=0.27, label=name)
    ax.set_xticks(x, [f"{s['name']}\n(n={s['n_train']}, {s['positive_fraction']:.0%} pos)" for s in sites], fontsize=8)
    ax.set(ylabel="AUC on the site's local test", ylim=(0.5, 1.0), title="Per-hospital AUC")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
