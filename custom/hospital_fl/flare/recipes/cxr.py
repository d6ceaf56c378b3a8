"""FLARE job definitions: nvflare Job Recipes whose sites run this installed package.

``build_recipe`` turns a plain JobSpec into a FLARE recipe (FedAvg, FedProx, FedOpt or
SCAFFOLD controller with the job's round policy, the screening aggregator with its rule,
compression filters when asked, and the server's TensorBoard receiver for the metrics
each site streams per round); ``export_job``
writes an ordinary job folder (meta.json + app configs) that ``nvflare job submit`` and
the admin console's ``submit_job`` accept. No app/custom code is shipped: every config
"path" names a class in hospital_fl or in FLARE, installed on the server and each site.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.recipe.spec import Recipe

from hospital_fl.aggregation.server_optimizer import ServerOptimizerConfig
from hospital_fl.aggregation.strategy import AggregationConfig
from hospital_fl.compression.codecs import CompressionConfig
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import UpdateAggregator
from hospital_fl.flare.controllers import RoundPolicyFedAvg, RoundPolicyFedOpt, RoundPolicyScaffold
from hospital_fl.flare.executor import SAMPLE_COUNT_TASK, TRAIN_TASK, VALIDATE_TASK, CXRTrainExecutor
from hospital_fl.flare.filters import CompressUpdate, DecompressUpdate
from hospital_fl.jobspec import JobSpec, server_optimizer_from_json
from hospital_fl.models.cxr import CXRClassifier, ModelConfig
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.he_params import CKKSParams
from hospital_fl.training.config import TrainConfig

__all__ = [
    "TB_FOLDER",
    "round_controller",
    "add_live_metrics",
    "add_wire_filters",
    "STANDARD_JOBS",
    "build_recipe",
    "export_job",
    "read_job_folder",
    "export_standard_jobs",
]

# The executor ignores this: sites run CXRTrainExecutor, not a script (see _InstalledSiteCode).
_NO_SCRIPT = "hospital_fl.flare.executor"
# Where the server's TensorBoard receiver writes, inside the job's run folder: <run dir>/tb_events/<site>/
TB_FOLDER = "tb_events"


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
    # More tasks the sites' executor answers, e.g. cross-site evaluation's (recipes.cross_site).
    extra_site_tasks: tuple[str, ...] = ()

    def _setup_model_and_persistor(self, job) -> str:
        self._building_job = job  # the controller hook may add components (FedOpt's model copy)
        return super()._setup_model_and_persistor(job)

    def _prepare_client_apps(self) -> None:
        # The HE controller also asks for sample counts and has the final model scored at the sites.
        tasks = [TRAIN_TASK, SAMPLE_COUNT_TASK, VALIDATE_TASK] if self.spec.he is not None else [TRAIN_TASK]
        tasks += [t for t in self.extra_site_tasks if t not in tasks]
        self._job.to_clients(self.site_executor, tasks=tasks)


class HospitalRecipe(_InstalledSiteCode, FedAvgRecipe):
    """FLARE's FedAvg recipe whose controller follows the JobSpec: FedAvg, FedProx, FedOpt or
    SCAFFOLD (FLARE's own controllers, with the job's round policy). ``_create_controller`` and
    ``_get_controller_kwargs`` are the hooks FLARE's recipe offers for exactly this."""

    def __init__(self, spec: JobSpec, **kwargs):
        self.spec = spec  # read by the hooks below, which run inside FedAvgRecipe.__init__
        super().__init__(**kwargs)

    def _get_controller_kwargs(self) -> dict:
        return {"fedprox_mu": self.spec.fedprox_mu} if self.spec.algorithm == "fedprox" else {}

    def _create_controller(self, persistor_id: str, model_params, model_aggregator):
        spec = self.spec
        policy = dict(
            min_responses=spec.min_clients, round_timeout=spec.round_timeout, wait_after_min=spec.wait_after_min
        )
        if spec.algorithm == "scaffold" and spec.he is None:
            return RoundPolicyScaffold(
                num_clients=spec.num_sites,
                num_rounds=spec.num_rounds,
                persistor_id=persistor_id,
                aggregator=model_aggregator,
                **policy,
            )
        return round_controller(
            self._building_job,
            num_sites=spec.num_sites,
            num_rounds=spec.num_rounds,
            persistor_id=persistor_id,
            model_params=model_params,
            aggregator=model_aggregator,
            policy=policy,
            he=spec.he is not None,
            fedprox_mu=spec.fedprox_mu if spec.algorithm == "fedprox" else 0.0,
            server_optimizer=spec.server_optimizer if spec.algorithm == "fedopt" else None,
            network=lambda: _model_of(spec),
        )


