"""What defines a federated job, as plain typed data: JobSpec (chest X-ray) and SegJobSpec
(brain-tumour segmentation).

No FLARE here: the CLI, the demos and the benchmarks build and check a job's settings with
these; hospital_fl.flare.recipes turns a spec into a FLARE recipe and job folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hospital_fl.aggregation.server_optimizer import ServerOptimizerConfig
from hospital_fl.aggregation.strategy import AggregationConfig
from hospital_fl.compression.codecs import CompressionConfig
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.models.cxr import ModelConfig
from hospital_fl.models.seg import SegModelConfig
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.he_params import CKKSParams
from hospital_fl.segmentation.pipeline import SegPipelineConfig, SegTrainConfig, region_names
from hospital_fl.training.config import TrainConfig

__all__ = ["ALGORITHMS", "JobSpec", "SegJobSpec", "SERVER_MOMENTUM", "server_optimizer_from_json", "spec_to_json"]


def server_optimizer_from_json(data: dict) -> ServerOptimizerConfig:
    return ServerOptimizerConfig(**{**data, **({"betas": tuple(data["betas"])} if "betas" in data else {})})


ALGORITHMS = ("fedavg", "fedprox", "fedopt", "scaffold")


@dataclass(frozen=True)
class JobSpec:
    """Everything that defines a CXR federated job, as plain typed data."""

    name: str = "cxr_fedavg"
    algorithm: str = "fedavg"
    num_rounds: int = 10
    fedprox_mu: float = 0.01
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data_path: str | None = None  # a MedMNIST-layout .npz at every site; None: the embedded data
    # A dataset folder made by `hospital-fl ingest` at every site ("{site}": the client name,
    # "${VAR}": an environment variable of the site's process); None: the embedded data.
    site_data: str | None = None
    privacy: DPConfig = field(default_factory=DPConfig)  # mechanism "none": no DP
    # Seconds a site waits before asking the server for its next task. FLARE's default (2 s)
    # adds up to two such waits to every round; a site's poll is a few hundred bytes.
    task_request_interval: float = 0.25
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)  # fedopt only
    # Round policy (hospital_fl.flare.controllers): updates a round needs (None: every site),
    # seconds a round may wait (0: no limit), grace seconds for the rest once min_clients answered.
    min_clients: int | None = None
    round_timeout: int = 0
    # Without a grace period the slowest hospital, usually the one with most data, is
    # dropped from every round (measured: with 0 s the largest site never contributed).
    wait_after_min: int = 30
    uplink: CompressionConfig = field(default_factory=CompressionConfig)  # site -> server
    downlink: CompressionConfig = field(default_factory=CompressionConfig)  # server -> site
    # Homomorphic encryption (CKKS parameters the kits were provisioned with); None: plaintext.
    he: CKKSParams | None = None

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise InputError("algorithm", self.algorithm, f"it must be one of {ALGORITHMS}", "use e.g. fedavg")
        if self.min_clients is not None and not (
            isinstance(self.min_clients, int) and 1 <= self.min_clients <= self.num_sites
        ):
            raise InputError(
                "min_clients",
                self.min_clients,
                f"it must be an integer in 1..{self.num_sites} (the job's sites)",
                "use e.g. --min-clients 4 to let a round finish without one site",
            )
        for name in ("round_timeout", "wait_after_min"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise InputError(name, value, "it must be a whole number of seconds >= 0", "use 0 for no limit")
        self.aggregation.check_sites(self.min_clients or self.num_sites)
        robust = self.aggregation.rule != "fedavg"
        if robust and self.algorithm == "scaffold":
            raise InputError(
                "aggregation.rule",
                self.aggregation.rule,
                "FLARE's SCAFFOLD controller averages updates and controls itself",
                "use rule fedavg with scaffold, or fedavg/fedprox/fedopt with a robust rule",
            )
        if robust and self.privacy.mechanism == "client-central":
            raise InputError(
                "aggregation.rule",
                self.aggregation.rule,
                "central client-level DP replaces the rule with its clipped, noised mean",
                "use rule fedavg with client-central DP",
            )
        if self.algorithm == "scaffold" and self.privacy.enabled:
            raise InputError(
                "algorithm",
                "scaffold",
                "SCAFFOLD's control variates leave the site without DP accounting",
                "use fedavg or fedprox with DP",
            )
        if self.downlink.codec == "topk":
            raise InputError(
                "downlink.codec",
                "topk",
                "the server sends full weights, which top-k would zero out",
                "use fp16 or int8 for the downlink",
            )
        if self.site_data and self.data_path:
            raise InputError(
                "site_data",
                self.site_data,
                "a job reads either each site's ingested dataset or a shared .npz (data_path), not both",
                "drop --data when training on ingested site data",
            )
        if self.num_rounds < 1:
            raise InputError("num_rounds", self.num_rounds, "it must be >= 1", "use --rounds 1 or more")
        if self.he is not None:
            self._check_he()
        if not 0.05 <= self.task_request_interval <= 60:
            raise InputError(
                "task_request_interval",
                self.task_request_interval,
                "it must lie in 0.05..60 seconds",
                "use 0.25, or FLARE's default 2",
            )
        if self.algorithm == "fedprox" and not self.fedprox_mu > 0:
            raise InputError("fedprox_mu", self.fedprox_mu, "FedProx needs mu > 0", "use e.g. --mu 0.01, or fedavg")

    def _check_he(self) -> None:
        """What an encrypted round can do: the server only adds ciphertexts."""
        refusals = [
            (
                "algorithm",
                self.algorithm,
                self.algorithm not in ("fedavg", "fedprox"),
                "the server of an HE job can only add encrypted updates (FedAvg, FedProx)",
                "use fedavg or fedprox with HE",
            ),
            (
                "aggregation.rule",
                self.aggregation.rule,
                self.aggregation.rule != "fedavg",
                "robust rules compare updates, which the server cannot read under HE",
                "use rule fedavg with HE (or a robust rule without HE)",
            ),
            (
                "privacy.mechanism",
                self.privacy.mechanism,
                self.privacy.mechanism == "client-central",
                "central DP clips each update at the server, which cannot read them under HE",
                "use sample-level DP (noise added at the site, before encryption) with HE",
            ),
            (
                "uplink.codec",
                self.uplink.codec,
                self.uplink.enabled or self.downlink.enabled,
                "HE packs and quantizes the update itself; ciphertexts do not compress",
                "drop --uplink/--downlink compression with HE",
            ),
        ]
        for name, value, refused, rule, fix in refusals:
            if refused:
                raise InputError(name, value, rule, fix)

    @property
    def num_sites(self) -> int:
        return self.split.num_sites

    @classmethod
    def from_json(cls, data: dict) -> "JobSpec":
        return cls(
            **{
                **data,
                "split": SplitConfig(**data["split"]),
                "model": ModelConfig(**data["model"]),
                "train": TrainConfig(**data["train"]),
                "privacy": DPConfig(**data.get("privacy", {})),
                "aggregation": AggregationConfig(**data.get("aggregation", {})),
                "server_optimizer": server_optimizer_from_json(data.get("server_optimizer", {})),
                "uplink": CompressionConfig(**data.get("uplink", {})),
                "downlink": CompressionConfig(**data.get("downlink", {})),
                "he": CKKSParams.from_json(data["he"]) if data.get("he") else None,
            }
        )

    def executor_args(self) -> dict:
        return {
            "split": dataclasses.asdict(self.split),
            "model": dataclasses.asdict(self.model),
            "train": dataclasses.asdict(self.train),
            "data_path": self.data_path,
            "site_data": self.site_data,
            "privacy": dataclasses.asdict(self.privacy),
            "num_rounds": self.num_rounds,
        }


def spec_to_json(spec: JobSpec) -> dict:
    return {**dataclasses.asdict(spec), "he": spec.he.to_json() if spec.he else None}


SERVER_MOMENTUM = ServerOptimizerConfig(kind="sgdm", lr=1.0, momentum=0.9)  # FedAvgM


@dataclass(frozen=True)
class SegJobSpec:
    """Everything that defines a federated segmentation job, as plain typed data."""

    name: str = "seg_fedavg"
    num_sites: int = 3
    num_rounds: int = 20
    # Each site's datalist: "{site}" -> the site's name, "${VAR}" -> the site's environment.
    datalist: str = "${HOSPITAL_FL_SEG_DATALIST}"
    model: SegModelConfig = field(default_factory=SegModelConfig)
    pipeline: SegPipelineConfig = field(default_factory=SegPipelineConfig)
    train: SegTrainConfig = field(default_factory=lambda: SegTrainConfig(steps_per_epoch=20))
    min_clients: int | None = None
    round_timeout: int = 0
    wait_after_min: int = 30
    task_request_interval: float = 0.25
    uplink: CompressionConfig = field(default_factory=CompressionConfig)
    # Server momentum (FedAvgM through FLARE's FedOpt controller); None: plain FedAvg. Measured
    # on the synthetic 3-site benchmark: averaging sites that each take a few steps a round
    # loses most of their progress, and momentum 0.9 at server lr 1.0 recovers it.
    server_optimizer: ServerOptimizerConfig | None = field(default_factory=lambda: SERVER_MOMENTUM)
    he: CKKSParams | None = None

    def __post_init__(self):
        if not (isinstance(self.num_sites, int) and self.num_sites >= 1):
            raise InputError("num_sites", self.num_sites, "it must be an integer >= 1", "use e.g. 3")
        if self.num_rounds < 1:
            raise InputError("num_rounds", self.num_rounds, "it must be >= 1", "use --rounds 1 or more")
        regions = region_names(self.pipeline)
        if self.model.out_channels != len(regions):
            raise InputError(
                "model.out_channels",
                self.model.out_channels,
                f"the {self.pipeline.label_scheme} label scheme has {len(regions)} regions {regions}",
                f"use out_channels={len(regions)}",
            )
        if self.min_clients is not None and not 1 <= self.min_clients <= self.num_sites:
            raise InputError("min_clients", self.min_clients, f"it must lie in 1..{self.num_sites}", "use e.g. 2")
        if self.he is not None and self.server_optimizer is not None:
            raise InputError(
                "server_optimizer",
                self.server_optimizer.kind,
                "a server optimiser steps on the aggregated update, which the server cannot read under HE",
                "use server_optimizer=None (FedAvg) with HE",
            )
        if self.he is not None and self.uplink.enabled:
            raise InputError(
                "uplink.codec", self.uplink.codec, "HE packs the update itself", "drop compression with HE"
            )

    @classmethod
    def from_json(cls, data: dict) -> "SegJobSpec":
        return cls(
            **{
                **data,
                "model": SegModelConfig(**data.get("model", {})),
                "pipeline": SegPipelineConfig(**data.get("pipeline", {})),
                "train": SegTrainConfig(**data.get("train", {})),
                "uplink": CompressionConfig(**data.get("uplink", {})),
                "server_optimizer": server_optimizer_from_json(data["server_optimizer"])
                if data.get("server_optimizer")
                else None,
                "he": CKKSParams.from_json(data["he"]) if data.get("he") else None,
            }
        )

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "he": self.he.to_json() if self.he else None}

    def executor_args(self) -> dict:
        return {
            "datalist": self.datalist,
            "model": dataclasses.asdict(self.model),
            "pipeline": dataclasses.asdict(self.pipeline),
            "train": dataclasses.asdict(self.train),
            "num_rounds": self.num_rounds,
        }
