"""The site-side privacy gate of a FLARE job: policy, budget check and the check-and-record of releases.

Reads the site's policy from its own kit (local/hospital_fl_privacy.json in the workspace's
site config folder, tightened by the job's privacy.json scope), checks the job's planned spend
before any training, and then holds every single release to the caps: ``SitePrivacyGate.spend``
checks it against the job's plan, ``max_job_epsilon`` and ``lifetime_epsilon`` and records it
in the site's ledger as one step under the ledger's lock, before anything leaves the site. A
refused release raises InputError; the executor answers the task with ``refusal_reply``.

``$HOSPITAL_FL_PRIVACY_HOME/<site>/`` may hold a policy that only tightens the kit's, and, for
a site with no policy in its kit (a simulated site, whose workspace FLARE recreates for every
run), the policy and the ledger. With a kit policy the ledger stays where the kit's policy puts
it: moving it to an empty folder by an environment variable would hand back the spent budget.
All decisions are made by the pure functions in hospital_fl.privacy; this module only finds
the files FLARE gives a site.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply

from hospital_fl.errors import InputError
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.ledger import PrivacyLedger, Spend
from hospital_fl.privacy.policy import (
    SITE_POLICY_FILE,
    BudgetCheck,
    SitePrivacyPolicy,
    check_job_budget,
    check_release,
    resolve_site_policy,
)
from hospital_fl.training.private_site import SitePrivacy

__all__ = [
    "SitePrivacyGate",
    "open_gate",
    "open_release_gate",
    "refuse_without_dp",
    "refusal_reply",
    "site_policy",
    "privacy_home",
    "PRIVACY_HOME_ENV",
]

PRIVACY_HOME_ENV = "HOSPITAL_FL_PRIVACY_HOME"


def privacy_home(workspace_root: str | Path, site: str) -> Path:
    """The override folder $HOSPITAL_FL_PRIVACY_HOME/<site>, or the workspace root without it."""
    base = os.environ.get(PRIVACY_HOME_ENV)
    return Path(base) / site if base else Path(workspace_root)


def refusal_reply(reason: str) -> Shareable:
    """A task's answer when the site refuses it: an error return code with the reason."""
    return make_reply(ReturnCode.EXECUTION_EXCEPTION, headers={ReservedHeaderKey.ERROR: reason})


@dataclass(frozen=True)
class SitePrivacyGate:
    """What a job may spend at this site, and the ledger every release is recorded in.

    ``allowance``: the releases per mechanism the job's plan covers (approved at its start).
    """

    job_id: str
    policy: SitePrivacyPolicy
    ledger: PrivacyLedger | None
    budget: BudgetCheck | None
    allowance: Mapping[str, int] | None = None

    def spend(self, releases: list[Spend]) -> float:
        """Check one release against the caps and record it, as one step under the ledger's
        lock; returns the job's epsilon after it. Raises InputError to refuse (nothing recorded)."""
        if self.ledger is None:
            if releases:
                raise InputError("privacy release", releases, "this job opened no ledger", "run it as a DP job")
            return 0.0
        allowance = dict(self.allowance) if self.allowance is not None else None
        job_epsilon = [0.0]

        def check(before, after) -> None:
            job_epsilon[0] = check_release(self.policy, self.job_id, before, after, allowance)

        self.ledger.spend(self.job_id, releases, check)
        return job_epsilon[0]

    def spend_round(self, privacy: SitePrivacy) -> float:
        """Check and record one training round's releases (training and metrics) before they leave."""
        return self.spend([Spend.gaussian(m, r) for m, r in privacy.round_releases().items()])

    record_round = spend_round


def site_policy(fl_ctx: FLContext) -> tuple[SitePrivacyPolicy, Path, bool]:
    """(the site's effective policy, the folder its ledger path is relative to, whether it is configured).

    Refuses a site whose policy is missing although it keeps a ledger: the privacy officer set
    it up, and running without the policy would drop its caps.
    """
    engine = fl_ctx.get_engine()
    workspace = engine.get_workspace()
    site = fl_ctx.get_identity_name()
    root = Path(workspace.get_root_dir())
    override = Path(os.environ[PRIVACY_HOME_ENV]) / site if os.environ.get(PRIVACY_HOME_ENV) else None
    kit_local = Path(workspace.get_site_config_dir())
    scope_properties = fl_ctx.get_prop(FLContextKey.SCOPE_PROPERTIES) or {}
    policy, in_kit = resolve_site_policy(kit_local, override / "local" if override else None, scope_properties)
    home = root if in_kit or override is None else override
    if not in_kit:
        # A kit that keeps a ledger had a policy: without it (deleted, or an override standing
        # in for it) its caps would silently stop applying.
        for folder, where in ((root, kit_local), (home, home / "local")):
            ledger = SitePrivacyPolicy().ledger_path(folder)
            if ledger.exists() and (folder == root or policy is None):
                raise InputError(
                    "site privacy policy",
                    str(where / SITE_POLICY_FILE),
                    f"it is missing, but this site keeps a privacy ledger ({ledger}), so its privacy officer set "
                    "budgets that would no longer apply",
                    "restore local/hospital_fl_privacy.json from the site's kit or backup (`hospital-fl privacy "
                    "init SITE_HOME --site SITE` writes the default policy and keeps the ledger)",
                )
    return policy or SitePrivacyPolicy(), home, policy is not None