def round_controller(
    job,
    *,
    num_sites: int,
    num_rounds: int,
    persistor_id: str,
    model_params,
    aggregator,
    policy: dict,
    he: bool = False,
    fedprox_mu: float = 0.0,
    server_optimizer: ServerOptimizerConfig | None = None,
    network=None,
):
    """The server controller of a FedAvg-family job, with the job's round policy: the HE
    controller, FLARE's FedOpt (the server optimiser stepping a torch copy of ``network()``,
    added to ``job``), or FLARE's FedAvg / FedProx."""
    if he:
        from hospital_fl.flare.he import EncryptedFedAvg

        return EncryptedFedAvg(
            num_clients=num_sites,
            num_rounds=num_rounds,
            aggregator=aggregator,
            persistor_id=persistor_id,
            fedprox_mu=fedprox_mu,
            task_name=TRAIN_TASK,
            **policy,
        )
    kwargs = dict(
        num_clients=num_sites,
        num_rounds=num_rounds,
        persistor_id=persistor_id,
        model=model_params,
        aggregator=aggregator,
        task_name=TRAIN_TASK,
        **({"fedprox_mu": fedprox_mu} if fedprox_mu else {}),
        **policy,
    )
    if server_optimizer is None:
        return RoundPolicyFedAvg(**kwargs)
    # FLARE's FedOpt steps a torch copy of the model, found by component id.
    job.to_server(network(), id="fedopt_model")
    return RoundPolicyFedOpt(
        source_model="fedopt_model",
        # config_type "dict": FLARE builds these at run time, once the model's parameters exist
        optimizer_args={**server_optimizer.flare_optimizer_args(), "config_type": "dict"},
        # constant server learning rate (FLARE's default is a 3-round cosine)
        lr_scheduler_args={
            "path": "torch.optim.lr_scheduler.ConstantLR",
            "args": {"factor": 1.0},
            "config_type": "dict",
        },
        device="cpu",
        **kwargs,
    )


def _model_of(spec: JobSpec) -> CXRClassifier:
    return CXRClassifier(spec.model.arch, spec.model.task, spec.model.image_size)


def _aggregator_of(spec: JobSpec):
    if spec.he is not None:
        from hospital_fl.flare.he import EncryptedSumAggregator

        return EncryptedSumAggregator()
    return UpdateAggregator(
        aggregation=dataclasses.asdict(spec.aggregation),
        central_dp=dataclasses.asdict(spec.privacy) if spec.privacy.mechanism == "client-central" else None,
        num_rounds=spec.num_rounds,
    )


