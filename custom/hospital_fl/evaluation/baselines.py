"""What the consortium compares federated training against, with the same epoch budget.

- centralized: one model trained on every hospital's training data pooled (the ceiling
  that federated learning tries to reach without moving data);
- local-only: each hospital trains alone on its own data (what it has without the consortium).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from hospital_fl.data.federated import FederatedDataset, SiteData
from hospital_fl.models.cxr import CXRClassifier, ModelConfig, build_cxr_model
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import train_local

__all__ = ["train_centralized", "train_local_only"]


def _train(
    images: np.ndarray, labels: np.ndarray, train_cfg: TrainConfig, model_cfg: ModelConfig, epochs: int
) -> tuple[CXRClassifier, float]:
    torch.manual_seed(train_cfg.seed)
    model = build_cxr_model(model_cfg)
    result = train_local(model, images, labels, dataclasses.replace(train_cfg, epochs=epochs))
    return model, result.seconds


def train_centralized(
    data: FederatedDataset, train_cfg: TrainConfig, model_cfg: ModelConfig, epochs: int
) -> tuple[CXRClassifier, float]:
    """Train on all sites' training portions pooled; returns (model, training seconds)."""
    pooled = data.pooled("train")
    return _train(pooled.images, pooled.labels, train_cfg, model_cfg, epochs)


def train_local_only(
    site: SiteData, train_cfg: TrainConfig, model_cfg: ModelConfig, epochs: int
) -> tuple[CXRClassifier, float]:
    """Train on one site's own training portion; returns (model, training seconds)."""
    return _train(site.train.images, site.train.labels, train_cfg, model_cfg, epochs)
