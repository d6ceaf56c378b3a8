"""The brain-tumour segmentation job: a FLARE FedAvg recipe whose sites run SegTrainExecutor.

``SegJobSpec`` is plain typed data; ``build_seg_recipe`` turns it into FLARE's FedAvg recipe
(the bundle's round policy, screening aggregator with key metric val_dice, compression
and HE filters and the live-metrics receiver exactly as the CXR jobs use them); ``export_seg_job`` writes jobs/seg_fedavg.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe.spec import Recipe

from hospital_fl.compression.codecs import CompressionConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import UpdateAggregator
from hospital_fl.flare.recipes.cxr import (
    _InstalledSiteCode,
    add_live_metrics,
    add_wire_filters,
    export_recipe,
    round_controller,
    server_optimizer_in,
)
from hospital_fl.flare.seg_executor import SegTrainExecutor
from hospital_fl.jobspec import SegJobSpec
from hospital_fl.models.seg import SegModelConfig, SegNetwork
from hospital_fl.segmentation.pipeline import SegPipelineConfig, SegTrainConfig

__all__ = ["SegJobSpec", "build_seg_recipe", "export_seg_job", "read_seg_job_folder", "SEG_JOBS"]

class SegRecipe(_InstalledSiteCode, FedAvgRecipe):
    """FLARE's FedAvg recipe for segmentation: FedAvg, FedAvgM (FLARE's FedOpt) or the HE controller."""

    def __init__(self, spec: SegJobSpec, **kwargs):
        self.spec = spec
        super().__init__(**kwargs)

    def _create_controller(self, persistor_id: str, model_params, model_aggregator):
        spec = self.spec
        return round_controller(
            self._building_job,
            num_sites=spec.num_sites,
            num_rounds=spec.num_rounds,
            persistor_id=persistor_id,
            model_params=model_params,
            aggregator=model_aggregator,
            policy=dict(
                min_responses=spec.min_clients, round_timeout=spec.round_timeout, wait_after_min=spec.wait_after_min
            ),
            he=spec.he is not None,
            server_optimizer=spec.server_optimizer,
            network=lambda: _network(spec),
        )


def _network(spec: SegJobSpec) -> SegNetwork:
    m = spec.model
    return SegNetwork(m.arch, m.in_channels, m.out_channels, m.init_filters, m.dropout)


def build_seg_recipe(spec: SegJobSpec) -> Recipe:
    """A FLARE recipe for ``spec``, ready for SimEnv / PocEnv / ProdEnv or export."""
    if spec.he is not None:
        from hospital_fl.flare.he import EncryptedSumAggregator

        aggregator = EncryptedSumAggregator()
    else:
        aggregator = UpdateAggregator(num_rounds=spec.num_rounds)
    recipe = SegRecipe(
        spec,
        name=spec.name,
        model=_network(spec),
        min_clients=spec.min_clients or spec.num_sites,
        num_rounds=spec.num_rounds,
        train_script="hospital_fl.flare.seg_executor",  # unused: sites run the installed executor
        aggregator=aggregator,
        key_metric="val_dice",
        key_metric_mode="max",
    )
    recipe.site_executor = SegTrainExecutor(**spec.executor_args())
    recipe.add_server_config({"server": {"task_request_interval": spec.task_request_interval}})
    add_wire_filters(recipe, spec.uplink, CompressionConfig(), spec.he)
    add_live_metrics(recipe)
    recipe._job.set_app_packages(["hospital_fl"])
    return recipe


SEG_JOBS = {"seg_fedavg": SegJobSpec()}


def export_seg_job(spec: SegJobSpec, jobs_dir: str | Path) -> Path:
    """Write ``spec`` as a FLARE job folder ``jobs_dir/spec.name`` (replacing an old one)."""
    return export_recipe(build_seg_recipe(spec), spec.name, jobs_dir)


def read_seg_job_folder(job_dir: str | Path) -> SegJobSpec:
    """The SegJobSpec an exported segmentation job folder holds (rounds, sites, site settings)."""
    job_dir = Path(job_dir)
    try:
        client = json.loads((job_dir / "app" / "config" / "config_fed_client.json").read_text())
        server = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())
        executor = next(
            e["executor"] for e in client["executors"] if e["executor"]["path"].endswith(".SegTrainExecutor")
        )
    except (OSError, KeyError, StopIteration, json.JSONDecodeError) as err:
        raise InputError(
            "job folder",
            str(job_dir),
            f"it must be an exported segmentation job whose sites run SegTrainExecutor ({err})",
            "pass jobs/seg_fedavg (regenerate with `hospital-fl export-jobs`)",
        ) from None
    args, workflow = executor["args"], server["workflows"][0]
    controller = workflow["args"]
    server_optimizer = server_optimizer_in(controller)
    return SegJobSpec(
        name=job_dir.name,
        num_sites=controller.get("num_clients", 3),  # FLARE omits arguments at their default (FedAvg's is 3)
        min_clients=controller.get("min_responses"),
        round_timeout=controller.get("round_timeout", 0),
        wait_after_min=controller.get("wait_after_min", 0),
        task_request_interval=server.get("server", {}).get("task_request_interval", 2.0),
        num_rounds=controller["num_rounds"],
        datalist=args["datalist"],
        model=SegModelConfig(**args["model"]),
        pipeline=SegPipelineConfig(**args["pipeline"]),
        train=SegTrainConfig(**args["train"]),
        server_optimizer=server_optimizer,
    )
