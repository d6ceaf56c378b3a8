"""Run a CXR job in FLARE's simulator (SimEnv) and collect what it produced."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nvflare.fuel.utils.log_utils import default_log_dict
from nvflare.recipe.sim_env import SimEnv

from hospital_fl.data.splits import site_names
from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import HISTORY_FILE
from hospital_fl.flare.interrupts import sigterm_as_interrupt
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.flare.privacy_gate import PRIVACY_HOME_ENV
from hospital_fl.flare.progress import RoundWatcher
from hospital_fl.flare.recipes.cxr import build_recipe
from hospital_fl.jobspec import JobSpec
from hospital_fl.privacy.setup import init_site_privacy

__all__ = ["FederatedRun", "run_in_simulator", "run_recipe_in_simulator", "read_job_result", "simulator_env"]

GLOBAL_MODEL_FILE = "FL_global_model.pt"
CIPHERTEXT_MODEL_FILE = "FL_global_model.ckks"  # hospital_fl.flare.he writes it; no tenseal import here


@dataclass(frozen=True)
class FederatedRun:
    """What a finished federated job left behind, wherever it ran."""

    result_dir: Path
    global_model_path: Path
    history: list[dict]
    wall_seconds: float


def quiet_console_log_config(path: Path) -> Path:
    """FLARE's default logging, but only errors reach the console: full logs (warnings
    such as rejected updates included) stay in each participant's log.txt, and the
    terminal keeps the progress display readable."""
    config = copy.deepcopy(default_log_dict)
    config["handlers"]["consoleHandler"]["level"] = "ERROR"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def read_job_result(result_dir: str | Path, wall_seconds: float) -> FederatedRun:
    """Find the final global model and round history in a server job workspace."""
    result_dir = Path(result_dir)
    # An HE job's server holds only the encrypted global model (hospital_fl.flare.he).
    models = sorted(result_dir.rglob(GLOBAL_MODEL_FILE)) or sorted(result_dir.rglob(CIPHERTEXT_MODEL_FILE))
    histories = sorted(result_dir.rglob(HISTORY_FILE))
    if not models or not histories:
        raise RuntimeError(
            f"job result {result_dir} lacks {GLOBAL_MODEL_FILE} or {HISTORY_FILE}: the job did not finish; "
            "read the server log under that folder for the cause"
        )
    return FederatedRun(result_dir, models[0], json.loads(histories[0].read_text()), wall_seconds)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables (inherited by the simulator's processes) for a block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def simulator_env(workspace_root: Path, job_name: str, num_sites: int) -> SimEnv:
    """A simulator with every site as its own client process, a fresh workspace for
    ``job_name`` and a quiet console."""
    if (workspace_root / job_name).exists():
        shutil.rmtree(workspace_root / job_name)
    names = site_names(num_sites)
    return SimEnv(
        clients=names,
        num_threads=len(names),
        workspace_root=str(workspace_root),
        log_config=str(quiet_console_log_config(workspace_root / f"{job_name}.log_config.json")),
    )


def run_in_simulator(
    spec: JobSpec,
    workspace_root: str | Path,
    on_round: Callable[[int], None] | None = None,
    privacy_home: str | Path | None = None,
) -> FederatedRun:
    """Run ``spec`` with every site as a simulated FLARE client; returns its result.

    Args:
        spec: the job.
        workspace_root: the simulator workspace goes to ``workspace_root/spec.name`` (replaced).
        on_round: called with the number of finished rounds as the job progresses.
        privacy_home: where simulated sites keep their privacy policy and ledger
            (``<privacy_home>/<site>/``), kept across runs; default: a fresh folder per run.
    """
    if spec.he is not None:
        raise InputError(
            "he",
            "on",
            "FLARE's simulator has no startup kits, so no TenSEAL contexts: an HE job needs provisioned kits "
            "(FLARE's HEBuilder) and so a POC or production system",
            "run it with --poc (the POC is provisioned with HE), or drop HE for a simulator run",
        )
    workspace_root = Path(workspace_root).resolve()
    job_ws = workspace_root / spec.name
    env = simulator_env(workspace_root, spec.name, spec.num_sites)
    allow_bundle_components(job_ws / "local")
    # FLARE recreates simulated sites' workspaces each run, so their privacy policies and
    # ledgers live beside it; a fresh home has no budget limits (a real site's privacy
    # officer sets those in its kit).
    if privacy_home is None:
        home = workspace_root / f"{spec.name}.privacy"
        shutil.rmtree(home, ignore_errors=True)
    else:
        home = Path(privacy_home).resolve()
    if spec.privacy.enabled:
        for site in site_names(spec.num_sites):
            init_site_privacy(home / site, site)
    privacy_env = {PRIVACY_HOME_ENV: str(home)}
    return run_recipe_in_simulator(build_recipe(spec), env, job_ws, on_round, privacy_env)


def run_recipe_in_simulator(
    recipe, env: SimEnv, job_ws: Path, on_round: Callable[[int], None] | None = None, extra_env: dict | None = None
) -> FederatedRun:
    """Run a built recipe in ``env`` (made by ``simulator_env``); returns its result."""
    start = time.perf_counter()
    # FLARE kills the simulator's processes on KeyboardInterrupt; SIGTERM is made one too.
    with (
        sigterm_as_interrupt(),
        environment(extra_env or {}),
        RoundWatcher(job_ws / "server", on_round or (lambda k: None)),
    ):
        try:
            recipe.run(env)
        except RuntimeError as err:
            # FLARE handles the interrupt itself (kills the simulator's processes) and
            # reports it as return code -9; give the caller the interrupt back.
            if "return code -9" in str(err):
                raise KeyboardInterrupt("simulator interrupted") from err
            raise
    wall = time.perf_counter() - start
    return read_job_result(job_ws / "server", wall)
