"""A site's privacy policy and the budget check every job must pass before it trains.

The policy is written by the site's privacy officer in two places, both in the site's own
startup kit (never sent by a job):
- ``local/hospital_fl_privacy.json``: the bundle's site config (lifetime and per-job
  epsilon, delta, accountant, ledger location);
- a scope of FLARE's ``local/privacy.json``: ``"properties": {"hospital_fl_privacy": {...}}``
  with the same keys, applying to jobs submitted with that scope.
A scope can only tighten the site config (smaller budgets, DP required), never loosen it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from hospital_fl.errors import InputError
from hospital_fl.privacy.accounting import Release, epsilon_of
from hospital_fl.privacy.config import ACCOUNTANTS, SITE_MECHANISMS

__all__ = [
    "SitePrivacyPolicy",
    "BudgetCheck",
    "SITE_POLICY_FILE",
    "SCOPE_PROPERTY",
    "policy_from_dict",
    "read_site_policy",
    "check_job_budget",
]

SITE_POLICY_FILE = "hospital_fl_privacy.json"  # in the site's local/ folder
SCOPE_PROPERTY = "hospital_fl_privacy"  # key inside a privacy.json scope's properties
_KEYS = ("require_dp", "max_job_epsilon", "lifetime_epsilon", "delta", "accountant", "ledger")


@dataclass(frozen=True)
class SitePrivacyPolicy:
    """What a site allows. ``None`` budgets mean "not limited" (spend is still recorded).

    Attributes:
        require_dp: refuse any job whose training is not DP at this site.
        max_job_epsilon: the most one job may spend (all its mechanisms composed).
        lifetime_epsilon: the most all jobs together may ever spend at this site.
        delta: the delta at which budgets and the ledger are reported.
        accountant: "rdp" or "prv".
        ledger: ledger path, relative to the site workspace unless absolute.
    """

    require_dp: bool = False
    max_job_epsilon: float | None = None
    lifetime_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    ledger: str = "privacy/ledger.json"

    def tightened_by(self, scope: "SitePrivacyPolicy") -> "SitePrivacyPolicy":
        def smaller(a, b):
            return b if a is None else a if b is None else min(a, b)

        return replace(
            self,
            require_dp=self.require_dp or scope.require_dp,
            max_job_epsilon=smaller(self.max_job_epsilon, scope.max_job_epsilon),
            lifetime_epsilon=smaller(self.lifetime_epsilon, scope.lifetime_epsilon),
            delta=min(self.delta, scope.delta),
        )

    def ledger_path(self, workspace_root: str | Path) -> Path:
        path = Path(self.ledger)
        return path if path.is_absolute() else Path(workspace_root) / path


def policy_from_dict(data: object, source: str) -> SitePrivacyPolicy:
    """Parse and validate a policy; errors name ``source``, the field, the value and the fix."""
    if not isinstance(data, dict):
        raise InputError(source, data, "a privacy policy must be a JSON object", f"use keys {_KEYS}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise InputError(f"{source}: {unknown[0]}", data[unknown[0]], f"unknown key; allowed: {_KEYS}", "remove it")
    policy = SitePrivacyPolicy(**data)

    def bad(field: str, rule: str, fix: str) -> InputError:
        return InputError(f"{source}: {field}", getattr(policy, field), rule, fix)

    if not isinstance(policy.require_dp, bool):
        raise bad("require_dp", "it must be true or false", "use true to refuse non-private jobs")
    for field in ("max_job_epsilon", "lifetime_epsilon"):
        value = getattr(policy, field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise bad(field, "epsilon must be a number > 0 (or null for no limit)", "use e.g. 8")
    if not isinstance(policy.delta, (int, float)) or not 0 < policy.delta < 1:
        raise bad("delta", "delta must lie in (0, 1)", "use e.g. 1e-5")
    if policy.accountant not in ACCOUNTANTS:
        raise bad("accountant", f"it must be one of {ACCOUNTANTS}", "use rdp")
    if policy.max_job_epsilon and policy.lifetime_epsilon and policy.max_job_epsilon > policy.lifetime_epsilon:
        raise bad("max_job_epsilon", f"it exceeds lifetime_epsilon {policy.lifetime_epsilon}", "lower it")
    return policy


def read_site_policy(local_dir: str | Path, scope_properties: dict | None = None) -> SitePrivacyPolicy | None:
    """The site's policy from its local/ folder, tightened by the job's privacy scope;
    None when the site has configured neither."""
    file = Path(local_dir) / SITE_POLICY_FILE
    policy = None
    if file.is_file():
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise InputError(str(file), f"line {err.lineno}", f"it is not valid JSON ({err.msg})", "fix it") from err
        policy = policy_from_dict(data, str(file))
    scoped = (scope_properties or {}).get(SCOPE_PROPERTY)
    if scoped is not None:
        scope_policy = policy_from_dict(scoped, f"privacy.json scope property {SCOPE_PROPERTY}")
        policy = scope_policy if policy is None else policy.tightened_by(scope_policy)
    return policy


@dataclass(frozen=True)
class BudgetCheck:
    job_epsilon: float
    spent_before: float
    spent_after: float
    lifetime_epsilon: float | None


def check_job_budget(
    policy: SitePrivacyPolicy,
    spent_by_other_jobs: list[Release],
    mechanism: str,
    planned: list[Release],
) -> BudgetCheck:
    """Refuse (InputError) a job the policy does not allow, before it trains.

    Args:
        spent_by_other_jobs: the ledger's releases of every other job at this site.
        mechanism: the job's DP mechanism ("none" when it has none).
        planned: every release the job will make at this site over all its rounds
            (training and metrics); what the ledger already holds for this job is part
            of the plan, not counted twice.
    """
    if policy.require_dp and mechanism not in SITE_MECHANISMS:
        raise InputError(
            "job privacy mechanism",
            mechanism,
            f"this site's policy requires differential privacy applied at the site ({' or '.join(SITE_MECHANISMS)})",
            "submit the job with --dp-epsilon (sample-level DP-SGD), or ask the site's privacy officer",
        )
    others = list(spent_by_other_jobs)
    job_eps = epsilon_of(planned, policy.delta, policy.accountant)
    before = epsilon_of(others, policy.delta, policy.accountant)
    after = epsilon_of(others + list(planned), policy.delta, policy.accountant)
    if policy.max_job_epsilon is not None and job_eps > policy.max_job_epsilon:
        raise InputError(
            "job privacy spend",
            round(job_eps, 3),
            f"it exceeds this site's per-job budget max_job_epsilon={policy.max_job_epsilon} (delta={policy.delta})",
            "lower the job's epsilon (training + metrics) or its rounds",
        )
    if policy.lifetime_epsilon is not None and after > policy.lifetime_epsilon:
        raise InputError(
            "job privacy spend",
            round(job_eps, 3),
            f"the site has spent epsilon {before:.3f} of its lifetime budget {policy.lifetime_epsilon} and this job "
            f"would bring it to {after:.3f} (delta={policy.delta})",
            f"run a job that spends less (about {max(policy.lifetime_epsilon - before, 0):.3f} is left), "
            "or have the privacy officer raise lifetime_epsilon",
        )
    return BudgetCheck(job_eps, before, after, policy.lifetime_epsilon)
