"""The main job: federated pneumonia detection on the embedded chest X-rays, with report.

Runs the FLARE job (simulator or a real POC system) and, in the same FLARE session, FLARE's
cross-site evaluation of its models (each hospital scores the global model and every
hospital's local model on its own local test and sends back only the AUC with its bootstrap
CI); trains the centralized and local-only baselines with the same epoch budget; scores all
of them on the held-out test split and on every hospital's local test portion; adds the
clinical sections (personalization, operating points, calibration, Grad-CAM:
evaluation.clinical_report) and writes OUT/report.json, OUT/report.md, plots and the model
card (model_card.md, and model_card.html: the whole report with every plot in one page).

Personalization runs at the hospitals in a deployment; here it runs in this process, site by
site, each fine-tuning reading only that site's training data.
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

from hospital_fl.data.federated import FederatedDataset, load_federated
from hospital_fl.data.pneumoniamnist import EMBEDDED_SHA256
from hospital_fl.errors import InputError
from hospital_fl.evaluation.baselines import train_centralized, train_local_only
from hospital_fl.evaluation.clinical.model_card import model_card_from_report, write_model_card
from hospital_fl.evaluation.clinical_render import card_sections
from hospital_fl.evaluation.clinical_report import (
    ClinicalConfig,
    calibration_section,
    cross_site_section,
    gradcam_section,
    operating_point_section,
    personalization_config,
    personalization_section,
)
from hospital_fl.evaluation.plots import plot_roc, plot_rounds, plot_sites
from hospital_fl.evaluation.report import attach_clinical, build_report, write_report
from hospital_fl.evaluation.scoring import score_model
from hospital_fl.flare.runners.simulator import FederatedRun
from hospital_fl.jobspec import JobSpec
from hospital_fl.models.cxr import build_cxr_model
from hospital_fl.training.loops import set_weights
from hospital_fl.training.metrics import bootstrap_auc_ci

__all__ = [
    "CLINICAL_FILES",
    "OUTPUT_FILES",
    "DemoConfig",
    "co_located_threads",
    "cross_site_skipped",
    "global_weights",
    "run_demo",
]

OUTPUT_FILES = ("report.json", "report.md", "roc.png", "rounds.png", "sites.png", "global_model.pt")
CLINICAL_FILES = (
    "cross_site.png",
    "personalization.png",
    "reliability.png",
    "gradcam.png",
    "model_card.md",
    "model_card.html",
)
PLOT_CAPTIONS = {
    "roc.png": "ROC on the held-out test split",
    "rounds.png": "Global model AUC per round",
    "sites.png": "Per-hospital AUC: federated, local-only, centralized",
    "cross_site.png": "Cross-site evaluation: every model on every hospital's local test (AUC, 95% CI)",
    "personalization.png": "Personalization per hospital",
    "reliability.png": "Calibration (reliability diagram, held-out test)",
    "gradcam.png": "Grad-CAM of correct and wrong held-out predictions (see the caveat)",
}


@dataclass(frozen=True)
class DemoConfig:
    spec: JobSpec = field(default_factory=JobSpec)
    mode: Literal["simulator", "poc"] = "simulator"
    out_dir: Path = Path("out")
    workspace: Path = Path("workspace")
    plots: bool = True
    job_dir: Path | None = None  # a POC run submits this folder as is (spec must be read from it)
    cross_site: bool = True  # FLARE's cross-site evaluation after training, in the same session
    clinical: bool = True  # personalization, operating points, calibration, Grad-CAM, model card

    def __post_init__(self):
        if self.mode not in ("simulator", "poc"):
            raise InputError("mode", self.mode, "it must be simulator or poc", "use --poc for a POC system")


def co_located_threads(num_sites: int) -> int:
    """Torch threads per simulated site so all sites on this machine share its cores."""
    return max(1, (os.cpu_count() or 1) // num_sites)


def cross_site_skipped(cfg: DemoConfig) -> str | None:
    """Why the run has no cross-site evaluation, or None when it has one."""
    if not cfg.cross_site:
        return "turned off for this run"
    if cfg.spec.he is not None:
        return (
            "an HE job's server holds only the encrypted global model, and a hospital's plaintext local model would "
            "show the update HE hides"
        )
    if cfg.spec.privacy.enabled:
        return "under DP each hospital keeps its scores"
    if cfg.job_dir is not None:
        return f"the job folder {cfg.job_dir} runs as it is; submit jobs/cxr_cross_site_eval after it"
    return None


def _run_federated(cfg: DemoConfig, on_round: Callable[[int], None]) -> tuple[FederatedRun, dict | None, float]:
    """(the training run, FLARE's cross-site results or None, seconds the cross-site evaluation took).

    Training and cross-site evaluation are one FLARE job; the evaluation's seconds come from
    the server's log (CrossSiteModelEval's start to the job's end) and are taken off the
    run's wall time, which then covers training as before."""
    if cross_site_skipped(cfg) is not None:
        return _run_training(cfg, on_round), None, 0.0
    from hospital_fl.flare.cross_site import cross_site_seconds
    from hospital_fl.flare.runners.cross_site import run_training_with_cross_site

    run, results = run_training_with_cross_site(cfg.spec, cfg.workspace, cfg.mode, on_round)
    evaluation_s = cross_site_seconds(run.result_dir) or 0.0
    return dataclasses.replace(run, wall_seconds=max(run.wall_seconds - evaluation_s, 0.0)), results, evaluation_s


def _run_training(cfg: DemoConfig, on_round: Callable[[int], None]) -> FederatedRun:
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


def _clinical_sections(
    cfg: DemoConfig,
    data: FederatedDataset,
    fed_model: torch.nn.Module,
    scores: dict,
    cross_site: tuple[dict | None, float],
) -> tuple[dict, dict, dict]:
    """(report.json's clinical sections, per-site federated AUC CI, per-site personalized AUC)."""
    spec, plots_dir = cfg.spec, cfg.out_dir if cfg.plots else None
    fed, central, local = scores["federated"], scores["centralized"], scores["local_only"]
    clinical = ClinicalConfig(personalization=personalization_config(spec.train), seed=spec.train.seed)
    results, evaluation_s = cross_site
    sections: dict = {}
    if results is None:
        sections["cross_site"] = {"not_run": cross_site_skipped(cfg)}
        site_ci = {s.name: list(bootstrap_auc_ci(fed.per_site[s.name], s.test.labels)) for s in data.sites}
    else:
        from hospital_fl.flare.cross_site import cross_site_matrix

        matrix, missing = cross_site_matrix(results, data.site_names)
        sections["cross_site"] = {**cross_site_section(matrix, missing, plots_dir), "seconds": evaluation_s}
        site_ci = (
            {s: [matrix.cell("global", s).low, matrix.cell("global", s).high] for s in matrix.sites}
            if "global" in matrix.models
            else {}
        )
    if not cfg.clinical:
        return sections, site_ci, {}
    sections["personalization"], _ = personalization_section(
        fed_model, data, fed, central, local, clinical.personalization, plots_dir
    )
    sections["operating_points"] = operating_point_section(fed_model, data, fed, clinical.target_sensitivity)
    sections["calibration"] = calibration_section(data, fed, central, clinical.calibration_bins, plots_dir)
    sections["gradcam"] = gradcam_section(fed_model, data, clinical, plots_dir)
    sections["model_card"] = {"markdown": "model_card.md", "html": "model_card.html"}
    personalized = {s["site"]: s["aucs"]["personalized"] for s in sections["personalization"]["sites"]}
    return sections, site_ci, personalized


def _failure_modes(report: dict) -> list[str]:
    """Measured weaknesses the model card lists beside the report's flags."""
    out = []
    op = report.get("operating_points")
    for name, entry in (op or {}).get("sites", {}).items():
        achieved = entry["consortium_threshold"]["sensitivity"]
        if achieved < op["target_sensitivity"] - 0.02:
            out.append(
                f"{name}: at the consortium threshold the local-test sensitivity is {achieved:.3f}, below the "
                f"{op['target_sensitivity']:g} it was chosen for"
            )
    for name, ece in (report.get("calibration") or {}).get("sites", {}).items():
        if ece > 0.1:
            out.append(f"{name}: predicted probabilities are poorly calibrated on its local test (ECE {ece:.3f})")
    return out


def _write_model_card(cfg: DemoConfig, report: dict) -> None:
    plots = {PLOT_CAPTIONS[n]: cfg.out_dir / n for n in PLOT_CAPTIONS if (cfg.out_dir / n).is_file()}
    card = model_card_from_report(
        report,
        job=cfg.spec.name,
        site_auc_ci95={s["name"]: s["auc_ci95"] for s in report["sites"] if "auc_ci95" in s},
        known_failure_modes=_failure_modes(report),
        plots=plots,
        dataset_sha256=EMBEDDED_SHA256 if cfg.spec.data_path is None and cfg.spec.site_data is None else None,
        sections=card_sections(report),
    )
    write_model_card(card, cfg.out_dir)


def run_demo(cfg: DemoConfig, progress=None) -> dict:
    """Run everything and write the report; returns report.json's content.

    Args:
        cfg: what to run and where to write.
        progress: an optional rich.progress.Progress to show the phases on.
    """
    spec = cfg.spec
    for name in OUTPUT_FILES + CLINICAL_FILES:  # never leave an old report beside a failed run
        (cfg.out_dir / name).unlink(missing_ok=True)
    data = load_federated(spec.split, spec.data_path)
    if spec.privacy.enabled:  # refuse a bad delta here, not inside five FLARE processes
        for site in data.sites:
            spec.privacy.check_delta_for(len(site.train), f"site {site.name}")
    epochs = spec.num_rounds * spec.train.epochs
    task = (lambda desc, total: progress.add_task(desc, total=total)) if progress else (lambda d, t: None)
    advance = (lambda t, **kw: progress.update(t, **kw)) if progress else (lambda t, **kw: None)

    skipped = cross_site_skipped(cfg)
    fed_task = task(f"federated ({cfg.mode}): rounds" + ("" if skipped else ", then cross-site"), spec.num_rounds)
    run, cross_site_results, cross_site_s = _run_federated(cfg, lambda k: advance(fed_task, completed=k))
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

    eval_task = task("evaluation + clinical report", 1)
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
            "job": spec.name,
            "cross_site": skipped is None,
        },
    )
    report["timing"]["cross_site_seconds"] = cross_site_s
    scores = {"federated": fed_scores, "centralized": central_scores, "local_only": local_scores}
    sections, site_ci, personalized = _clinical_sections(
        cfg, data, fed_model, scores, (cross_site_results, cross_site_s)
    )
    report = attach_clinical(report, sections, site_ci, personalized)
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
    write_report(report, cfg.out_dir)
    if cfg.clinical:
        _write_model_card(cfg, report)
    if run.global_model_path.suffix == ".pt":
        shutil.copy2(run.global_model_path, cfg.out_dir / "global_model.pt")
    else:  # HE: the decrypted weights, in the layout FLARE's persistor writes
        torch.save({"model": {k: torch.as_tensor(v) for k, v in fed_weights.items()}}, cfg.out_dir / "global_model.pt")
    advance(eval_task, advance=1)
    return report
