"""The site-side privacy gate of a FLARE job: policy, budget check and ledger recording.

Reads the site's policy from its own workspace (local/hospital_fl_privacy.json and the
job's privacy.json scope), checks the job's planned spend before any training, and
records every round's releases in the site's ledger. All decisions are made by the pure
functions in hospital_fl.privacy; this module only finds the files FLARE gives a site.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from hospital_fl.errors import InputError
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.ledger import PrivacyLedger
from hospital_fl.privacy.policy import BudgetCheck, SitePrivacyPolicy, check_job_budget, read_site_policy
from hospital_fl.privacy.site import SitePrivacy

__all__ = ["SitePrivacyGate", "open_gate", "privacy_home", "PRIVACY_HOME_ENV"]

# Where a site keeps its privacy policy and ledger when not in its FLARE workspace:
# $HOSPITAL_FL_PRIVACY_HOME/<site>/ (e.g. a mounted volume that outlives containers, or
# simulated sites, whose workspaces FLARE recreates for every run).
PRIVACY_HOME_ENV = "HOSPITAL_FL_PRIVACY_HOME"


def privacy_home(workspace_root: str | Path, site: str) -> Path:
    """The folder holding a site's local/hospital_fl_privacy.json and its ledger."""
    base = os.environ.get(PRIVACY_HOME_ENV)
    return Path(base) / site if base else Path(workspace_root)


@dataclass(frozen=True)
class SitePrivacyGate:
    job_id: str
    policy: SitePrivacyPolicy
    ledger: PrivacyLedger | None
    budget: BudgetCheck | None

    def record_round(self, privacy: SitePrivacy) -> float:
        """Record one round's releases; returns the job's epsilon so far (policy delta)."""
        if self.ledger is None:
            return 0.0
        for mechanism, (noise, rate, steps) in privacy.round_releases().items():
            self.ledger.record(self.job_id, mechanism, noise, rate, steps)
        return self.ledger.epsilon(self.policy.delta, self.policy.accountant, job_id=self.job_id)


def open_gate(fl_ctx: FLContext, dp: DPConfig, privacy: SitePrivacy | None) -> SitePrivacyGate:
    """Check the job against this site's policy and budget; raises InputError to refuse."""
    engine = fl_ctx.get_engine()
    if engine is None:  # a bare FLContext (a test harness): no site workspace, no policy to read
        if privacy is not None:
            raise InputError(
                "site workspace",
                None,
                "a DP job needs the site's FLARE workspace to keep its ledger",
                "run it in FLARE",
            )
        return SitePrivacyGate(fl_ctx.get_job_id() or "", SitePrivacyPolicy(), None, None)
    workspace = engine.get_workspace()
    scope_properties = fl_ctx.get_prop(FLContextKey.SCOPE_PROPERTIES) or {}
    home = privacy_home(workspace.get_root_dir(), fl_ctx.get_identity_name())
    local_dir = home / "local" if os.environ.get(PRIVACY_HOME_ENV) else Path(workspace.get_site_config_dir())
    configured = read_site_policy(local_dir, scope_properties)
    policy = configured or SitePrivacyPolicy()
    # A job's ledger key is its id and start time: FLARE's simulator reuses one job id for
    # every run, and a restarted site process counting a job twice only over-reports.
    job_id = f"{fl_ctx.get_job_id()}@{time.strftime('%Y-%m-%dT%H:%M:%S')}"
    if privacy is None:  # no DP in this job: allowed only where the policy does not require it
        check_job_budget(policy, [], dp.mechanism, [])
        return SitePrivacyGate(job_id, policy, None, None)
    ledger = PrivacyLedger(policy.ledger_path(home))
    others = [e.release for e in ledger.entries() if e.job_id != job_id]
    budget = check_job_budget(policy, others, dp.mechanism, list(privacy.planned_releases().values()))
    return SitePrivacyGate(job_id, policy, ledger, budget)
