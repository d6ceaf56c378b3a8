"""Benchmark: what each hospital gets from federation, per hospital, over seeds.

For each seed (split and training seed), in one process with the FLARE job's own site and
server maths (bench.federated_loop):

- per hospital, on its local test: the global model, its personalized copy (fine-tuned on the
  hospital's own training data: evaluation.clinical_report.personalization_section), the
  hospital's local-only model and the centralized model; how many hospitals get at least the
  global model's AUC from personalization (target: 4 of 5);
- the federated model's AUC on the held-out test against the best local-only model's
  (target: >= 0.95 and >= best local-only + 0.02), for plain FedAvg and for the other
  server rules named in ``methods`` (same rounds and epochs: no longer runs).

Prints JSON; run with ``hospital-fl bench clinical`` (seeds 0 1 2 by default).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from hospital_fl.aggregation.server_optimizer import ServerOptimizerConfig
from hospital_fl.bench.federated_loop import run_federated_in_process
from hospital_fl.bench.machine import machine_info
from hospital_fl.data.federated import load_federated
from hospital_fl.errors import InputError
from hospital_fl.evaluation.baselines import train_centralized, train_local_only
from hospital_fl.evaluation.clinical_report import personalization_config, personalization_section
from hospital_fl.evaluation.scoring import score_model
from hospital_fl.jobspec import SERVER_MOMENTUM, JobSpec
from hospital_fl.training.metrics import rank_auc

__all__ = ["METHODS", "run_clinical_benchmark"]

# The federated runs compared on the held-out figure: name -> run_federated_in_process arguments.
METHODS = {
    "fedavg": {},
    "fedavgm": {"server_optimizer": SERVER_MOMENTUM},  # FedAvg with server momentum (FLARE's FedOpt, SGD 1.0/0.9)
    # Lighter server momentum: 0.9 overshoots with 10 rounds and a cosine local schedule;
    # 0.5 recovers part of what averaging parallel site progress loses (docs/clinical-evaluation.md).
    "fedavgm_0.5": {"server_optimizer": ServerOptimizerConfig(kind="sgdm", lr=1.0, momentum=0.5)},
    "fedprox": {"fedprox_mu": 0.01},
}
TARGET_PERSONALIZED_SITES = 4
TARGET_AUC, TARGET_MARGIN = 0.95, 0.02


def _seed_run(spec: JobSpec, seed: int, methods: list[str], tick) -> dict:
    split = dataclasses.replace(spec.split, seed=seed)
    train = dataclasses.replace(spec.train, seed=seed, torch_threads=0)
    data = load_federated(split, spec.data_path)
    epochs = spec.num_rounds * spec.train.epochs
    held = data.held_out_test.labels
    row: dict = {"seed": seed, "methods": {}}
    fed_model = None
    for method in methods:
        t0 = time.perf_counter()
        run = run_federated_in_process(data, spec.model, train, spec.num_rounds, **METHODS[method])
        scores = score_model(run.model, data)
        row["methods"][method] = {
            "held_out_auc": rank_auc(scores.held_out, held),
            "seconds": time.perf_counter() - t0,
        }
        if method == "fedavg":
            fed_model, fed_scores = run.model, scores
        tick()
    central, _ = train_centralized(data, train, spec.model, epochs)
    local = {s.name: train_local_only(s, train, spec.model, epochs)[0] for s in data.sites}
    central_scores = score_model(central, data)
    local_scores = {name: score_model(m, data) for name, m in local.items()}
    tick()
    personalization, _ = personalization_section(
        fed_model, data, fed_scores, central_scores, local_scores, personalization_config(train)
    )
    tick()
    local_held = {name: rank_auc(s.held_out, held) for name, s in local_scores.items()}
    best_site = max(local_held, key=local_held.get)
    fed_auc = row["methods"]["fedavg"]["held_out_auc"]
    row.update(
        {
            "hospitals": {s["site"]: s["aucs"] for s in personalization["sites"]},
            "personalized_at_least_global": personalization["at_least_global"],
            "personalization_mean_gain": personalization["mean_gain"],
            "personalization_kept_global": personalization["kept_global_after_validation"],
            "federated_held_out_auc": fed_auc,
            "centralized_held_out_auc": rank_auc(central_scores.held_out, held),
            "best_local_only_held_out_auc": local_held[best_site],
            "best_local_only_site": best_site,
            "federated_minus_best_local": fed_auc - local_held[best_site],
        }
    )
    return row


def run_clinical_benchmark(spec: JobSpec, seeds: list[int], methods: list[str] | None = None, progress=None) -> dict:
    """Per-hospital and held-out figures for each seed, and their means (see the module docstring).

    Args:
        spec: rounds, local epochs, split, network and training settings (seed replaced per seed).
        seeds: split and training seeds.
        methods: federated runs for the held-out comparison (keys of METHODS; "fedavg" first
            and always, as personalization starts from its global model).
        progress: an optional rich.progress.Progress.
    """
    methods = list(dict.fromkeys(["fedavg", *(methods or METHODS)]))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError("methods", unknown, f"each must be one of {list(METHODS)}", "drop the others")
    task = progress.add_task("clinical benchmark", total=len(seeds) * (len(methods) + 2)) if progress else None

    def tick() -> None:
        if progress is not None:
            progress.update(task, advance=1)

    start = time.perf_counter()
    per_seed = [_seed_run(spec, seed, methods, tick) for seed in seeds]
    sites = list(per_seed[0]["hospitals"])
    kinds = ("global", "personalized", "local_only", "centralized")
    hospitals = {
        name: {k: float(np.mean([r["hospitals"][name][k] for r in per_seed])) for k in kinds} for name in sites
    }
    mean_fed = float(np.mean([r["federated_held_out_auc"] for r in per_seed]))
    mean_best_local = float(np.mean([r["best_local_only_held_out_auc"] for r in per_seed]))
    held_by_method = {m: float(np.mean([r["methods"][m]["held_out_auc"] for r in per_seed])) for m in methods}
    best_method = max(held_by_method, key=held_by_method.get)
    finetune = personalization_config(spec.train)
    return {
        "benchmark": "clinical: per-hospital personalization and the federated held-out figure",
        "settings": {
            "rounds": spec.num_rounds,
            "local_epochs": spec.train.epochs,
            "sites": spec.num_sites,
            "alpha": spec.split.alpha,
            "arch": spec.model.arch,
            "personalization": {
                "epochs": finetune.epochs,
                "lr": finetune.train.lr,
                "schedule": finetune.train.schedule,
                "select_on_validation": finetune.select_on_validation,
            },
            "seeds": seeds,
            "methods": methods,
        },
        "machine": machine_info(),
        "seconds": time.perf_counter() - start,
        "mean": {
            "hospitals": hospitals,
            "personalized_at_least_global": float(np.mean([r["personalized_at_least_global"] for r in per_seed])),
            "federated_held_out_auc": mean_fed,
            "best_local_only_held_out_auc": mean_best_local,
            "federated_minus_best_local": mean_fed - mean_best_local,
            "centralized_held_out_auc": float(np.mean([r["centralized_held_out_auc"] for r in per_seed])),
            "held_out_auc_by_method": held_by_method,
        },
        "targets": {
            "personalized_at_least_global_in_every_seed": all(
                r["personalized_at_least_global"] >= TARGET_PERSONALIZED_SITES for r in per_seed
            ),
            "federated_at_least_0.95": mean_fed >= TARGET_AUC,
            "federated_beats_best_local_by_0.02": mean_fed - mean_best_local >= TARGET_MARGIN,
            "best_method": best_method,
            "best_method_minus_best_local": held_by_method[best_method] - mean_best_local,
        },
        "per_seed": per_seed,
    }
