"""Benchmark: federated vs centralized vs local-only, FLARE overhead, bytes per round.

Prints JSON; run with ``hospital-fl bench`` (defaults: the demo settings, seeds 0 1 2).
Figures are means over seeds, with the per-seed values beside them. The FLARE overhead
is measured two ways: wall / the slowest site's training per round, summed (the report's
overhead_ratio), and wall / the same rounds of the same training run in one process
without FLARE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from hospital_fl.apps.cxr_demo import DemoConfig, co_located_threads, run_demo
from hospital_fl.bench.federated_loop import run_federated_in_process
from hospital_fl.bench.machine import machine_info
from hospital_fl.data.federated import load_federated
from hospital_fl.jobspec import JobSpec

__all__ = ["run_benchmark", "time_without_flare"]


def time_without_flare(spec: JobSpec) -> float:
    """Seconds for the same rounds of the same site training and averaging, in one
    process with no FLARE: the floor any federated runtime is compared with."""
    run = run_federated_in_process(
        load_federated(spec.split, spec.data_path),
        spec.model,
        spec.train,
        spec.num_rounds,
        spec.privacy,
        spec.fedprox_mu if spec.algorithm == "fedprox" else 0.0,
    )
    return run.seconds


def run_benchmark(spec: JobSpec, seeds: list[int], workspace: Path, stock: bool = False) -> dict:
    per_seed = []
    for seed in seeds:
        seed_spec = dataclasses.replace(
            spec,
            split=dataclasses.replace(spec.split, seed=seed),
            train=dataclasses.replace(spec.train, seed=seed, torch_threads=co_located_threads(spec.num_sites)),
        )
        report = run_demo(
            DemoConfig(spec=seed_spec, out_dir=workspace / f"seed{seed}", workspace=workspace / "flare", plots=False)
        )
        no_flare = time_without_flare(
            dataclasses.replace(seed_spec, train=dataclasses.replace(seed_spec.train, torch_threads=0))
        )
        row = {
            "seed": seed,
            "federated_auc": report["federated"]["auc"],
            "federated_min_site_auc": report["federated"]["min_site_auc"],
            "centralized_auc": report["centralized"]["auc"],
            "local_only_mean_auc": report["local_only"]["mean_auc"],
            "local_only_best_auc": report["local_only"]["best_auc"],
            "wall_seconds": report["timing"]["wall_seconds"],
            "client_train_seconds": report["timing"]["client_train_seconds"],
            "overhead_ratio": report["timing"]["overhead_ratio"],
            "no_flare_seconds": no_flare,
            "overhead_vs_no_flare": report["timing"]["wall_seconds"] / no_flare,
            "bytes_per_round_per_site": report["communication"]["bytes_per_round_per_site"],
        }
        if stock:
            from hospital_fl.flare.stock.fedavg import run_stock_fedavg

            row["stock_fedavg_wall_seconds"] = run_stock_fedavg(seed_spec, workspace / "stock")
            row["stock_overhead_vs_no_flare"] = row["stock_fedavg_wall_seconds"] / no_flare
        per_seed.append(row)
    keys = [k for k in per_seed[0] if k != "seed"]
    mean = {k: float(np.mean([r[k] for r in per_seed])) for k in keys}
    return {
        "benchmark": "cxr federated vs centralized vs local-only",
        "settings": {
            "algorithm": spec.algorithm,
            "rounds": spec.num_rounds,
            "sites": spec.num_sites,
            "alpha": spec.split.alpha,
            "local_epochs": spec.train.epochs,
            "arch": spec.model.arch,
            "seeds": seeds,
        },
        "machine": machine_info(),
        "mean": mean,
        "per_seed": per_seed,
        "federated_minus_centralized": mean["federated_auc"] - mean["centralized_auc"],
        "federated_minus_best_local": mean["federated_auc"] - mean["local_only_best_auc"],
    }