def add_wire_filters(
    recipe: Recipe, uplink: CompressionConfig, downlink: CompressionConfig, he: CKKSParams | None
) -> None:
    """What a job does to models on the wire: compression each way, or HE (never both)."""
    if uplink.enabled:
        recipe.add_client_output_filter(CompressUpdate(**dataclasses.asdict(uplink)), tasks=[TRAIN_TASK])
        recipe.add_server_input_filter(DecompressUpdate(), tasks=[TRAIN_TASK])
    if downlink.enabled:
        recipe.add_server_output_filter(CompressUpdate(**dataclasses.asdict(downlink)), tasks=[TRAIN_TASK])
        recipe.add_client_input_filter(DecompressUpdate(), tasks=[TRAIN_TASK])
    if he is not None:
        from hospital_fl.flare.he import DecryptGlobalModel, EncryptUpdate

        # one filter per task: FLARE keeps a filter's tasks as a set, whose order would vary per export
        for task in (TRAIN_TASK, VALIDATE_TASK):
            recipe.add_client_input_filter(DecryptGlobalModel(), tasks=[task])
        recipe.add_client_output_filter(EncryptUpdate(ckks=he.to_json()), tasks=[TRAIN_TASK])


def add_live_metrics(recipe: Recipe) -> None:
    """The server writes the scalars each site streams per round (SiteExecutor) as TensorBoard
    event files under ``<server run dir>/tb_events/<site>/``.

    The sites' ConvertToFedEvent, which forwards the local analytics event to the server,
    comes with FLARE's job API. Only TensorBoard, so the exported job is the same wherever it
    is exported; docs/operations.md shows how to add FLARE's MLflowReceiver.
    """
    recipe._job.to_server(TBAnalyticsReceiver(tb_folder=TB_FOLDER), id="receiver")


def build_recipe(spec: JobSpec) -> Recipe:
    """A FLARE recipe for ``spec``, ready for SimEnv / PocEnv / ProdEnv or export."""
    recipe = HospitalRecipe(
        spec,
        name=spec.name,
        model=_model_of(spec),
        min_clients=spec.min_clients or spec.num_sites,
        num_rounds=spec.num_rounds,
        train_script=_NO_SCRIPT,
        aggregator=_aggregator_of(spec),
        # Under DP sites send no AUCs; the DP-released training loss selects the best model.
        key_metric="train_loss" if spec.privacy.enabled else "val_auc",
        key_metric_mode="min" if spec.privacy.enabled else "max",
    )
    recipe.site_executor = CXRTrainExecutor(**spec.executor_args())
    recipe.add_server_config({"server": {"task_request_interval": spec.task_request_interval}})
    add_wire_filters(recipe, spec.uplink, spec.downlink, spec.he)
    add_live_metrics(recipe)
    # hospital_fl is installed at every site: reference it, never copy it into app/custom.
    recipe._job.set_app_packages(["hospital_fl"])
    return recipe


STANDARD_JOBS = {
    "cxr_fedavg": JobSpec(name="cxr_fedavg", algorithm="fedavg"),
    "cxr_fedprox": JobSpec(name="cxr_fedprox", algorithm="fedprox"),
    "cxr_fedopt": JobSpec(name="cxr_fedopt", algorithm="fedopt"),
    "cxr_scaffold": JobSpec(name="cxr_scaffold", algorithm="scaffold"),
    # Robust to one faulty or malicious hospital and to one that is down or slow: the norm
    # screen plus a coordinate-wise trimmed mean, rounds that close with 4 of 5 sites (10
    # minutes at most, 30 s of grace for the fifth), int8 updates on the uplink.
    "cxr_robust": JobSpec(
        name="cxr_robust",
        algorithm="fedavg",
        aggregation=AggregationConfig(rule="trimmed_mean", trim=1),
        min_clients=4,
        round_timeout=600,
        wait_after_min=30,
        uplink=CompressionConfig("int8"),
    ),
    # The server aggregates what it cannot read: CKKS-encrypted updates (kits provisioned with he: true).
    "cxr_fedavg_he": JobSpec(name="cxr_fedavg_he", algorithm="fedavg", he=CKKSParams()),
    # Sample-level DP-SGD at every site, epsilon 8 over the whole job (delta 1e-5).
    "cxr_fedavg_dp": JobSpec(name="cxr_fedavg_dp", algorithm="fedavg", privacy=DPConfig("sample", 8.0)),
    # Production: DenseNet-121 at 224x224 on each hospital's own ingested DICOM, found through
    # the HOSPITAL_FL_SITE_DATA variable each site server sets (docker/ mounts it read-only).
    "cxr_site_densenet": JobSpec(
        name="cxr_site_densenet",
        model=ModelConfig(arch="densenet121", image_size=224),
        site_data="${HOSPITAL_FL_SITE_DATA}",
    ),
}


