"""The segmentation demo: a short federation on the embedded real brain MRI, with report.

Two real patients (contrast-enhanced T1 with expert tumour masks) are two hospitals, each
training and validating on its own volume: a smoke run of the whole pipeline through real
FLARE (datalist validation, MONAI preprocessing, label-aware crops, SegResNet, FedAvg,
sliding-window Dice and HD95), not a measure of accuracy. Writes OUT/report.json (each
site's Dice under sites[].dice), OUT/report.md, OUT/seg_rounds.png and the global model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hospital_fl.apps.cxr_demo import global_weights
from hospital_fl.data.splits import site_names
from hospital_fl.errors import InputError
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.flare.recipes.seg import build_seg_recipe, export_seg_job
from hospital_fl.flare.runners.simulator import FederatedRun, run_recipe_in_simulator, simulator_env
from hospital_fl.jobspec import SegJobSpec
from hospital_fl.models.seg import build_seg_model
from hospital_fl.privacy.he_params import CKKSParams
from hospital_fl.segmentation.datalist import validate_datalist
from hospital_fl.segmentation.pipeline import SegTrainConfig, evaluate
from hospital_fl.segmentation.sample import write_sample_datalists
from hospital_fl.segmentation.site_round import set_weights

__all__ = ["SegDemoConfig", "run_seg_demo", "SEG_OUTPUT_FILES", "demo_spec"]

SEG_OUTPUT_FILES = ("report.json", "report.md", "seg_rounds.png", "global_model.pt")


def demo_spec(datalist_dir: Path, rounds: int = 3, torch_threads: int = 1) -> SegJobSpec:
    """The demo job: 2 sites, a few rounds of a few steps each (CPU-sized)."""
    return SegJobSpec(
        name="seg_demo",
        num_sites=2,
        num_rounds=rounds,
        datalist=str(datalist_dir / "{site}" / "datalist.json"),
        train=SegTrainConfig(steps_per_epoch=4, torch_threads=torch_threads),
        wait_after_min=0,
    )


@dataclass(frozen=True)
class SegDemoConfig:
    rounds: int = 3
    mode: str = "simulator"
    out_dir: Path = Path("out/seg")
    workspace: Path = Path("workspace")
    plots: bool = True
    spec: SegJobSpec | None = field(default=None)  # None: demo_spec over the embedded sample
    he: bool = False  # homomorphic encryption (POC only: the kits carry the contexts)

    def __post_init__(self):
        if self.mode not in ("simulator", "poc"):
            raise InputError("mode", self.mode, "it must be simulator or poc", "use --poc for a POC system")
        if self.rounds < 1:
            raise InputError("rounds", self.rounds, "it must be >= 1", "use --rounds 3")
        if self.he and self.mode != "poc":
            raise InputError(
                "he",
                "on",
                "FLARE's simulator has no startup kits, so no TenSEAL contexts",
                "add --poc (the POC is provisioned with HE)",
            )


def _run_federated(cfg: SegDemoConfig, spec: SegJobSpec, on_round: Callable[[int], None]) -> FederatedRun:
    if cfg.mode == "poc":
        from hospital_fl.flare.runners.poc import run_in_poc

        with tempfile.TemporaryDirectory() as jobs:
            return run_in_poc(spec, cfg.workspace, on_round=on_round, job_dir=export_seg_job(spec, jobs))
    root = Path(cfg.workspace).resolve()
    env = simulator_env(root, spec.name, spec.num_sites)
    allow_bundle_components(root / spec.name / "local")
    return run_recipe_in_simulator(build_seg_recipe(spec), env, root / spec.name, on_round)


def _site_scores(spec: SegJobSpec, weights: dict) -> list[dict]:
    """Each site's Dice and HD95 of the final global model on its own validation cases."""
    model = build_seg_model(spec.model)
    set_weights(model, weights)
    eval_cfg = dataclasses.replace(spec.train, torch_threads=0)
    rows = []
    for site in site_names(spec.num_sites):
        path = spec.datalist.replace("{site}", site)
        report = validate_datalist(path, label_scheme=spec.pipeline.label_scheme)
        cases = report.usable.get("validation", [])
        scores = evaluate(model, cases, spec.pipeline, eval_cfg)
        rows.append(
            {
                "name": site,
                "dice": scores["mean_dice"],
                "dice_per_region": scores["dice"],
                "hd95_mm": scores["hd95"],
                "validation_cases": scores["cases"],
                "datalist": path,
                "left_out": [dataclasses.asdict(p) for p in report.problems],
            }
        )
    return rows


def _plot_rounds(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    sites = sorted({s["site"] for r in history for s in r["sites"]})
    for site in sites:
        points = [(r["round"], s["metrics"].get("val_dice")) for r in history for s in r["sites"] if s["site"] == site]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=site)
    ax.set_xlabel("round (global model received)")
    ax.set_ylabel("validation Dice at the site")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Segmentation: each site's Dice of the global model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(report: dict) -> str:
    lines = [
        "# Federated brain-tumour segmentation (demo)",
        "",
        report["data"]["description"],
        "",
        f"Mode: {report['mode']}; rounds: {report['rounds']}; wall seconds: {report['wall_seconds']:.1f}",
        "",
        "| site | Dice | HD95 (mm) | validation cases |",
        "|---|---|---|---|",
    ]
    for s in report["sites"]:
        hd = ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} n/a" for k, v in s["hd95_mm"].items())
        lines.append(f"| {s['name']} | {s['dice']:.3f} | {hd} | {s['validation_cases']} |")
    return "\n".join(lines) + "\n"


def run_seg_demo(cfg: SegDemoConfig, progress=None) -> dict:
    """Run the segmentation federation and write its report; returns report.json's content."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SEG_OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    if cfg.spec is None:
        datalists = Path(cfg.workspace).resolve() / "seg_sample"
        shutil.rmtree(datalists, ignore_errors=True)
        write_sample_datalists(datalists, sites=site_names(2))
        spec = demo_spec(datalists, cfg.rounds)
        if cfg.he:
            spec = dataclasses.replace(
                spec, he=CKKSParams(), server_optimizer=None
            )  # the server cannot step on ciphertext
    else:
        spec = cfg.spec
    task = (
        progress.add_task(f"segmentation federation ({cfg.mode}): rounds", total=spec.num_rounds) if progress else None
    )
    run = _run_federated(cfg, spec, lambda k: progress.update(task, completed=k) if progress else None)
    if progress:
        progress.update(task, completed=spec.num_rounds)
    weights = global_weights(run, cfg.workspace)  # an HE job's model is decrypted with a site's kit context
    report = {
        "task": "segmentation",
        "mode": cfg.mode,
        "rounds": spec.num_rounds,
        "wall_seconds": run.wall_seconds,
        "data": {
            "description": (
                "Embedded real sample: two contrast-enhanced T1 brain MRI volumes with expert tumour masks "
                "(pyradiomics test data, BSD-3-Clause), one patient per site; each site trains and validates "
                "on its own volume, so the Dice shows the pipeline works end to end, not how well it generalises."
            ),
        },
        "sites": _site_scores(spec, weights),
        "history": run.history,
        "settings": spec.to_json(),
        "he": spec.he is not None,
        "flare_result": str(run.result_dir),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(_markdown(report))
    if cfg.plots:
        _plot_rounds(run.history, out / "seg_rounds.png")
    torch.save({"model": {k: torch.as_tensor(v) for k, v in weights.items()}}, out / "global_model.pt")
    return report
