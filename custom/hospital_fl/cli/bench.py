"""`hospital-fl bench SUITE`: benchmarks that print JSON (and write it, with a plot, beside --out)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hospital_fl.cli.job_options import add_job_options, spec_from_args
from hospital_fl.cli.progress import progress_bar

__all__ = ["add_bench_command"]


def _cmd_bench(args) -> int:
    if args.suite == "privacy":
        return _bench_privacy(args)
    if args.suite == "privacy-gate":
        from hospital_fl.bench.privacy_gate import main as bench_privacy_gate

        return bench_privacy_gate(args)
    if args.suite == "aggregation":
        return _bench_aggregation(args)
    if args.suite == "ingest":
        return _bench_ingest(args)
    if args.suite == "provision":
        return _bench_provision(args)
    if args.suite == "he":
        return _bench_he(args)
    if args.suite == "seg":
        return _bench_seg(args)
    if args.suite == "scale":
        return _bench_scale(args)
    if args.suite == "clinical":
        return _bench_clinical(args)
    from hospital_fl.bench.cxr import run_benchmark

    spec = spec_from_args(args)
    result = json.dumps(
        run_benchmark(spec, seeds=args.seeds, workspace=Path(args.workspace), stock=args.stock), indent=2
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(result)
    print(result)
    return 0


def _run_in_process_bench(args, default_out: str, run, plot, plot_name: str) -> int:
    """Run a benchmark under a progress bar; write its JSON and plot; print it without the runs.

    ``run(spec, out, progress)`` returns the result; ``plot(result, path)`` draws it.
    """
    spec = spec_from_args(args)
    out = Path(args.out if args.out != "out/bench.json" else default_out)
    with progress_bar() as progress:
        result = run(spec, out, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_name(plot_name))
    brief = {k: v for k, v in result.items() if k != "runs"}
    print(json.dumps(brief) if args.json else json.dumps(brief, indent=2))
    return 0


def _bench_privacy(args) -> int:
    import dataclasses

    from hospital_fl.bench.privacy import plot_epsilon_auc, run_privacy_benchmark

    def run(spec, out, progress):
        return run_privacy_benchmark(
            seeds=args.seeds,
            epsilons=args.epsilons,
            mechanisms=args.mechanisms,
            rounds=spec.num_rounds,
            split=spec.split,
            model_cfg=spec.model,
            train_cfg=dataclasses.replace(spec.train, torch_threads=0),
            dp_template=dataclasses.replace(spec.privacy, delta=args.dp_delta),
            progress=progress,
        )

    return _run_in_process_bench(args, "out/privacy_bench.json", run, plot_epsilon_auc, "epsilon_auc.png")


def _bench_aggregation(args) -> int:
    import dataclasses

    from hospital_fl.bench.aggregation import plot_aggregation, run_aggregation_benchmark

    def run(spec, out, progress):
        return run_aggregation_benchmark(
            seeds=args.seeds,
            parts=args.parts,
            rounds=spec.num_rounds,
            split=spec.split,
            model_cfg=spec.model,
            train_cfg=dataclasses.replace(spec.train, torch_threads=0),
            runs_file=out.with_name(out.stem + "_runs.jsonl"),
            progress=progress,
        )

    return _run_in_process_bench(args, "out/aggregation_bench.json", run, plot_aggregation, "aggregation_auc.png")


def _bench_ingest(args) -> int:
    from hospital_fl.bench.ingest import run_ingest_benchmark

    with progress_bar() as progress:
        result = run_ingest_benchmark(Path(args.workspace) / "ingest", copies=args.copies, progress=progress)
    out = Path(args.out if args.out != "out/bench.json" else "out/ingest_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def _bench_provision(args) -> int:
    from hospital_fl.bench.provision import run_provision_benchmark

    result = run_provision_benchmark(args.site_configs, Path(args.workspace) / "provision")
    out = Path(args.out if args.out != "out/bench.json" else "out/provision_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def _bench_he(args) -> int:
    import dataclasses

    from hospital_fl.bench.he import run_he_benchmark

    def run(spec, out, progress):
        return run_he_benchmark(
            seeds=args.seeds,
            rounds=spec.num_rounds,
            split=spec.split,
            train_cfg=dataclasses.replace(spec.train, torch_threads=0),
            stock=not args.no_stock,
            progress=progress,
        )

    from hospital_fl.bench.he import plot_he

    return _run_in_process_bench(args, "out/he_bench.json", run, plot_he, "he_costs.png")


def _bench_seg(args) -> int:
    from hospital_fl.bench.seg import run_seg_benchmark

    rounds = args.rounds
    with progress_bar() as progress:
        result = run_seg_benchmark(Path(args.workspace) / "seg", rounds=rounds, seeds=args.seeds, progress=progress)
    out = Path(args.out if args.out != "out/bench.json" else "out/seg_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    brief = {k: v for k, v in result.items() if k != "runs"}
    print(json.dumps(brief) if args.json else json.dumps(brief, indent=2))
    return 0


def _bench_clinical(args) -> int:
    from hospital_fl.bench.clinical import run_clinical_benchmark

    spec = spec_from_args(args)
    with progress_bar() as progress:
        result = run_clinical_benchmark(spec, seeds=args.seeds, progress=progress)
    out = Path(args.out if args.out != "out/bench.json" else "out/clinical_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    brief = {k: v for k, v in result.items() if k != "per_seed"}
    print(json.dumps(brief) if args.json else json.dumps(brief, indent=2))
    return 0


def _bench_scale(args) -> int:
    from hospital_fl.bench.scale import run_scale_benchmark
    from hospital_fl.cli.job_options import DEFAULT_ROUNDS

    rounds = args.rounds if args.rounds != DEFAULT_ROUNDS else 2

    def progress(point: dict) -> None:
        print(f"{point['sites']} sites: {point['seconds_per_round']:.1f} s/round", flush=True)

    result = run_scale_benchmark(
        Path(args.workspace) / "scale", sizes=tuple(args.sizes), rounds=rounds, threads=args.threads, progress=progress
    )
    out = Path(args.out if args.out != "out/bench.json" else "out/scale_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks printing JSON: cxr (federated vs centralized vs local-only, FLARE overhead) "
        "or privacy (AUC vs epsilon)",
    )
    bench.add_argument(
        "suite",
        nargs="?",
        default="cxr",
        choices=[
            "cxr",
            "privacy",
            "privacy-gate",
            "aggregation",
            "ingest",
            "provision",
            "he",
            "seg",
            "scale",
            "clinical",
        ],
    )
    add_job_options(bench)
    bench.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="privacy suite")
    bench.add_argument(
        "--mechanisms", nargs="+", default=["sample", "client-local", "client-central"], help="privacy suite"
    )
    bench.add_argument(
        "--parts",
        nargs="+",
        default=["noniid", "attack", "compression", "timing"],
        choices=["noniid", "attack", "compression", "timing", "inflate", "bounded", "direction"],
        help="aggregation suite: which sweeps to run (default all)",
    )
    bench.add_argument("--copies", type=int, default=40, help="ingest suite: files per transfer syntax")
    bench.add_argument("--site-configs", default="site_configs", help="provision suite: the consortium to provision")
    bench.add_argument("--no-stock", action="store_true", help="he suite: skip stock FLARE HE")
    bench.add_argument(
        "--sizes", type=int, nargs="+", default=[5, 20, 50], help="scale suite: hospitals per run (default 5 20 50)"
    )
    bench.add_argument(
        "--threads", type=int, default=4, help="scale suite: simulator client workers at a time (default 4)"
    )
    bench.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    bench.add_argument("--stock", action="store_true", help="also time stock NVFlare FedAvgRecipe on the same work")
    bench.add_argument("--workspace", default="workspace/bench")
    bench.add_argument("--out", default="out/bench.json", help="also write the JSON here (default out/bench.json)")
    bench.set_defaults(func=_cmd_bench)