def export_recipe(recipe: Recipe, name: str, jobs_dir: str | Path) -> Path:
    """Write a recipe as the FLARE job folder ``jobs_dir/name`` (replacing an old one)."""
    target = Path(jobs_dir) / name
    if target.exists():
        shutil.rmtree(target)
    recipe.export(str(jobs_dir))
    return target


def export_job(spec: JobSpec, jobs_dir: str | Path) -> Path:
    """Write ``spec`` as a FLARE job folder ``jobs_dir/spec.name`` (replacing an old one)."""
    return export_recipe(build_recipe(spec), spec.name, jobs_dir)


def server_optimizer_in(controller_args: dict) -> ServerOptimizerConfig | None:
    """The server optimiser an exported FedOpt controller's arguments name (None: no FedOpt)."""
    optimizer = controller_args.get("optimizer_args")
    if not optimizer:
        return None
    kinds = {"torch.optim.Adam": "adam", "torch.optim.SGD": "sgdm"}
    return server_optimizer_from_json({"kind": kinds.get(optimizer.get("path", ""), "yogi"), **optimizer.get("args", {})})


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
    args = executors[0]["args"]
    workflow = server["workflows"][0]
    controller, kind = workflow["args"], workflow["path"].rsplit(".", 1)[-1]
    mu = controller.get("fedprox_mu")
    algorithm = {"RoundPolicyFedOpt": "fedopt", "RoundPolicyScaffold": "scaffold"}.get(
        kind, "fedprox" if mu else "fedavg"
    )
    aggregator = (controller.get("aggregator") or {}).get("args", {})
    server_optimizer = server_optimizer_in(controller) or ServerOptimizerConfig()
    return JobSpec(
        name=job_dir.name,
        algorithm=algorithm,
        num_rounds=controller["num_rounds"],
        fedprox_mu=mu or JobSpec.fedprox_mu,
        split=SplitConfig(**args.get("split", {})),
        model=ModelConfig(**args.get("model", {})),
        train=TrainConfig(**args.get("train", {})),
        data_path=args.get("data_path"),
        site_data=args.get("site_data"),
        privacy=DPConfig(**(args.get("privacy") or {})),
        task_request_interval=server.get("server", {}).get("task_request_interval", 2.0),
        aggregation=AggregationConfig(**(aggregator.get("aggregation") or {})),
        server_optimizer=server_optimizer,
        min_clients=controller.get("min_responses"),
        round_timeout=controller.get("round_timeout", 0),
        wait_after_min=controller.get("wait_after_min", 0),
        uplink=_codec_in(client, "task_result_filters"),
        downlink=_codec_in(server, "task_data_filters"),
        he=_he_in(client),
    )


def _codec_in(config: dict, section: str) -> CompressionConfig:
    """The CompressUpdate settings a config's filter section holds (none: no compression)."""
    for group in config.get(section, []):
        for f in group.get("filters", []):
            if f["path"].endswith(".CompressUpdate"):
                return CompressionConfig(**f.get("args", {}))
    return CompressionConfig()


def _he_in(config: dict) -> CKKSParams | None:
    """The CKKS parameters of a client config's EncryptUpdate filter (none: a plaintext job)."""
    for group in config.get("task_result_filters", []):
        for f in group.get("filters", []):
            if f["path"].endswith(".EncryptUpdate"):
                return CKKSParams.from_json(f.get("args", {}).get("ckks") or {})
    return None


def export_standard_jobs(jobs_dir: str | Path) -> list[Path]:
    return [export_job(spec, jobs_dir) for spec in STANDARD_JOBS.values()]