def _job_key(fl_ctx: FLContext) -> str:
    # A job's ledger key is its id and start time: FLARE's simulator reuses one job id for
    # every run, and a restarted site process counting a job twice only over-reports.
    return f"{fl_ctx.get_job_id()}@{time.strftime('%Y-%m-%dT%H:%M:%S')}-{secrets.token_hex(3)}"


def _checked_ledger(policy: SitePrivacyPolicy, home: Path, site: str) -> PrivacyLedger:
    ledger = PrivacyLedger(policy.ledger_path(home))
    if (
        not ledger.path.exists() and not ledger.trail.exists()
    ):  # never set up (a missing ledger with a trail is a reset)
        raise InputError(
            "privacy ledger",
            str(ledger.path),
            f"site {site} has no privacy ledger, so a DP release could not be counted against its budget",
            f"the site's privacy officer runs `hospital-fl privacy init {home} --site {site}` once "
            "(it writes the default policy and an empty ledger; edit the policy's budgets after)",
        )
    ledger.check_against_audit()  # a deleted, edited or reset ledger is named before the job starts
    return ledger


def open_gate(fl_ctx: FLContext, dp: DPConfig, privacy: SitePrivacy | None) -> SitePrivacyGate:
    """Check a training job against this site's policy and budget; raises InputError to refuse."""
    if fl_ctx.get_engine() is None:  # a bare FLContext (a test harness): no site workspace, no policy to read
        if privacy is not None:
            raise InputError(
                "site workspace",
                None,
                "a DP job needs the site's FLARE workspace to keep its ledger",
                "run it in FLARE",
            )
        return SitePrivacyGate(fl_ctx.get_job_id() or "", SitePrivacyPolicy(), None, None)
    policy, home, _ = site_policy(fl_ctx)
    job_id = _job_key(fl_ctx)
    if privacy is None:  # no DP in this job: allowed only where the policy does not require it
        check_job_budget(policy, [], dp.mechanism, [])
        return SitePrivacyGate(job_id, policy, None, None)
    ledger = _checked_ledger(policy, home, fl_ctx.get_identity_name())
    entries = [e for e in ledger.entries() if e.job_id != job_id]
    others = [e.release for e in entries if e.kind == "gaussian"]
    other_pure = [(e.pure_epsilon, e.steps) for e in entries if e.kind == "laplace"]
    planned = privacy.planned_releases()
    budget = check_job_budget(policy, others, dp.mechanism, list(planned.values()), other_pure)
    return SitePrivacyGate(job_id, policy, ledger, budget, {m: int(r[2]) for m, r in planned.items()})


def open_release_gate(
    fl_ctx: FLContext, allowance: Mapping[str, int], max_job_epsilon: float | None = None
) -> SitePrivacyGate:
    """The gate of a job whose releases are not training rounds (e.g. the site profile): the
    site's ledger must exist and agree with its audit trail; each release is then checked and
    recorded by ``spend``.

    Args:
        allowance: releases per mechanism the job may make.
        max_job_epsilon: a ceiling of the job's own, applied where it is below the site's cap.
    """
    if fl_ctx.get_engine() is None:
        raise InputError("site workspace", None, "a DP release needs the site's ledger", "run it in FLARE")
    policy, home, _ = site_policy(fl_ctx)
    if max_job_epsilon is not None and (policy.max_job_epsilon is None or max_job_epsilon < policy.max_job_epsilon):
        policy = replace(policy, max_job_epsilon=max_job_epsilon)
    return SitePrivacyGate(
        _job_key(fl_ctx), policy, _checked_ledger(policy, home, fl_ctx.get_identity_name()), None, dict(allowance)
    )


def refuse_without_dp(fl_ctx: FLContext, job: str, fix: str) -> SitePrivacyPolicy:
    """A job that releases without DP: refused (InputError) where the site's policy requires DP."""
    if fl_ctx.get_engine() is None:
        return SitePrivacyPolicy()
    policy, _, _ = site_policy(fl_ctx)
    if policy.require_dp:
        raise InputError(
            f"{job} job",
            "no differential privacy",
            "this site's policy requires differential privacy applied at the site (require_dp), and this job "
            "releases updates trained without it",
            fix,
        )
    return policy
