"""Run cross-site evaluation in FLARE's simulator or on a POC system, and collect its results.

- ``run_training_with_cross_site``: a training job that ends with cross-site evaluation of its
  own models (recipes.cross_site.add_cross_site_eval), in one simulator or POC session.
- ``run_cross_site_job_in_simulator``: the standalone job a lead submits after training
  (recipes.cross_site.CrossSiteEvalRecipe); simulated sites find the local models their
  training job kept through $HOSPITAL_FL_SITE_STATE, which must then be set for both jobs
  (FLARE recreates a simulated site's workspace for each job).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from hospital_fl.flare.cross_site import read_cross_site_results
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.flare.privacy_gate import PRIVACY_HOME_ENV
from hospital_fl.flare.recipes.cross_site import CROSS_SITE_JOB, CrossSiteEvalRecipe, add_cross_site_eval
from hospital_fl.flare.recipes.cxr import build_recipe, export_recipe
from hospital_fl.flare.runners.simulator import (
    FederatedRun,
    environment,
    run_recipe_in_simulator,
    simulator_env,
)
from hospital_fl.jobspec import JobSpec

__all__ = ["run_cross_site_job_in_simulator", "run_training_with_cross_site"]


def _fresh_privacy_home(workspace_root: Path, name: str) -> dict[str, str]:
    """A fresh privacy home (no budget limits) for simulated sites, as run_in_simulator gives a job without DP."""
    home = workspace_root / f"{name}.privacy"
    shutil.rmtree(home, ignore_errors=True)
    return {PRIVACY_HOME_ENV: str(home)}


def run_training_with_cross_site(
    spec: JobSpec,
    workspace_root: str | Path,
    mode: Literal["simulator", "poc"] = "simulator",
    on_round: Callable[[int], None] | None = None,
) -> tuple[FederatedRun, dict]:
    """Train ``spec`` and evaluate its models across the sites in the same FLARE session.

    Returns:
        (the training run, {sending site: {model owner: cell}} as FLARE recorded it).

    Raises:
        InputError: an HE or DP job (cross-site evaluation does not apply).
    """
    workspace_root = Path(workspace_root).resolve()
    if mode == "poc":
        from hospital_fl.flare.runners.poc import run_in_poc

        with tempfile.TemporaryDirectory() as jobs_dir:
            folder = export_recipe(add_cross_site_eval(build_recipe(spec)), spec.name, jobs_dir)
            run = run_in_poc(spec, workspace_root, on_round=on_round, job_dir=folder)
        return run, read_cross_site_results(run.result_dir)
    recipe = add_cross_site_eval(build_recipe(spec))
    job_ws = workspace_root / spec.name
    env = simulator_env(workspace_root, spec.name, spec.num_sites)
    allow_bundle_components(job_ws / "local")
    run = run_recipe_in_simulator(recipe, env, job_ws, on_round, _fresh_privacy_home(workspace_root, spec.name))
    return run, read_cross_site_results(run.result_dir)


def run_cross_site_job_in_simulator(
    spec: JobSpec, global_model: str | Path, workspace_root: str | Path, site_state: str | Path
) -> dict:
    """Run the standalone cross-site job in the simulator; returns FLARE's results
    ({sending site: {model owner: cell}}).

    Args:
        spec: the training job's settings (network and data).
        global_model: the trained global model file (FLARE persistor layout).
        workspace_root: the simulator workspace goes to ``workspace_root/cxr_cross_site_eval``.
        site_state: the $HOSPITAL_FL_SITE_STATE folder the training job ran with.
    """
    from hospital_fl.data.ingest.site_dataset import SITE_STATE_ENV

    workspace_root = Path(workspace_root).resolve()
    recipe = CrossSiteEvalRecipe(spec, str(Path(global_model).resolve()))
    env = simulator_env(workspace_root, CROSS_SITE_JOB, spec.num_sites)
    allow_bundle_components(workspace_root / CROSS_SITE_JOB / "local")
    extra = {**_fresh_privacy_home(workspace_root, CROSS_SITE_JOB), SITE_STATE_ENV: str(Path(site_state).resolve())}
    with environment(extra):
        recipe.run(env)
    return read_cross_site_results(workspace_root / CROSS_SITE_JOB / "server")
