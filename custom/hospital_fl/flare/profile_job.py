"""A FLARE job that compares the hospitals' data before any training: covariate and label shift.

Each site computes its profile from its ingested dataset (consented patients only) and
sends only the differentially private release (Laplace noise, the site's epsilon); the
server compares the releases and writes site_profiles.json (every release and the shift
report) into its run folder. No image, identifier or exact count leaves a site.

A release spends privacy: it is checked against the site's caps and recorded in the site's
ledger as a pure-epsilon (Laplace) entry before it leaves, once per job (a server asking twice
is refused). ``max_job_epsilon`` caps it, and a site that sets no per-job cap still never
releases a profile above ``MAX_PROFILE_EPSILON``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nvflare.apis.controller_spec import Task
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from hospital_fl.data.ingest.profile import ProfileConfig, SiteProfile
from hospital_fl.data.ingest.profile_site import profile_site
from hospital_fl.data.ingest.shift import ShiftConfig, compare_profiles
from hospital_fl.data.ingest.site_dataset import site_data_path
from hospital_fl.data.splits import site_names
from hospital_fl.errors import InputError
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.flare.privacy_gate import (
    PRIVACY_HOME_ENV,
    SitePrivacyGate,
    open_release_gate,
    refusal_reply,
)
from hospital_fl.flare.runners.simulator import environment, simulator_env
from hospital_fl.privacy.ledger import Spend
from hospital_fl.privacy.setup import init_site_privacy

__all__ = [
    "PROFILE_TASK",
    "PROFILE_MECHANISM",
    "MAX_PROFILE_EPSILON",
    "RESULT_FILE",
    "ProfileComparison",
    "ProfileRecipe",
    "SiteProfileExecutor",
    "run_profile_in_simulator",
]

PROFILE_TASK = "site_profile"
RESULT_FILE = "site_profiles.json"
PROFILE_MECHANISM = "profile"  # a Laplace (pure epsilon) entry in the site's ledger
# The bundle's ceiling for one profile release where the site sets no max_job_epsilon: at
# epsilon 10 the Laplace noise on a count is about 0.1 patient already.
MAX_PROFILE_EPSILON = 10.0


class SiteProfileExecutor(Executor):
    """Answers the profile task with this site's DP profile release.

    Args:
        site_data: the site's dataset folder ("{site}" is replaced by the FLARE client name).
        epsilon: the epsilon of this release (Laplace; validated, never 0 or infinite).
    """

    def __init__(self, site_data: str, epsilon: float = 1.0):
        super().__init__()
        self.site_data, self.epsilon = site_data, epsilon
        self.cfg = ProfileConfig(epsilon=epsilon)
        self._gate: SitePrivacyGate | None = None

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name != PROFILE_TASK:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        name = fl_ctx.get_identity_name()
        try:
            if self._gate is None:  # one gate per job: its allowance is one release
                self._gate = open_release_gate(fl_ctx, {PROFILE_MECHANISM: 1}, max_job_epsilon=MAX_PROFILE_EPSILON)
            # Checked and recorded before the data is even read: a refused release touches nothing.
            # A profile that then fails to compute over-reports one release, never under-reports.
            job_epsilon = self._gate.spend([Spend.laplace(PROFILE_MECHANISM, self.epsilon)])
            _, released = profile_site(site_data_path(self.site_data, name), self.cfg)
        except (InputError, ValueError) as err:
            reason = f"site profile refused at {name}: {err}"
            self.log_error(fl_ctx, reason)
            return refusal_reply(reason)
        self.log_info(fl_ctx, f"released the site profile with Laplace noise at epsilon {job_epsilon} (recorded)")
        reply = make_reply(ReturnCode.OK)
        reply["profile"] = released.to_dict()
        return reply


class ProfileComparison(Controller):
    """Collects every site's released profile and flags sites whose data differ from the rest.

    Args:
        min_sites: releases needed before comparing (the job fails below it).
        timeout: seconds the sites have to answer (0: no limit).
        shift: ShiftConfig fields (thresholds).
    """

    def __init__(self, min_sites: int = 2, timeout: int = 600, shift: dict | None = None):
        super().__init__()
        self.min_sites, self.timeout, self.shift = min_sites, timeout, shift
        self.shift_cfg = ShiftConfig(**(shift or {}))

    def start_controller(self, fl_ctx: FLContext) -> None:
        pass

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        pass

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        task = Task(name=PROFILE_TASK, data=Shareable(), timeout=self.timeout)
        self.broadcast_and_wait(task, fl_ctx, min_responses=self.min_sites, abort_signal=abort_signal)
        profiles, failed = {}, []
        for client_task in task.client_tasks:
            site, result = client_task.client.name, client_task.result
            if result is None or result.get_return_code() != ReturnCode.OK or "profile" not in result:
                failed.append(site)
                continue
            try:
                profiles[site] = SiteProfile.from_dict(result["profile"], source=f"{site}'s profile")
            except InputError as err:
                self.log_error(fl_ctx, f"rejected {site}'s profile: {err}")
                failed.append(site)
        if len(profiles) < self.min_sites:
            self.system_panic(
                f"only {len(profiles)} site profiles arrived ({failed} failed); need {self.min_sites}", fl_ctx
            )
            return
        report = compare_profiles(profiles, self.shift_cfg)
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        out = {
            "profiles": {s: p.to_dict() for s, p in sorted(profiles.items())},
            "shift": report.to_dict(),
            "sites_without_profile": sorted(failed),
        }
        (run_dir / RESULT_FILE).write_text(json.dumps(out, indent=1))
        self.log_info(fl_ctx, f"site profiles compared; flagged: {list(report.flagged_sites) or 'none'}")


class ProfileRecipe(Recipe):
    """The profile comparison as a FLARE job (SimEnv, PocEnv or ProdEnv)."""

    def __init__(self, site_data: str, num_sites: int, epsilon: float = 1.0, name: str = "site_profiles"):
        job = FedJob(name=name, min_clients=num_sites)
        job.to_server(ProfileComparison(min_sites=num_sites), id="profile_comparison")
        job.to_clients(SiteProfileExecutor(site_data=site_data, epsilon=epsilon), tasks=[PROFILE_TASK])
        # hospital_fl is installed at every site: without this FLARE copies the package into
        # app/custom, which makes the job one that ships code (submittable only by a project admin).
        job.set_app_packages(["hospital_fl"])
        super().__init__(job)


def run_profile_in_simulator(
    site_data: str,
    num_sites: int,
    workspace_root: str | Path,
    epsilon: float = 1.0,
    privacy_home: str | Path | None = None,
) -> dict:
    """Run the profile comparison with site-1..site-N as simulated FLARE clients; returns site_profiles.json.

    ``privacy_home``: where the simulated sites keep their privacy policy and ledger
    (``<privacy_home>/<site>/``), kept across runs; default: a fresh folder per run.
    """
    workspace_root = Path(workspace_root).resolve()
    name = "site_profiles"
    env = simulator_env(workspace_root, name, num_sites)
    allow_bundle_components(workspace_root / name / "local")
    if privacy_home is None:
        home = workspace_root / f"{name}.privacy"
        shutil.rmtree(home, ignore_errors=True)
    else:
        home = Path(privacy_home).resolve()
    for site in site_names(num_sites):
        init_site_privacy(home / site, site)
    with environment({PRIVACY_HOME_ENV: str(home)}):
        ProfileRecipe(site_data, num_sites, epsilon, name).run(env)
    found = sorted((workspace_root / name).rglob(RESULT_FILE))
    if not found:
        raise RuntimeError(
            f"the profile job wrote no {RESULT_FILE} under {workspace_root / name}: read the server log there"
        )
    return json.loads(found[0].read_text())
