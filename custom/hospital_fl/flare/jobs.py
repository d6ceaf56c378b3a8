"""FLARE job definitions: nvflare Job Recipes whose sites run this installed package.

``build_recipe`` turns a plain JobSpec into a FedAvg or FedProx recipe; ``export_job``
writes an ordinary job folder (meta.json + app configs) that ``nvflare job submit`` and
the admin console's ``submit_job`` accept. No app/custom code is shipped: every config
"path" names a class in hospital_fl or in FLARE, installed on the server and each site.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.app_opt.pt.recipes.fedprox import FedProxRecipe
from nvflare.recipe.spec import Recipe

from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import SampleWeightedAggregator
from hospital_fl.flare.executor import TRAIN_TASK, CXRTrainExecutor
from hospital_fl.models.cxr import CXRClassifier, ModelConfig
from hospital_fl.privacy.config import DPConfig
from hospital_fl.training.config import TrainConfig

__all__ = [
    "JobSpec",
    "spec_to_json",
    "ALGORITHMS",
    "STANDARD_JOBS",
    "build_recipe",
    "export_job",
    "read_job_folder",
    "export_standard_jobs",
]

ALGORITHMS = ("fedavg", "fedprox")
# The executor ignores this: sites run CXRTrainExecutor, not a script (see _InstalledSiteCode).
_NO_SCRIPT = "hospital_fl.flare.executor"


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
    privacy: DPConfig = field(default_factory=DPConfig)  # mechanism "none": no DP
    # Seconds a site waits before asking the server for its next task. FLARE's default (2 s)
    # adds up to two such waits to every round; a site's poll is a few hundred bytes.
    task_request_interval: float = 0.25

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise InputError("algorithm", self.algorithm, f"it must be one of {ALGORITHMS}", "use fedavg or fedprox")
        if self.num_rounds < 1:
            raise InputError("num_rounds", self.num_rounds, "it must be >= 1", "use --rounds 1 or more")
        if not 0.05 <= self.task_request_interval <= 60:
            raise InputError(
                "task_request_interval",
                self.task_request_interval,
                "it must lie in 0.05..60 seconds",
                "use 0.25, or FLARE's default 2",
            )
        if self.algorithm == "fedprox" and not self.fedprox_mu > 0:
            raise InputError("fedprox_mu", self.fedprox_mu, "FedProx needs mu > 0", "use e.g. --mu 0.01, or fedavg")

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
            }
        )

    def executor_args(self) -> dict:
        return {
            "split": dataclasses.asdict(self.split),
            "model": dataclasses.asdict(self.model),
            "train": dataclasses.asdict(self.train),
            "data_path": self.data_path,
            "privacy": dataclasses.asdict(self.privacy),
            "num_rounds": self.num_rounds,
        }


def spec_to_json(spec: JobSpec) -> dict:
    return dataclasses.asdict(spec)


class _InstalledSiteCode:
    """Recipe mixin: each site's app runs CXRTrainExecutor from the installed package.

    The stock recipes add a ScriptRunner that ships a script in app/custom (needing BYOC
    rights at every hospital). Recipes create client apps in ``_prepare_client_apps``, the
    hook FLARE's recipe base class documents for subclasses that configure clients
    differently; this replaces only that step and keeps the server side (FedAvg
    controller, persistor, model selection) exactly as FLARE defines it. ``_job`` is the
    recipe's job; FLARE 2.9 offers no public accessor for it.
    """

    site_executor: CXRTrainExecutor

    def _prepare_client_apps(self) -> None:
        self._job.to_clients(self.site_executor, tasks=[TRAIN_TASK])


class HospitalFedAvgRecipe(_InstalledSiteCode, FedAvgRecipe):
    pass


class HospitalFedProxRecipe(_InstalledSiteCode, FedProxRecipe):
    pass


def build_recipe(spec: JobSpec) -> Recipe:
    """A FLARE recipe for ``spec``, ready for SimEnv / PocEnv / ProdEnv or export."""
    common = dict(
        name=spec.name,
        model=CXRClassifier(spec.model.arch, spec.model.task, spec.model.image_size),
        min_clients=spec.num_sites,
        num_rounds=spec.num_rounds,
        train_script=_NO_SCRIPT,
        aggregator=SampleWeightedAggregator(
            central_dp=dataclasses.asdict(spec.privacy) if spec.privacy.mechanism == "client-central" else None,
            num_rounds=spec.num_rounds,
        ),
        # Under DP sites send no AUCs; the DP-released training loss selects the best model.
        key_metric="train_loss" if spec.privacy.enabled else "val_auc",
        key_metric_mode="min" if spec.privacy.enabled else "max",
    )
    if spec.algorithm == "fedprox":
        recipe = HospitalFedProxRecipe(fedprox_mu=spec.fedprox_mu, **common)
    else:
        recipe = HospitalFedAvgRecipe(**common)
    recipe.site_executor = CXRTrainExecutor(**spec.executor_args())
    recipe.add_server_config({"server": {"task_request_interval": spec.task_request_interval}})
    # hospital_fl is installed at every site: reference it, never copy it into app/custom.
    recipe._job.set_app_packages(["hospital_fl"])
    return recipe


STANDARD_JOBS = {
    "cxr_fedavg": JobSpec(name="cxr_fedavg", algorithm="fedavg"),
    "cxr_fedprox": JobSpec(name="cxr_fedprox", algorithm="fedprox"),
    # Sample-level DP-SGD at every site, epsilon 8 over the whole job (delta 1e-5).
    "cxr_fedavg_dp": JobSpec(name="cxr_fedavg_dp", algorithm="fedavg", privacy=DPConfig("sample", 8.0)),
}


def export_job(spec: JobSpec, jobs_dir: str | Path) -> Path:
    """Write ``spec`` as a FLARE job folder ``jobs_dir/spec.name`` (replacing an old one)."""
    target = Path(jobs_dir) / spec.name
    if target.exists():
        shutil.rmtree(target)
    build_recipe(spec).export(str(jobs_dir))
    return target


def read_job_folder(job_dir: str | Path) -> JobSpec:
    """The JobSpec a CXR job folder (as exported by ``export_job``) was made from.

    Raises:
        InputError: the folder is missing, is not a FLARE job folder, or is not a CXR job.
    """
    job_dir = Path(job_dir)
    config = job_dir / "app" / "config"
    needed = [job_dir / "meta.json", config / "config_fed_client.json", config / "config_fed_server.json"]
    if not all(p.is_file() for p in needed):
        raise InputError(
            "job folder",
            str(job_dir),
            "it must be a FLARE job folder holding meta.json and "
            "app/config/config_fed_client.json and config_fed_server.json",
            "pass one of the exported folders, e.g. jobs/cxr_fedavg (regenerate with `hospital-fl export-jobs`)",
        )
    client, server = (json.loads(p.read_text()) for p in needed[1:])
    executors = [
        e["executor"] for e in client.get("executors", []) if e["executor"]["path"].endswith(".CXRTrainExecutor")
    ]
    if not executors:
        raise InputError(
            "job folder",
            str(job_dir),
            "its sites must run hospital_fl.flare.executor.CXRTrainExecutor",
            "pass a CXR job such as jobs/cxr_fedavg",
        )
    args, controller = executors[0]["args"], server["workflows"][0]["args"]
    mu = controller.get("fedprox_mu")
    return JobSpec(
        name=job_dir.name,
        algorithm="fedprox" if mu else "fedavg",
        num_rounds=controller["num_rounds"],
        fedprox_mu=mu or JobSpec.fedprox_mu,
        split=SplitConfig(**args.get("split", {})),
        model=ModelConfig(**args.get("model", {})),
        train=TrainConfig(**args.get("train", {})),
        data_path=args.get("data_path"),
        privacy=DPConfig(**(args.get("privacy") or {})),
        task_request_interval=server.get("server", {}).get("task_request_interval", 2.0),
    )


def export_standard_jobs(jobs_dir: str | Path) -> list[Path]:
    return [export_job(spec, jobs_dir) for spec in STANDARD_JOBS.values()]
