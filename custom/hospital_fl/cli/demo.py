"""`hospital-fl demo`: the federated pneumonia job (or the segmentation job) on the embedded real data."""

from __future__ import annotations

import argparse
from pathlib import Path

from hospital_fl.cli.job_options import DEFAULT_ROUNDS, add_job_options, spec_from_args
from hospital_fl.cli.progress import progress_bar, stderr_console

__all__ = ["add_demo_command"]


def _cmd_demo(args) -> int:
    if args.task == "seg":
        return _cmd_seg_demo(args)
    from hospital_fl.apps.cxr_demo import DemoConfig, co_located_threads, run_demo

    if args.job:
        from hospital_fl.flare.recipes.cxr import read_job_folder

        spec = read_job_folder(args.job)  # the folder's own settings; job options are ignored
    else:
        spec = spec_from_args(args, torch_threads=co_located_threads(args.sites))
    cfg = DemoConfig(
        spec=spec,
        mode="poc" if args.poc else "simulator",
        out_dir=Path(args.out),
        workspace=Path(args.workspace),
        job_dir=Path(args.job) if args.job and args.poc else None,
    )
    console = stderr_console()
    with progress_bar(console) as progress:
        report = run_demo(cfg, progress)
    fed, cen, loc = report["federated"], report["centralized"], report["local_only"]
    console.print(
        f"[bold]federated AUC {fed['auc']:.3f}[/] (95% CI {fed['auc_ci95'][0]:.3f}-{fed['auc_ci95'][1]:.3f}), "
        f"centralized {cen['auc']:.3f}, best local-only {loc['best_auc']:.3f}, min site {fed['min_site_auc']:.3f}"
    )
    spent = {k: v for k, v in report["privacy"].items() if v}
    if spent:
        console.print(
            "differential privacy, epsilon spent per site (delta "
            f"{next(iter(spent.values()))['delta']:g}): "
            + ", ".join(f"{k} {v['epsilon']:.2f}" for k, v in spent.items())
        )
    for flag in report["flags"]:
        console.print(f"[yellow]flag:[/] {flag}")
    console.print(f"report: {Path(args.out) / 'report.md'} (json, plots beside it)")
    return 0


def _cmd_seg_demo(args) -> int:
    from hospital_fl.apps.seg_demo import SegDemoConfig, run_seg_demo

    cfg = SegDemoConfig(
        rounds=args.rounds if args.rounds != DEFAULT_ROUNDS else 3,
        mode="poc" if args.poc else "simulator",
        out_dir=Path(args.out if args.out != "out" else "out/seg"),
        workspace=Path(args.workspace),
        he=args.he,
    )
    console = stderr_console()
    with progress_bar(console) as progress:
        report = run_seg_demo(cfg, progress)
    for site in report["sites"]:
        console.print(
            f"[bold]{site['name']}[/]: Dice {site['dice']:.3f} on {site['validation_cases']} validation case(s)"
        )
    console.print(f"report: {cfg.out_dir / 'report.json'}")
    return 0


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the federated pneumonia job on the embedded chest X-rays and report")
    add_job_options(demo)
    demo.add_argument("--poc", action="store_true", help="run on a real FLARE POC system instead of the simulator")
    demo.add_argument(
        "--task",
        default="cxr",
        choices=["cxr", "seg"],
        help="cxr: pneumonia on the embedded chest X-rays (default); seg: brain-tumour segmentation on the "
        "embedded real MRI sample (report in out/seg)",
    )
    demo.add_argument(
        "--job",
        default=None,
        help="run this exported job folder (e.g. jobs/cxr_fedavg) with its own settings; "
        "with --poc it is submitted as is",
    )
    demo.add_argument("--out", default="out", help="report folder (default ./out)")
    demo.add_argument("--workspace", default="workspace", help="FLARE workspace folder (default ./workspace)")
    demo.set_defaults(func=_cmd_demo)
