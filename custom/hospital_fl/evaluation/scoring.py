"""Score a model on the held-out test split and on every site's local test portion."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hospital_fl.data.federated import FederatedDataset
from hospital_fl.training.loops import predict_proba
from hospital_fl.training.metrics import binary_metrics, bootstrap_auc_ci, rank_auc

__all__ = ["ModelScores", "score_model", "model_aucs", "summarize"]


@dataclass(frozen=True)
class ModelScores:
    """Predicted probabilities: held-out test and each site's local test (same order as sites)."""

    held_out: np.ndarray
    per_site: dict[str, np.ndarray]


def score_model(model: torch.nn.Module, data: FederatedDataset, device: str = "auto") -> ModelScores:
    return ModelScores(
        held_out=predict_proba(model, data.held_out_test.images, device),
        per_site={s.name: predict_proba(model, s.test.images, device) for s in data.sites},
    )


def model_aucs(model: torch.nn.Module, data: FederatedDataset) -> tuple[float, dict[str, float]]:
    """AUC on the held-out test split, and on each site's local test portion."""
    scores = score_model(model, data)
    held = rank_auc(scores.held_out, data.held_out_test.labels)
    return held, {s.name: rank_auc(scores.per_site[s.name], s.test.labels) for s in data.sites}


def summarize(probs: np.ndarray, labels: np.ndarray, n_boot: int = 1000) -> dict:
    """Point metrics at threshold 0.5 plus a bootstrap 95% CI of the AUC."""
    out = binary_metrics(probs, labels)
    out["auc_ci95"] = list(bootstrap_auc_ci(probs, labels, n_boot=n_boot))
    return out
