"""One federated round at one hospital, as a pure function of plain data.

Evaluate the received global weights on the site's own validation and test portions,
then continue training from them. Without privacy the site reports those scores and its
sample count and sends full weights. With a DP mechanism (``privacy``), the scores stay at
the site (``local_metrics``), only DP-released metrics leave it, and the update is sent
as a difference to the global weights (noised first for local client-level DP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from hospital_fl.data.federated import SiteData
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.training.private_site import SitePrivacy
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights, predict_proba, set_weights, train_local
from hospital_fl.training.metrics import rank_auc, reportable_metrics
from hospital_fl.training.scaffold import control_update, correction

__all__ = ["RoundOutcome", "run_site_round", "score_global"]


@dataclass(frozen=True)
class RoundOutcome:
    """What a site sends (weights, metrics, n_samples) and what it keeps (local_metrics)."""

    weights: dict[str, np.ndarray]
    metrics: dict[str, float]
    n_samples: int
    train_seconds: float
    params_type: Literal["FULL", "DIFF"] = "FULL"
    local_metrics: dict[str, float] = field(default_factory=dict)
    # SCAFFOLD: the site's new control variate (kept) and its change (sent).
    control: dict[str, np.ndarray] | None = None
    control_delta: dict[str, np.ndarray] | None = None


def run_site_round(
    site: SiteData,
    global_weights: dict[str, np.ndarray],
    round_index: int,
    total_rounds: int,
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    fedprox_mu: float = 0.0,
    privacy: SitePrivacy | None = None,
    send_difference: bool = False,
    scaffold: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
) -> RoundOutcome:
    """Score the global model at this site, then train it locally for one round.

    Args:
        send_difference: send trained minus received weights (what robust aggregation and
            top-k compression work on) instead of full weights; DP always does.
        scaffold: (server control c, this site's control c_i) to run SCAFFOLD's corrected
            local training; the outcome then carries c_i's new value and its change.
    """
    model = privacy.model if privacy else build_cxr_model(model_cfg)
    set_weights(model, global_weights)
    scores = _scores(model, site, train_cfg.device)
    cfg = dataclasses.replace(train_cfg, seed=train_cfg.seed * 1000 + round_index)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()} if fedprox_mu > 0 else None
    schedule = dict(epoch_offset=round_index * cfg.epochs, total_epochs=total_rounds * cfg.epochs)
    if scaffold is not None and privacy is not None:
        raise ValueError("SCAFFOLD's control variates are not covered by the DP accounting; use FedAvg/FedProx with DP")
    if privacy and privacy.dpsgd:
        result = privacy.dpsgd.train_round(
            site.train.images, site.train.labels, cfg.seed, anchor=anchor, fedprox_mu=fedprox_mu, **schedule
        )
    else:
        control = correction(*scaffold) if scaffold is not None else None
        result = train_local(
            model,
            site.train.images,
            site.train.labels,
            cfg,
            anchor=anchor,
            fedprox_mu=fedprox_mu,
            control=control,
            **schedule,
        )
    trained = get_weights(model)
    if privacy is None:
        metrics = reportable_metrics({**scores, "train_loss": result.mean_loss})
        new_control = control_delta = None
        if scaffold is not None:
            new_control, control_delta = control_update(*scaffold, global_weights, trained, result.lr_sum)
        if send_difference:
            trained = _difference(trained, global_weights)
        return RoundOutcome(
            trained,
            metrics,
            len(site.train),
            result.seconds,
            "DIFF" if send_difference else "FULL",
            dict(metrics),
            new_control,
            control_delta,
        )
    released = privacy.released_metrics(site.train.images, site.train.labels)
    delta = _difference(trained, global_weights)
    return RoundOutcome(
        weights=privacy.privatize_update(delta),
        metrics=reportable_metrics({"train_loss": released["train_loss"], "grad_norm": released["grad_norm"]}),
        n_samples=max(1, int(round(released["n_samples"]))),
        train_seconds=result.seconds,
        params_type="DIFF",
        local_metrics={**scores, "train_loss": result.mean_loss},
    )


def _difference(trained: dict[str, np.ndarray], global_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: trained[k] - np.asarray(global_weights[k]).astype(trained[k].dtype) for k in trained}


def _scores(model, site: SiteData, device: str) -> dict[str, float]:
    return {
        "val_auc": rank_auc(predict_proba(model, site.val.images, device), site.val.labels),
        "test_auc": rank_auc(predict_proba(model, site.test.images, device), site.test.labels),
    }


def score_global(
    site: SiteData, weights: dict[str, np.ndarray], model_cfg: ModelConfig, device: str = "cpu"
) -> dict[str, float]:
    """AUC of ``weights`` on this site's validation and local test portions."""
    model = build_cxr_model(model_cfg)
    set_weights(model, weights)
    return _scores(model, site, device)
