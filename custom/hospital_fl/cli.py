"""`hospital-fl` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hospital_fl.cli_audit import add_audit_commands
from hospital_fl.cli_kit import add_kit_commands
from hospital_fl.cli_provision import add_provision_commands
from hospital_fl.cli_site import add_site_commands
from hospital_fl.errors import InputError

__all__ = ["main"]


DEFAULT_ROUNDS = 10


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help="federated rounds (default 10; demo --task seg: 3)"
    )
    p.add_argument(
        "--he",
        action="store_true",
        help="homomorphic encryption: the server adds CKKS-encrypted updates it cannot read (needs --poc)",
    )
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (default 1)")
    p.add_argument("--sites", type=int, default=5, help="number of hospitals (default 5)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew alpha (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default 0)")
    p.add_argument("--algorithm", default="fedavg", help="fedavg, fedprox, fedopt or scaffold (default fedavg)")
    p.add_argument(
        "--aggregator",
        default="fedavg",
        help="server rule: fedavg, trimmed_mean, median, norm_bounded, krum or multi_krum (default fedavg)",
    )
    p.add_argument("--trim", type=int, default=1, help="trimmed_mean: sites dropped per side (default 1)")
    p.add_argument("--byzantine", type=int, default=1, help="krum/multi_krum: faulty sites tolerated (default 1)")
    p.add_argument("--min-clients", type=int, default=None, help="updates a round needs (default: every site)")
    p.add_argument("--round-timeout", type=int, default=0, help="seconds a round may wait (default 0: no limit)")
    p.add_argument(
        "--wait-after-min",
        type=int,
        default=30,
        help="grace seconds for the other sites once --min-clients have answered (default 30)",
    )
    p.add_argument("--uplink", default="none", help="update compression site -> server: none, fp16, int8 or topk")
    p.add_argument("--topk", type=float, default=0.01, help="top-k: share of values sent (default 0.01)")
    p.add_argument("--downlink", default="none", help="model compression server -> site: none, fp16 or int8")
    p.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight (default 0.01)")
    p.add_argument("--arch", default="compact", help="compact (28x28 demo) or densenet121")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--data", default=None, help="a MedMNIST-layout .npz instead of the embedded dataset")
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="train with differential privacy at this epsilon over the whole job (default: no DP)",
    )
    p.add_argument(
        "--dp-mechanism",
        default="sample",
        help="sample (DP-SGD, default), client-local or client-central; used with --dp-epsilon",
    )
    p.add_argument("--dp-delta", type=float, default=1e-5, help="delta of (epsilon, delta)-DP (default 1e-5)")


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", device, "no CUDA GPU is visible on this machine", "use --device auto or cpu")


def _spec_from_args(args, torch_threads: int = 0):
    from hospital_fl.aggregation.strategy import AggregationConfig
    from hospital_fl.compression.codecs import CompressionConfig
    from hospital_fl.data.splits import SplitConfig
    from hospital_fl.flare.jobs import JobSpec
    from hospital_fl.models.cxr import ModelConfig
    from hospital_fl.privacy.config import DPConfig
    from hospital_fl.training.config import TrainConfig

    _check_device(args.device)
    privacy = DPConfig()
    if args.dp_epsilon is not None:
        if args.dp_mechanism == "none":
            raise InputError("--dp-mechanism", "none", "--dp-epsilon needs a DP mechanism", "use sample")
        privacy = DPConfig(mechanism=args.dp_mechanism, target_epsilon=args.dp_epsilon, delta=args.dp_delta)
    he = None
    if getattr(args, "he", False):
        from hospital_fl.privacy.he_params import CKKSParams

        he = CKKSParams()
    return JobSpec(
        name=f"cxr_{args.algorithm}" + ("_dp" if privacy.enabled else "") + ("_he" if he else ""),
        he=he,
        privacy=privacy,
        algorithm=args.algorithm,
        num_rounds=args.rounds,
        fedprox_mu=args.mu,
        split=SplitConfig(num_sites=args.sites, alpha=args.alpha, seed=args.seed),
        # DenseNet-121 is the CheXNet-style production network at 224x224 (inputs are resized)
        model=ModelConfig(arch=args.arch, image_size=224 if args.arch == "densenet121" else 28),
        train=TrainConfig(epochs=args.local_epochs, seed=args.seed, device=args.device, torch_threads=torch_threads),
        data_path=str(Path(args.data).resolve()) if args.data else None,
        aggregation=AggregationConfig(rule=args.aggregator, trim=args.trim, byzantine=args.byzantine),
        min_clients=args.min_clients,
        round_timeout=args.round_timeout,
        wait_after_min=args.wait_after_min,
        uplink=CompressionConfig(args.uplink, topk_fraction=args.topk),
        downlink=CompressionConfig(args.downlink),
    )


def _cmd_demo(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if args.task == "seg":
        return _cmd_seg_demo(args)
    from hospital_fl.demo import DemoConfig, co_located_threads, run_demo

    if args.job:
        from hospital_fl.flare.jobs import read_job_folder

        spec = read_job_folder(args.job)  # the folder's own settings; job options are ignored
    else:
        spec = _spec_from_args(args, torch_threads=co_located_threads(args.sites))
    cfg = DemoConfig(
        spec=spec,
        mode="poc" if args.poc else "simulator",
        out_dir=Path(args.out),
        workspace=Path(args.workspace),
        job_dir=Path(args.job) if args.job and args.poc else None,
    )
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
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


def _cmd_export_jobs(args) -> int:
    from hospital_fl.flare.jobs import export_standard_jobs
    from hospital_fl.flare.seg_jobs import SEG_JOBS, export_seg_job

    for path in export_standard_jobs(args.jobs_dir) + [export_seg_job(s, args.jobs_dir) for s in SEG_JOBS.values()]:
        print(path)
    return 0


def _cmd_allow_components(args) -> int:
    from hospital_fl.flare.site_policy import allow_bundle_components

    local_dir = Path(args.local_dir)
    if not local_dir.is_dir():
        raise InputError(
            "site local folder",
            str(local_dir),
            "it must be an existing startup-kit local/ folder",
            "pass the local/ folder of a provisioned site kit, e.g. prod_00/site-1/local",
        )
    print(allow_bundle_components(local_dir))
    return 0


def _cmd_bench(args) -> int:
    if args.suite == "privacy":
        return _bench_privacy(args)
    if args.suite == "privacy-gate":
        from hospital_fl.bench_privacy_gate import main as bench_privacy_gate

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
    from hospital_fl.bench import run_benchmark

    spec = _spec_from_args(args)
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
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    spec = _spec_from_args(args)
    out = Path(args.out if args.out != "out/bench.json" else default_out)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        result = run(spec, out, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_name(plot_name))
    brief = {k: v for k, v in result.items() if k != "runs"}
    print(json.dumps(brief) if args.json else json.dumps(brief, indent=2))
    return 0


def _bench_privacy(args) -> int:
    import dataclasses

    from hospital_fl.bench_privacy import plot_epsilon_auc, run_privacy_benchmark

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

    from hospital_fl.bench_aggregation import plot_aggregation, run_aggregation_benchmark

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
    from rich.console import Console
    from rich.progress import Progress

    from hospital_fl.bench_ingest import run_ingest_benchmark

    with Progress(console=Console(stderr=True)) as progress:
        result = run_ingest_benchmark(Path(args.workspace) / "ingest", copies=args.copies, progress=progress)
    out = Path(args.out if args.out != "out/bench.json" else "out/ingest_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def _bench_provision(args) -> int:
    from hospital_fl.bench_provision import run_provision_benchmark

    result = run_provision_benchmark(args.site_configs, Path(args.workspace) / "provision")
    out = Path(args.out if args.out != "out/bench.json" else "out/provision_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def _bench_he(args) -> int:
    import dataclasses

    from hospital_fl.bench_he import run_he_benchmark

    def run(spec, out, progress):
        return run_he_benchmark(
            seeds=args.seeds,
            rounds=spec.num_rounds,
            split=spec.split,
            train_cfg=dataclasses.replace(spec.train, torch_threads=0),
            stock=not args.no_stock,
            progress=progress,
        )

    from hospital_fl.bench_he import plot_he

    return _run_in_process_bench(args, "out/he_bench.json", run, plot_he, "he_costs.png")


def _cmd_seg_demo(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hospital_fl.seg_demo import SegDemoConfig, run_seg_demo

    cfg = SegDemoConfig(
        rounds=args.rounds if args.rounds != DEFAULT_ROUNDS else 3,
        mode="poc" if args.poc else "simulator",
        out_dir=Path(args.out if args.out != "out" else "out/seg"),
        workspace=Path(args.workspace),
        he=args.he,
    )
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        report = run_seg_demo(cfg, progress)
    for site in report["sites"]:
        console.print(
            f"[bold]{site['name']}[/]: Dice {site['dice']:.3f} on {site['validation_cases']} validation case(s)"
        )
    console.print(f"report: {cfg.out_dir / 'report.json'}")
    return 0


def _bench_seg(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from hospital_fl.bench_seg import run_seg_benchmark

    rounds = args.rounds
    with Progress(console=Console(stderr=True)) as progress:
        result = run_seg_benchmark(Path(args.workspace) / "seg", rounds=rounds, seeds=args.seeds, progress=progress)
    out = Path(args.out if args.out != "out/bench.json" else "out/seg_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    brief = {k: v for k, v in result.items() if k != "runs"}
    print(json.dumps(brief) if args.json else json.dumps(brief, indent=2))
    return 0


def _cmd_privacy_init(args) -> int:
    from hospital_fl.privacy.policy import SitePrivacyPolicy
    from hospital_fl.privacy.setup import init_site_privacy

    policy = None
    if args.require_dp or args.job_epsilon or args.lifetime_epsilon:
        from hospital_fl.privacy.policy import policy_from_dict

        policy = policy_from_dict(
            {
                "require_dp": args.require_dp,
                "max_job_epsilon": args.job_epsilon,
                "lifetime_epsilon": args.lifetime_epsilon,
                "delta": args.delta,
            },
            "command line",
        )
    if policy is None and args.delta != SitePrivacyPolicy().delta:
        policy = SitePrivacyPolicy(delta=args.delta)
    # flags only set a new site's policy; init never rewrites an existing one (nor loosens it)
    ledger = init_site_privacy(args.site_home, args.site, policy, rebuild=args.rebuild)
    print(ledger.path)
    return 0


def _cmd_privacy_report(args) -> int:
    from hospital_fl.privacy.ledger import PrivacyLedger
    from hospital_fl.privacy.policy import SitePrivacyPolicy, read_site_policy

    home = Path(args.site_home)
    policy = read_site_policy(home / "local") or SitePrivacyPolicy()
    ledger = PrivacyLedger(policy.ledger_path(home))
    summary = ledger.summary(policy.delta, policy.accountant)
    summary["differences_from_audit_trail"] = ledger.audit_problems()  # empty when they agree
    summary["lifetime_budget"] = policy.lifetime_epsilon
    summary["max_job_epsilon"] = policy.max_job_epsilon
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hospital-fl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the federated pneumonia job on the embedded chest X-rays and report")
    _add_job_options(demo)
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

    export = sub.add_parser("export-jobs", help="write the standard job folders (cxr_*, cxr_fedavg_he, seg_fedavg)")
    export.add_argument("--jobs-dir", default="jobs")
    export.set_defaults(func=_cmd_export_jobs)

    allow = sub.add_parser("allow-components", help="let a FLARE site build hospital_fl components")
    allow.add_argument("local_dir", help="the site's startup-kit local/ folder")
    allow.set_defaults(func=_cmd_allow_components)

    bench = sub.add_parser(
        "bench",
        help="benchmarks printing JSON: cxr (federated vs centralized vs local-only, FLARE overhead) "
        "or privacy (AUC vs epsilon)",
    )
    bench.add_argument(
        "suite",
        nargs="?",
        default="cxr",
        choices=["cxr", "privacy", "privacy-gate", "aggregation", "ingest", "provision", "he", "seg"],
    )
    _add_job_options(bench)
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
    bench.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    bench.add_argument("--stock", action="store_true", help="also time stock NVFlare FedAvgRecipe on the same work")
    bench.add_argument("--workspace", default="workspace/bench")
    bench.add_argument("--out", default="out/bench.json", help="also write the JSON here (default out/bench.json)")
    bench.set_defaults(func=_cmd_bench)

    privacy = sub.add_parser("privacy", help="a site's privacy policy and ledger")
    psub = privacy.add_subparsers(dest="privacy_command", required=True)
    init = psub.add_parser("init", help="create a site's ledger (and policy file) in its workspace or kit")
    init.add_argument("site_home", help="the site's workspace / startup kit root (holds local/)")
    init.add_argument("--site", required=True, help="the site name, e.g. site-1")
    init.add_argument("--require-dp", action="store_true", help="refuse jobs without DP at this site")
    init.add_argument("--job-epsilon", type=float, default=None, help="most epsilon one job may spend")
    init.add_argument("--lifetime-epsilon", type=float, default=None, help="most epsilon all jobs may spend")
    init.add_argument("--delta", type=float, default=1e-5, help="delta of the budgets (default 1e-5)")
    init.add_argument(
        "--rebuild",
        action="store_true",
        help="write the ledger again from the site's verified audit trail (a missing, damaged or version-1 ledger)",
    )
    init.set_defaults(func=_cmd_privacy_init, command="privacy init")
    report = psub.add_parser("report", help="epsilon spent per job and in total, from the site's ledger")
    report.add_argument("site_home")
    report.set_defaults(func=_cmd_privacy_report, command="privacy report")
    add_site_commands(sub)
    add_provision_commands(sub)
    add_kit_commands(sub)
    add_audit_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"Error: {exc}\nTry 'hospital-fl {args.command} --help'.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "Interrupted; FLARE processes started by this command were stopped; no report was written.", file=sys.stderr
        )
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"Error: {exc}\nNo report was written.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
