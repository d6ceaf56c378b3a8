"""The component classes a site running this bundle approves, and the rule that checks a job's
configs against them.

FLARE builds whatever a job config's ``path`` names (a class, or any other callable) with the
arguments the job gives it, so a site approves exact classes, never a package prefix: under
``hospital_fl.`` alone sit functions that write files, delete folders and reset a privacy
ledger. The list is the classes the bundle's own jobs build and nothing else:

- the executors of the job-type map (job_types.EXECUTOR_JOB_TYPES), one per job type;
- the server and client components of the bundle's recipes (``BUNDLE_COMPONENTS``):
  controllers, aggregators, filters, models, the persistor, the FedOpt optimiser and the
  server's TensorBoard receiver for the metrics sites stream;
- what FLARE adds itself: the widgets of its job API, the log streamer a provisioned site
  injects into each client app (``FLARE_INJECTED``).

tests/unit/test_jobs.py checks the list against every exported job folder in both
directions. Pure: reads parsed configs, imports nothing from FLARE.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from hospital_fl.provisioning.job_types import EXECUTOR_JOB_TYPES

__all__ = [
    "APPROVED_CLASSES",
    "BUNDLE_COMPONENTS",
    "CLASS_KEYS",
    "FLARE_INJECTED",
    "class_references",
    "component_refusal",
]

# Class path -> its role in the bundle's jobs (executors come from the job-type map).
BUNDLE_COMPONENTS: Mapping[str, str] = {
    "hospital_fl.flare.controllers.RoundPolicyFedAvg": "server controller (FedAvg, FedProx)",
    "hospital_fl.flare.controllers.RoundPolicyFedOpt": "server controller (FedOpt)",
    "hospital_fl.flare.controllers.RoundPolicyScaffold": "server controller (SCAFFOLD)",
    "hospital_fl.flare.he.EncryptedFedAvg": "server controller (HE)",
    "hospital_fl.flare.profile_job.ProfileComparison": "server controller (site profiles)",
    "hospital_fl.flare.aggregator.UpdateAggregator": "server aggregator",
    "hospital_fl.flare.he.EncryptedSumAggregator": "server aggregator (HE)",
    "hospital_fl.flare.filters.CompressUpdate": "client result filter (compression)",
    "hospital_fl.flare.filters.DecompressUpdate": "server result filter (compression)",
    "hospital_fl.flare.he.EncryptUpdate": "client result filter (HE)",
    "hospital_fl.flare.he.DecryptGlobalModel": "client task filter (HE)",
    "hospital_fl.models.cxr.CXRClassifier": "model (CXR jobs)",
    "hospital_fl.models.seg.SegNetwork": "model (segmentation job)",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor": "server persistor",
    "torch.optim.Adam": "FedOpt server optimiser",
    "torch.optim.SGD": "FedOpt server optimiser",
    "torch.optim.lr_scheduler.ConstantLR": "FedOpt server learning-rate schedule",
    "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver": "server analytics receiver (live metrics)",
    "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval": "server controller (cross-site evaluation)",
}

# Components FLARE adds itself: its job API to every job it exports (nvflare.job_config.base_fed_job
# BaseFedJob and the recipe's model locator), and a provisioned site's SiteLogStreamer to each client
# app after deploy (nvflare.app_common.logging.site_log_streamer). Not chosen by the bundle.
FLARE_INJECTED: Mapping[str, str] = {
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent": "client widget (BaseFedJob)",
    "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector": "server widget (BaseFedJob)",
    "nvflare.app_common.widgets.metrics_artifact_writer.MetricsArtifactWriter": "server widget (BaseFedJob)",
    "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator": "server widget (BaseFedJob)",
    "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator": "server model locator (FedAvgRecipe)",
    "nvflare.app_common.logging.job_log_streamer.JobLogStreamer": "client log streamer (SiteLogStreamer)",
}

APPROVED_CLASSES: frozenset[str] = frozenset(EXECUTOR_JOB_TYPES) | frozenset(BUNDLE_COMPONENTS) | frozenset(
    FLARE_INJECTED
)

# The keys by which FLARE's component builder names what to build (fuel.utils.component_builder).
CLASS_KEYS = ("path", "class_path", "name")


def class_references(config, where: str = "") -> Iterator[tuple[str, object]]:
    """(location, value) of every ``path``/``class_path``/``name`` key anywhere in a parsed config.

    FLARE builds nested ``{"path": ..., "args": ...}`` dicts recursively, and some of the
    bundle's classes build ``config_type: dict`` entries themselves (FedOpt's optimiser), so
    every level counts, not only the top-level sections.
    """
    if isinstance(config, Mapping):
        for key in CLASS_KEYS:
            if key in config:
                yield f"{where}.{key}".lstrip("."), config[key]
        for key, value in config.items():
            yield from class_references(value, f"{where}.{key}")
    elif isinstance(config, list):
        for i, item in enumerate(config):
            yield from class_references(item, f"{where}[{i}]")


def component_refusal(
    config, label: str, site: str = "this site", approved: frozenset[str] = APPROVED_CLASSES
) -> str:
    """Why ``site`` refuses an app whose parsed config ``label`` names a class it did not approve, or "".

    Exact match only: a function, a module, a prefix or a class outside the list is refused
    wherever it appears (executors, components, workflows, filters, nested arguments).
    """
    for where, value in class_references(config):
        if isinstance(value, str) and value in approved:
            continue
        return (
            f"{site} refuses the job: component {value!r} at {where} in {label} is not an approved class; "
            f"approved: {', '.join(sorted(approved))}; ask the consortium to ship a job built by hospital-fl "
            "(docs/security/job-components.md)"
        )
    return ""
