"""Federated rounds in one process, from the same pure functions the FLARE job runs.

Each round every site runs ``run_site_round`` (with its DP mechanism, when any) and the
server step is the aggregator's maths: sample-weighted mean of full weights or of
differences, or central client-level DP. Used by benchmarks that sweep many settings,
where starting FLARE for every point would only add the constant start-up the overhead
benchmark already measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hospital_fl.aggregation.weighted import weighted_mean
from hospital_fl.data.federated import FederatedDataset
from hospital_fl.models.cxr import CXRClassifier, ModelConfig, build_cxr_model
from hospital_fl.privacy.accounting import epsilon_of
from hospital_fl.privacy.central import CentralClientDP
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.site import SitePrivacy
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights, set_weights
from hospital_fl.training.site_round import run_site_round

__all__ = ["InProcessRun", "run_federated_in_process"]


@dataclass(frozen=True)
class InProcessRun:
    model: CXRClassifier
    seconds: float
    train_seconds_per_round: list[float]  # summed over sites
    site_seconds_per_round: list[float]  # whole site work (scoring, training, DP release), summed
    privacy: dict[str, dict]  # per site: mechanism, epsilon, delta (empty without DP)
    central_dp: dict | None


def run_federated_in_process(
    data: FederatedDataset,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    rounds: int,
    dp: DPConfig = DPConfig(),
    fedprox_mu: float = 0.0,
) -> InProcessRun:
    torch.manual_seed(train_cfg.seed)
    weights = get_weights(build_cxr_model(model_cfg))
    privacy = (
        {
            site.name: SitePrivacy(dp, model_cfg, train_cfg, len(site.train), rounds, site.name, train_cfg.seed)
            for site in data.sites
        }
        if dp.enabled
        else {}
    )
    central = CentralClientDP(dp, rounds, seed=train_cfg.seed) if dp.mechanism == "client-central" else None
    train_s, site_s = [], []
    start = time.perf_counter()
    for rnd in range(rounds):
        outcomes, site_time = [], 0.0
        for site in data.sites:
            t0 = time.perf_counter()
            outcomes.append(
                run_site_round(site, weights, rnd, rounds, train_cfg, model_cfg, fedprox_mu, privacy.get(site.name))
            )
            site_time += time.perf_counter() - t0
        train_s.append(sum(o.train_seconds for o in outcomes))
        site_s.append(site_time)
        if central is not None:
            update, _ = central.combine([o.weights for o in outcomes])
        else:
            update = weighted_mean([o.weights for o in outcomes], [o.n_samples for o in outcomes])
        if outcomes[0].params_type == "DIFF":
            weights = {k: (weights[k] + update[k]).astype(weights[k].dtype) for k in weights}
        else:
            weights = update
    seconds = time.perf_counter() - start
    model = build_cxr_model(model_cfg)
    set_weights(model, weights)
    spent = {
        name: {
            "mechanism": dp.mechanism,
            "delta": dp.delta,
            "epsilon": epsilon_of(list(p.planned_releases().values()), dp.delta, dp.accountant),
            "training_epsilon": epsilon_of(
                [r for m, r in p.planned_releases().items() if m != "metrics"], dp.delta, dp.accountant
            ),
            **p.noise_summary(),
        }
        for name, p in privacy.items()
    }
    central_info = (
        {"noise_multiplier": central.noise_multiplier, "epsilon": central.epsilon_spent(), "delta": dp.delta}
        if central
        else None
    )
    return InProcessRun(model, seconds, train_s, site_s, spent, central_info)
