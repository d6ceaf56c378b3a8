"""The options every CXR job command shares (demo, bench), and the JobSpec they make."""

from __future__ import annotations

import argparse
from pathlib import Path

from hospital_fl.aggregation.strategy import RULES, AggregationConfig
from hospital_fl.compression.codecs import CODECS, CompressionConfig
from hospital_fl.errors import InputError
from hospital_fl.jobspec import ALGORITHMS, JobSpec
from hospital_fl.privacy.config import MECHANISMS

__all__ = ["DEFAULT_ROUNDS", "add_job_options", "check_device", "spec_from_args"]

DEFAULT_ROUNDS = 10
ARCHS = ("compact", "densenet121")
DOWNLINK_CODECS = tuple(c for c in CODECS if c != "topk")  # the server sends full weights
DP_MECHANISMS = tuple(m for m in MECHANISMS if m != "none")  # --dp-epsilon always names one


def add_job_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--algorithm", default="fedavg", choices=ALGORITHMS, help="federated algorithm (default fedavg)")
    p.add_argument(
        "--aggregator",
        default="fedavg",
        choices=RULES,
        help="the server's aggregation rule (default fedavg)",
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
    p.add_argument("--uplink", default="none", choices=CODECS, help="update compression site -> server (default none)")
    p.add_argument("--topk", type=float, default=0.01, help="top-k: share of values sent (default 0.01)")
    p.add_argument(
        "--downlink", default="none", choices=DOWNLINK_CODECS, help="model compression server -> site (default none)"
    )
    p.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight (default 0.01)")
    p.add_argument(
        "--arch", default="compact", choices=ARCHS, help="compact (28x28 demo) or densenet121 (224x224)"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default auto)")
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
        choices=DP_MECHANISMS,
        help="sample (DP-SGD, default), client-local or client-central; used with --dp-epsilon",
    )
    p.add_argument("--dp-delta", type=float, default=1e-5, help="delta of (epsilon, delta)-DP (default 1e-5)")


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", device, "no CUDA GPU is visible on this machine", "use --device auto or cpu")


def spec_from_args(args, torch_threads: int = 0):
    from hospital_fl.data.splits import SplitConfig
    from hospital_fl.models.cxr import ModelConfig
    from hospital_fl.privacy.config import DPConfig
    from hospital_fl.training.config import TrainConfig

    check_device(args.device)
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
