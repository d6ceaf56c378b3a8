"""Federated rounds in one process, from the same pure functions the FLARE job runs.

Each round every site runs ``run_site_round`` (with its DP mechanism, SCAFFOLD controls or
uplink compression, when any) and sends a weight difference; the server step is the
aggregator's maths: ``aggregate_round`` (validation, norm and direction screening and the
configured rule), or central client-level DP, then FedOpt's server optimiser when configured. An
optional attacking site rewrites its update or trains on flipped labels. Used by
benchmarks that sweep many settings, where starting FLARE for every point would only add
the constant start-up the overhead benchmark already measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from hospital_fl.aggregation.server_optimizer import ServerOptimizer, ServerOptimizerConfig
from hospital_fl.aggregation.strategy import AggregationConfig, aggregate_round
from hospital_fl.aggregation.weights import bounded_weights
from hospital_fl.bench.attacks import Attack, claimed_samples, poison_site, poison_update
from hospital_fl.compression.codecs import CompressionConfig, decode, encode, payload_bytes
from hospital_fl.data.federated import FederatedDataset
from hospital_fl.models.cxr import CXRClassifier, ModelConfig, build_cxr_model
from hospital_fl.privacy.accounting import epsilon_of
from hospital_fl.privacy.central import CentralClientDP
from hospital_fl.privacy.config import DPConfig
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights, set_weights
from hospital_fl.training.private_site import SitePrivacy
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
    bytes_per_round_per_site: float = 0.0  # uplink payload, mean over rounds and sites
    uncompressed_bytes_per_round_per_site: float = 0.0
    rounds: list[dict] = field(default_factory=list)  # per round: rejected sites and reasons, rule info


def run_federated_in_process(
    data: FederatedDataset,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    rounds: int,
    dp: DPConfig = DPConfig(),
    fedprox_mu: float = 0.0,
    aggregation: AggregationConfig = AggregationConfig(),
    server_optimizer: ServerOptimizerConfig | None = None,
    scaffold: bool = False,
    compression: CompressionConfig = CompressionConfig(),
    attack: Attack | None = None,
    he: object | None = None,
) -> InProcessRun:
    """Run a federation in this process with the FLARE job's site and server maths.

    ``he``: CKKSParams to run every round as an HE job does (full weights times p_i
    encrypted at each site, summed with the server's context, decrypted by the sites);
    ``he_seconds`` in the round history then times the three steps.
    """
    torch.manual_seed(train_cfg.seed)
    contexts = _he_contexts(he) if he is not None else None
    template = build_cxr_model(model_cfg)
    weights = get_weights(template)
    trainable = [k for k, _ in template.named_parameters()]
    sites = [poison_site(attack, s) if attack and i == attack.site_index else s for i, s in enumerate(data.sites)]
    privacy = (
        {
            site.name: SitePrivacy(dp, model_cfg, train_cfg, len(site.train), rounds, site.name)
            for site in sites
        }
        if dp.enabled
        else {}
    )
    central = CentralClientDP(dp, rounds) if dp.mechanism == "client-central" else None
    server_opt = ServerOptimizer(server_optimizer, weights, trainable) if server_optimizer else None
    c_global = {k: np.zeros_like(weights[k], dtype=np.float32) for k in trainable} if scaffold else None
    c_local = {site.name: dict(c_global) for site in sites} if scaffold else {}
    residuals: dict[str, dict] = {site.name: {} for site in sites}
    train_s, site_s, sent, raw, history = [], [], [], [], []
    start = time.perf_counter()
    for rnd in range(rounds):
        outcomes, updates, site_time = [], [], 0.0
        for i, site in enumerate(sites):
            t0 = time.perf_counter()
            outcome = run_site_round(
                site,
                weights,
                rnd,
                rounds,
                train_cfg,
                model_cfg,
                fedprox_mu,
                privacy.get(site.name),
                send_difference=True,
                scaffold=(c_global, c_local[site.name]) if scaffold else None,
            )
            update = outcome.weights
            if attack is not None and i == attack.site_index:
                update = poison_update(attack, update, seed=train_cfg.seed * 7919 + rnd)
            if compression.enabled:
                payload, residuals[site.name] = encode(update, compression, residuals[site.name])
                sent.append(payload_bytes(payload))
                update = decode(payload)
            else:
                sent.append(payload_bytes(update))
            raw.append(payload_bytes(outcome.weights))
            site_time += time.perf_counter() - t0
            outcomes.append(outcome)
            updates.append(update)
        train_s.append(sum(o.train_seconds for o in outcomes))
        site_s.append(site_time)
        claims = [claimed_samples(attack, i, o.n_samples) for i, o in enumerate(outcomes)]
        if contexts is not None:
            # As EncryptedFedAvg announces them: p_i from the bounded claims, not the raw ones.
            bounded, clips = bounded_weights(claims, None, aggregation.claim_cap)
            weights, info = _encrypted_round(weights, updates, bounded, he, contexts)
            sent[-len(sites) :] = [info["uplink_bytes"]] * len(sites)
            history.append(
                {
                    "round": rnd,
                    "rejected": {},
                    "he": info,
                    **({"weight_clips": [{"index": c.index, **c.as_dict()} for c in clips]} if clips else {}),
                }
            )
            continue
        if central is not None:
            step, _ = central.combine(updates)
            history.append({"round": rnd, "rejected": {}})
        else:
            result = aggregate_round(aggregation, updates, claims, reference=weights)
            history.append(
                {
                    "round": rnd,
                    "rejected": {sites[i].name: why for i, why in result.rejected.items()},
                    "cosines": {sites[i].name: c for i, c in enumerate(result.cosines) if c == c},
                    **result.info,
                }
            )
            step = result.update
            if scaffold and step is not None:
                # As RoundPolicyScaffold does: the accepted sites' control changes pass the
                # update screen (finite, the majority's layout, the norm screen) and are
                # averaged with the bounded weights; none accepted keeps the global controls.
                kept = result.accepted
                controls = aggregate_round(
                    _control_screen(aggregation),
                    [outcomes[i].control_delta for i in kept],
                    [claims[i] for i in kept],
                )
                if controls.update is not None:
                    c_global = {k: c_global[k] + controls.update[k] for k in c_global}
                if controls.rejected:
                    history[-1]["control_rejected"] = {
                        sites[kept[j]].name: why for j, why in controls.rejected.items()
                    }
                for i in kept:
                    c_local[sites[i].name] = outcomes[i].control
        if step is None:
            continue  # too few acceptable updates: the global model stays as it was
        if server_opt is not None:
            weights = server_opt.step(weights, step)
        else:
            weights = {k: (weights[k] + step[k]).astype(weights[k].dtype) for k in weights}
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
    return InProcessRun(
        model,
        seconds,
        train_s,
        site_s,
        spent,
        central_info,
        float(np.mean(sent)),
        float(np.mean(raw)),
        history,
    )


def _control_screen(aggregation: AggregationConfig) -> AggregationConfig:
    """The screen SCAFFOLD's control changes pass (hospital_fl.flare.controllers.RoundPolicyScaffold).

    No direction screen: a site's control change tracks how its own gradient drifts, which
    differs between skewed sites by design; a site whose update pointed against the others
    is already out, control change and all.
    """
    return AggregationConfig(
        outlier_factor=aggregation.outlier_factor, claim_cap=aggregation.claim_cap, min_cosine=None
    )


def _he_contexts(params) -> tuple:
    """A consortium's pair of contexts, as FLARE's HEBuilder makes them: (site, server)."""
    from hospital_fl.privacy import he

    site = he.make_context(params)
    return site, he.context_from_bytes(he.server_context_bytes(site), role="server")


def _encrypted_round(weights, updates, counts, params, contexts) -> tuple[dict, dict]:
    """One HE round: each site encrypts its full weights times p_i, the server adds, a site decrypts.

    ``counts``: each site's bounded weight (p_i = count / sum).
    """
    from hospital_fl.privacy import he

    site_ctx, server_ctx = contexts
    total = float(sum(counts))
    t0 = time.perf_counter()
    payloads = [
        he.encrypt_update(
            {k: (weights[k] + u[k]).astype(weights[k].dtype) for k in weights}, weights, n / total, site_ctx, params
        )
        for u, n in zip(updates, counts)
    ]
    t1 = time.perf_counter()
    summed = he.add_encrypted(payloads, server_ctx)
    t2 = time.perf_counter()
    new, _ = he.decrypt_update(summed, site_ctx)
    t3 = time.perf_counter()
    info = {
        "encrypt_seconds_per_site": (t1 - t0) / len(payloads),
        "aggregate_seconds": t2 - t1,
        "decrypt_seconds": t3 - t2,
        "uplink_bytes": float(np.mean([he.payload_nbytes(p) for p in payloads])),
        "downlink_bytes": he.payload_nbytes(summed),
    }
    return {k: np.asarray(new[k]).astype(weights[k].dtype) for k in weights}, info
