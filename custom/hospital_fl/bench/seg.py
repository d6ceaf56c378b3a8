"""Segmentation benchmark: federated vs centralized vs local-only Dice across 3 sites.

Two real patients cannot show learning, so the benchmark uses a synthetic non-IID
federation (MONAI's create_test_image_3d spheres with per-site noise, gain, lesion count and
size; hospital_fl.segmentation.synthetic) and says so in its output. Federations run in one
process with the FLARE job's own site round (hospital_fl.segmentation.site_round), the
job's sample-weighted FedAvg with server momentum (FedAvgM, as seg_fedavg runs it) and plain
FedAvg for comparison, without FLARE's start-up. Centralized training gets the pooled
training cases for the same number of epochs; local-only trains each site alone. Every
model is scored by sliding-window Dice on every site's validation cases. Also reports the
peak memory of one CPU training step on a 128^3 crop. Run: ``hospital-fl bench seg --json``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from hospital_fl.aggregation.server_optimizer import ServerOptimizer, ServerOptimizerConfig
from hospital_fl.aggregation.weighted import weighted_mean
from hospital_fl.bench.machine import machine_info
from hospital_fl.jobspec import SERVER_MOMENTUM
from hospital_fl.models.seg import SegModelConfig, build_seg_model
from hospital_fl.segmentation.datalist import validate_datalist
from hospital_fl.segmentation.pipeline import SegPipelineConfig, SegTrainConfig, evaluate, peak_step_memory
from hospital_fl.segmentation.site_round import get_weights, run_seg_round, set_weights
from hospital_fl.segmentation.synthetic import SYNTHETIC_DESCRIPTION, write_synthetic_federation

__all__ = ["run_seg_benchmark", "TARGET_GAP"]

TARGET_GAP = 0.02  # federated Dice within this of centralized (pooled validation cases)


def _initial(model_cfg: SegModelConfig, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return get_weights(build_seg_model(model_cfg))


def _train_rounds(
    sites: dict[str, list], val: dict[str, list], rounds: int, model_cfg, pipe_cfg, train_cfg, seed, server=None
):
    """FedAvg over ``sites`` (one site: plain training for ``rounds`` epochs), with the job's
    server optimiser when given (FedAvgM, as FLARE's FedOpt controller applies it); seconds per round."""
    weights, seconds = _initial(model_cfg, seed), []
    trainable = [k for k, _ in build_seg_model(model_cfg).named_parameters()]
    stepper = ServerOptimizer(server, weights, trainable) if server is not None else None
    for rnd in range(rounds):
        tick = time.perf_counter()
        outcomes = [
            run_seg_round(
                cases, val.get(name, []), weights, rnd, rounds, model_cfg, pipe_cfg, train_cfg, send_difference=True
            )
            for name, cases in sites.items()
        ]
        step = weighted_mean([o.weights for o in outcomes], [o.n_samples for o in outcomes])
        if stepper is not None:
            weights = stepper.step(weights, step)
        else:
            weights = {k: (weights[k] + step[k]).astype(weights[k].dtype) for k in weights}
        seconds.append(time.perf_counter() - tick)
    return weights, seconds


def _dice_by_site(weights, val: dict[str, list], model_cfg, pipe_cfg, train_cfg) -> dict[str, float]:
    model = build_seg_model(model_cfg)
    set_weights(model, weights)
    scores = {name: evaluate(model, cases, pipe_cfg, train_cfg) for name, cases in val.items()}
    per_site = {name: s["mean_dice"] for name, s in scores.items()}
    cases = sum(s["cases"] for s in scores.values())
    per_site["pooled"] = sum(s["mean_dice"] * s["cases"] for s in scores.values()) / cases
    return per_site


def run_seg_benchmark(
    workdir: str | Path,
    rounds: int = 10,
    seeds: list[int] = (0,),
    model_cfg: SegModelConfig = SegModelConfig(),
    pipe_cfg: SegPipelineConfig = SegPipelineConfig(spacing=None, roi_size=(48, 48, 48)),
    train_cfg: SegTrainConfig = SegTrainConfig(),
    memory_roi: tuple[int, int, int] | None = (128, 128, 128),
    server_optimizer: ServerOptimizerConfig | None = SERVER_MOMENTUM,
    progress=None,
) -> dict:
    rows = []
    task = progress.add_task("segmentation benchmark", total=len(seeds) * 6) if progress else None
    for seed in seeds:
        lists = write_synthetic_federation(Path(workdir) / f"synthetic_{seed}", seed=seed)
        train, val = {}, {}
        for name, path in lists.items():
            if name == "pooled":
                continue
            report = validate_datalist(path)
            train[name], val[name] = report.require("training"), report.usable.get("validation", [])
        tcfg = dataclasses.replace(train_cfg, seed=seed)
        fed, fed_s = _train_rounds(train, val, rounds, model_cfg, pipe_cfg, tcfg, seed, server_optimizer)
        _advance(progress, task)
        plain, _ = _train_rounds(train, val, rounds, model_cfg, pipe_cfg, tcfg, seed)
        _advance(progress, task)
        pooled = {"pooled": [c for cases in train.values() for c in cases]}
        central, central_s = _train_rounds(pooled, {}, rounds, model_cfg, pipe_cfg, tcfg, seed)
        _advance(progress, task)
        local = {}
        for name in train:
            local[name], _ = _train_rounds({name: train[name]}, {}, rounds, model_cfg, pipe_cfg, tcfg, seed)
        _advance(progress, task)
        row = {
            "seed": seed,
            "federated": _dice_by_site(fed, val, model_cfg, pipe_cfg, tcfg),
            "federated_plain_fedavg": _dice_by_site(plain, val, model_cfg, pipe_cfg, tcfg),
            "centralized": _dice_by_site(central, val, model_cfg, pipe_cfg, tcfg),
            "local_only": {name: _dice_by_site(w, val, model_cfg, pipe_cfg, tcfg) for name, w in local.items()},
            "seconds_per_round_federated": float(np.mean(fed_s)),
            "seconds_per_epoch_centralized": float(np.mean(central_s)),
            "cases": {name: {"training": len(train[name]), "validation": len(val[name])} for name in train},
        }
        _advance(progress, task, 2)
        rows.append(row)
    fed = float(np.mean([r["federated"]["pooled"] for r in rows]))
    plain = float(np.mean([r["federated_plain_fedavg"]["pooled"] for r in rows]))
    cen = float(np.mean([r["centralized"]["pooled"] for r in rows]))
    local_own = float(np.mean([r["local_only"][s][s] for r in rows for s in r["local_only"]]))
    memory = peak_step_memory(model_cfg, roi=memory_roi) if memory_roi else None
    return {
        "benchmark": "segmentation",
        "ok": abs(fed - cen) <= TARGET_GAP,
        "target": f"|federated - centralized| Dice <= {TARGET_GAP} on the pooled validation cases",
        "data": SYNTHETIC_DESCRIPTION + "; 3 non-IID sites (12/8/5 volumes of 64^3, 75/25 train/validation)",
        "rounds": rounds,
        "seeds": list(seeds),
        "dice_federated": fed,
        "server_optimizer": dataclasses.asdict(server_optimizer) if server_optimizer else None,
        "dice_federated_plain_fedavg": plain,
        "dice_centralized": cen,
        "dice_local_only_own_site_mean": local_own,
        "gap_federated_centralized": fed - cen,
        "seconds_per_round_federated_cpu": float(np.mean([r["seconds_per_round_federated"] for r in rows])),
        "peak_memory_one_cpu_step": memory,
        "model": dataclasses.asdict(model_cfg),
        "pipeline": dataclasses.asdict(pipe_cfg),
        "runs": rows,
        "machine": machine_info(),
        "command": "hospital-fl bench seg --json",
    }


def _advance(progress, task, n: int = 1) -> None:
    if progress is not None:
        progress.update(task, advance=n)
