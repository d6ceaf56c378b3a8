"""One federated round at one hospital, as a pure function of plain data.

Evaluate the received global weights on the site's own validation and test portions
(what the site reports to the consortium), then continue training from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from hospital_fl.data.federated import SiteData
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights, predict_proba, set_weights, train_local
from hospital_fl.training.metrics import rank_auc

__all__ = ["RoundOutcome", "run_site_round"]


@dataclass(frozen=True)
class RoundOutcome:
    weights: dict[str, np.ndarray]
    metrics: dict[str, float]
    n_samples: int
    train_seconds: float


def run_site_round(
    site: SiteData,
    global_weights: dict[str, np.ndarray],
    round_index: int,
    total_rounds: int,
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    fedprox_mu: float = 0.0,
) -> RoundOutcome:
    """Score the global model at this site, then train it locally for one round."""
    model = build_cxr_model(model_cfg)
    set_weights(model, global_weights)
    metrics = {
        "val_auc": rank_auc(predict_proba(model, site.val.images, train_cfg.device), site.val.labels),
        "test_auc": rank_auc(predict_proba(model, site.test.images, train_cfg.device), site.test.labels),
    }
    cfg = dataclasses.replace(train_cfg, seed=train_cfg.seed * 1000 + round_index)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()} if fedprox_mu > 0 else None
    result = train_local(
        model,
        site.train.images,
        site.train.labels,
        cfg,
        anchor=anchor,
        fedprox_mu=fedprox_mu,
        epoch_offset=round_index * cfg.epochs,
        total_epochs=total_rounds * cfg.epochs,
    )
    metrics["train_loss"] = result.mean_loss
    return RoundOutcome(get_weights(model), metrics, len(site.train), result.seconds)
