"""Cross-site evaluation as FLARE jobs: FLARE's CrossSiteModelEval, answered by the sites' executor.

- ``add_cross_site_eval(recipe)``: a training recipe (recipes.cxr.build_recipe) that ends by
  evaluating its own models: the global model(s) its persistor saved (final and best round)
  and each hospital's last local model, every one scored at every hospital. Training and
  evaluation run in one FLARE session (the demo uses it).
- ``CrossSiteEvalRecipe``: the evaluation alone, for a lead to submit after any training job
  (``jobs/cxr_cross_site_eval``). The server reads the trained global model from
  ``global_model``, an absolute path on the server machine (PTFileModelPersistor's
  ``source_ckpt_file_full_name``, the convention of FLARE's own FedEvalRecipe ``eval_ckpt``);
  each hospital submits the last local model its own training job kept
  (hospital_fl.flare.cross_site).

FLARE's CrossSiteModelEval is the controller FLARE's own recipe utility
(nvflare.recipe.utils.add_cross_site_evaluation) adds; that utility is not called here because
it adds a second model locator and a second ValidationJsonGenerator beside the ones every
training recipe already has (two widgets writing one results file). The sites run the
installed CXRTrainExecutor for "submit_model" and "validate", so the job type is "cxr" and
the only new class a site approves is FLARE's controller.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from hospital_fl.errors import InputError
from hospital_fl.flare.cross_site import SUBMIT_MODEL_TASK
from hospital_fl.flare.executor import VALIDATE_TASK, CXRTrainExecutor
from hospital_fl.flare.recipes.cxr import export_recipe
from hospital_fl.jobspec import JobSpec

__all__ = [
    "CROSS_SITE_JOB",
    "CROSS_SITE_TASKS",
    "DEFAULT_GLOBAL_MODEL",
    "CrossSiteEvalRecipe",
    "add_cross_site_eval",
    "export_cross_site_job",
]

CROSS_SITE_JOB = "cxr_cross_site_eval"
CROSS_SITE_TASKS = (SUBMIT_MODEL_TASK, VALIDATE_TASK)
# Where the exported job looks on the server: the server image's workspace volume (docker/).
DEFAULT_GLOBAL_MODEL = "/workspace/models/global_model.pt"


def _check_evaluable(spec: JobSpec) -> None:
    if spec.he is not None:
        raise InputError(
            "he",
            "on",
            "the server of an HE job holds only the encrypted global model, and a site's local model would show "
            "the update HE hides",
            "evaluate an HE job at the sites (its final model is scored there), or train without HE",
        )
    if spec.privacy.enabled:
        raise InputError(
            "privacy",
            spec.privacy.mechanism,
            "under DP each site keeps its scores, so no cross-site cell would leave a site",
            "run cross-site evaluation for jobs without DP",
        )


def add_cross_site_eval(recipe: Recipe) -> Recipe:
    """End a training recipe (recipes.cxr.build_recipe) with FLARE's cross-site evaluation of
    its own models; returns the recipe.

    Raises:
        InputError: an HE or DP job (see ``_check_evaluable``), or a recipe without the
            model locator FLARE's PyTorch recipes add.
    """
    _check_evaluable(recipe.spec)
    locator_id = recipe._job.comp_ids.get("locator_id")
    if not locator_id:
        raise InputError(
            "recipe", type(recipe).__name__, "it must have FLARE's model locator", "use recipes.cxr.build_recipe"
        )
    recipe._job.to_server(CrossSiteModelEval(model_locator_id=locator_id), id="cross_site_eval")
    recipe.extra_site_tasks = CROSS_SITE_TASKS
    return recipe


class CrossSiteEvalRecipe(Recipe):
    """Cross-site evaluation after a finished training job, as a FLARE job.

    Args:
        spec: the training job's settings: the sites build the same network and read the
            same data (its split, data path or site data) as it did.
        global_model: absolute path, on the server machine, of the trained global model in
            the layout FLARE's persistor writes (FL_global_model.pt, or the demo's
            out/global_model.pt).
        name: the job's name.
    """

    def __init__(self, spec: JobSpec, global_model: str = DEFAULT_GLOBAL_MODEL, name: str = CROSS_SITE_JOB):
        _check_evaluable(spec)
        if not PurePosixPath(global_model).is_absolute() and not Path(global_model).is_absolute():
            raise InputError(
                "global_model",
                global_model,
                "it must be an absolute path on the server (a relative one is read from app/custom, which this "
                "bundle never ships)",
                f"pass e.g. {DEFAULT_GLOBAL_MODEL}",
            )
        job = FedJob(name=name, min_clients=spec.num_sites)
        job.to_server(PTFileModelPersistor(source_ckpt_file_full_name=global_model), id="persistor")
        job.to_server(PTFileModelLocator(pt_persistor_id="persistor"), id="locator")
        job.to_server(ValidationJsonGenerator(), id="json_generator")
        job.to_server(CrossSiteModelEval(model_locator_id="locator"), id="cross_site_eval")
        job.to_clients(CXRTrainExecutor(**spec.executor_args()), tasks=list(CROSS_SITE_TASKS))
        # hospital_fl is installed at every site: reference it, never copy it into app/custom.
        job.set_app_packages(["hospital_fl"])
        super().__init__(job)


def export_cross_site_job(
    jobs_dir: str | Path, global_model: str = DEFAULT_GLOBAL_MODEL, spec: JobSpec | None = None
) -> Path:
    """Write the cross-site evaluation job folder ``jobs_dir/cxr_cross_site_eval`` (replacing an old one)."""
    spec = spec or JobSpec(name=CROSS_SITE_JOB)
    return export_recipe(CrossSiteEvalRecipe(spec, global_model, CROSS_SITE_JOB), CROSS_SITE_JOB, jobs_dir)
