"""The main job: federated pneumonia detection on the embedded chest X-rays, with report.

Runs the FLARE job (simulator or a real POC system), trains the centralized and
local-only baselines with the same epoch budget, scores all of them on the held-out test
split and on every hospital's local test portion, and writes OUT/report.json,
OUT/report.md and plots.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from hospital_fl.data.federated import load_federated
from hospital_fl.errors import InputError
from hospital_fl.evaluation.baselines import train_centralized, train_local_only
from hospital_fl.evaluation.plots import plot_roc, plot_rounds, plot_sites
from hospital_fl.evaluation.report import build_report, write_report
from hospital_fl.evaluation.scoring import score_model
from hospital_fl.flare.runners.simulator import FederatedRun
from hospital_fl.jobspec import JobSpec
from hospital_fl.models.cxr import build_cxr_model
from hospital_fl.training.loops import set_weights

__all__ = ["DemoConfig", "run_demo", "co_located_threads", "global_weights", "OUTPUT_FILES"]

OUTPUT_FILES = ("report.json", "report.md", "roc.png", "rounds.png", "sites.png", "global_model.pt")


@dataclass(frozen=True)
class DemoConfig:
    spec: JobSpec = field(default_factory=JobSpec)
    mode: Literal["simulator", "poc"] = "simulator"
    out_dir: Path = Path("out")
    workspace: Path = Path("workspace")
    plots: bool = True
    job_dir: Path | None = None  # a POC run submits this folder as is (spec must be read from it)

    def __post_init__(self):
        if self.mode not in ("simulator", "poc"):
            raise InputError("mode", self.mode, "it must be simulator or poc", "use --poc for a POC system")


def co_located_threads(num_sites: int) -> int:
    """Torch threads per simulated site so all sites on this machine share its cores."""
    return max(1, (os.cpu_count() or 1) // num_sites)


def _run_federated(cfg: DemoConfig, on_round: Callable[[int], None]) -> FederatedRun:
    if cfg.mode == "poc":
        from hospital_fl.flare.runners.poc import run_in_poc

        return run_in_poc(cfg.spec, cfg.workspace, on_round=on_round, job_dir=cfg.job_dir)
    from hospital_fl.flare.runners.simulator import run_in_simulator

    return run_in_simulator(cfg.spec, cfg.workspace, on_round=on_round)


def global_weights(run: FederatedRun, workspace: Path) -> dict:
    """The job's final global weights. An HE job's server holds only ciphertext: the report,
    like any hospital, decrypts it with a site's kit context (the POC's site-1)."""
    if run.global_model_path.suffix == ".ckks":
        from hospital_fl.flare.he import load_payload
        from hospital_fl.privacy import he

        kit_context = next(Path(workspace).resolve().rglob("site-1/startup/client_context.tenseal"))
        weights, _ = he.decrypt_update(load_payload(run.global_model_path), he.load_context(kit_context, role="client"))
        return weights
    checkpoint = torch.load(run.global_model_path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in checkpoint["model"].items()}


def _load_global_model(weights: dict, spec: JobSpec) -> torch.nn.Module:
    model = build_cxr_model(spec.model)
    set_weights(model, weights)
    return model


def run_demo(cfg: DemoConfig, progress=None) -> dict:
    """Run everything and write the report; returns report.json's content.

    Args:
        cfg: what to run and where to write.
        progress: an optional rich.progress.Progress to show the phases on.
    """
    spec = cfg.spec
    for name in OUTPUT_FILES:  # never leave an old report beside a failed run
        (cfg.out_dir / name).unlink(missing_ok=True)
    data = load_federated(spec.split, spec.data_path)
    if spec.privacy.enabled:  # refuse a bad delta here, not inside five FLARE processes
        for site in data.sites:
            spec.privacy.check_delta_for(len(site.train), f"site {site.name}")
    epochs = spec.num_rounds * spec.train.epochs
    task = (lambda desc, total: progress.add_task(desc, total=total)) if progress else (lambda d, t: None)
    advance = (lambda t, **kw: progress.update(t, **kw)) if progress else (lambda t, **kw: None)

    fed_task = task(f"federated ({cfg.mode}): rounds", spec.num_rounds)
    run = _run_federated(cfg, lambda k: advance(fed_task, completed=k))
    advance(fed_task, completed=spec.num_rounds)
    fed_weights = global_weights(run, cfg.workspace)
    fed_model = _load_global_model(fed_weights, spec)

    base_task = task("baselines: centralized + local-only", 1 + spec.num_sites)
    baseline_cfg = dataclasses.replace(spec.train, torch_threads=0)
    central_model, _ = train_centralized(data, baseline_cfg, spec.model, epochs)
    advance(base_task, advance=1)
    local_models = {}
    for site in data.sites:
        local_models[site.name], _ = train_local_only(site, baseline_cfg, spec.model, epochs)
        advance(base_task, advance=1)

    eval_task = task("evaluation + report", 1)
    fed_scores = score_model(fed_model, data)
    central_scores = score_model(central_model, data)
    local_scores = {name: score_model(m, data) for name, m in local_models.items()}
    report = build_report(
        task=spec.model.task,
        mode=cfg.mode,
        rounds=spec.num_rounds,
        data=data,
        federated=fed_scores,
        centralized=central_scores,
        local_only=local_scores,
        history=run.history,
        wall_seconds=run.wall_seconds,
        settings={
            "algorithm": spec.algorithm,
            "split": dataclasses.asdict(spec.split),
            "model": dataclasses.asdict(spec.model),
            "train": dataclasses.asdict(spec.train),
            "privacy": dataclasses.asdict(spec.privacy),
            "aggregation": dataclasses.asdict(spec.aggregation),
            "min_clients": spec.min_clients or spec.num_sites,
            "round_timeout": spec.round_timeout,
            "uplink": spec.uplink.codec,
            "downlink": spec.downlink.codec,
            "he": spec.he.to_json() if spec.he else None,
            "flare_result": str(run.result_dir),
        },
    )
    write_report(report, cfg.out_dir)
    if cfg.plots:
        labels = data.held_out_test.labels
        best = report["local_only"]["best_site"]
        plot_roc(
            {
                "federated": fed_scores.held_out,
                "centralized": central_scores.held_out,
                f"local-only ({best})": local_scores[best].held_out,
            },
            labels,
            cfg.out_dir / "roc.png",
        )
        plot_rounds(report, cfg.out_dir / "rounds.png")
        plot_sites(report, cfg.out_dir / "sites.png")
    if run.global_model_path.suffix == ".pt":
        shutil.copy2(run.global_model_path, cfg.out_dir / "global_model.pt")
    else:  # HE: the decrypted weights, in the layout FLARE's persistor writes
        torch.save({"model": {k: torch.as_tensor(v) for k, v in fed_weights.items()}}, cfg.out_dir / "global_model.pt")
    advance(eval_task, advance=1)
    return report
