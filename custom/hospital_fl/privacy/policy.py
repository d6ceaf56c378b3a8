"""A site's privacy policy and the budget check every job must pass before it trains.

The policy is written by the site's privacy officer in two places, both in the site's own
startup kit (never sent by a job):
- ``local/hospital_fl_privacy.json``: the bundle's site config (lifetime and per-job
  epsilon, delta, accountant, ledger location);
- a scope of FLARE's ``local/privacy.json``: ``"properties": {"hospital_fl_privacy": {...}}``
  with the same keys, applying to jobs submitted with that scope.
A scope can only tighten the site config (smaller budgets, DP required), never loosen it.

The policy in the site's kit is authoritative whenever it exists. An override folder named by
an environment variable (``HOSPITAL_FL_PRIVACY_HOME``) may only tighten it
(``resolve_site_policy``): caps are the smaller of the two, ``require_dp`` is OR-ed.

``check_release`` is the cap every single release is held to, inside the ledger's lock: the
job's own plan (approved when it started), ``max_job_epsilon`` and ``lifetime_epsilon``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from hospital_fl.errors import InputError
from hospital_fl.privacy.accounting import Release
from hospital_fl.privacy.budget import COMPOSITION_RULE, compose_epsilon
from hospital_fl.privacy.config import ACCOUNTANTS, SITE_MECHANISMS
from hospital_fl.privacy.ledger import LedgerEntry, entries_epsilon

__all__ = [
    "SitePrivacyPolicy",
    "BudgetCheck",
    "SITE_POLICY_FILE",
    "SCOPE_PROPERTY",
    "policy_from_dict",
    "read_site_policy",
    "resolve_site_policy",
    "check_job_budget",
    "check_release",
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


def _policy_file(local_dir: str | Path) -> SitePrivacyPolicy | None:
    file = Path(local_dir) / SITE_POLICY_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise InputError(str(file), f"line {err.lineno}", f"it is not valid JSON ({err.msg})", "fix it") from err
    return policy_from_dict(data, str(file))


def read_site_policy(local_dir: str | Path, scope_properties: dict | None = None) -> SitePrivacyPolicy | None:
    """The site's policy from its local/ folder, tightened by the job's privacy scope;
    None when the site has configured neither."""
    return _scoped(_policy_file(local_dir), scope_properties)


def resolve_site_policy(
    kit_local_dir: str | Path, override_local_dir: str | Path | None, scope_properties: dict | None = None
) -> tuple[SitePrivacyPolicy | None, bool]:
    """(the site's effective policy, whether the kit holds one).

    The kit's ``local/hospital_fl_privacy.json`` is authoritative when it exists: a policy in
    ``override_local_dir`` (from an environment variable) then only tightens it, and the
    ledger stays where the kit's policy puts it. Without a kit policy the override stands in
    (sites that have no kit, e.g. simulated ones). The job's scope tightens either.
    """
    kit = _policy_file(kit_local_dir)
    override = _policy_file(override_local_dir) if override_local_dir is not None else None
    if kit is None:
        return _scoped(override, scope_properties), False
    return _scoped(kit if override is None else kit.tightened_by(override), scope_properties), True


def _scoped(policy: SitePrivacyPolicy | None, scope_properties: dict | None) -> SitePrivacyPolicy | None:
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
    other_pure: list[tuple[float, int]] = (),
) -> BudgetCheck:
    """Refuse (InputError) a job the policy does not allow, before it trains.

    Args:
        spent_by_other_jobs: the ledger's releases of every other job at this site.
        mechanism: the job's DP mechanism ("none" when it has none).
        planned: every release the job will make at this site over all its rounds
            (training and metrics); what the ledger already holds for this job is part
            of the plan, not counted twice.
        other_pure: the other jobs' pure-epsilon (Laplace) releases, as (epsilon, count).
    """
    if policy.require_dp and mechanism not in SITE_MECHANISMS:
        raise InputError(
            "job privacy mechanism",
            mechanism,
            f"this site's policy requires differential privacy applied at the site ({' or '.join(SITE_MECHANISMS)})",
            "submit the job with --dp-epsilon (sample-level DP-SGD), or ask the site's privacy officer",
        )
    others = list(spent_by_other_jobs)
    job_eps = compose_epsilon(planned, [], policy.delta, policy.accountant)
    before = compose_epsilon(others, other_pure, policy.delta, policy.accountant)
    after = compose_epsilon(others + list(planned), other_pure, policy.delta, policy.accountant)
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


def check_release(
    policy: SitePrivacyPolicy,
    job_id: str,
    before: list[LedgerEntry],
    after: list[LedgerEntry],
    allowance: dict[str, int] | None = None,
) -> float:
    """Refuse (InputError) a release that would take the job or the site past a cap.

    Called inside the ledger's lock with the entries as they are now (every job's latest
    spend) and as they would be after the release. Returns the job's epsilon after it.

    Args:
        allowance: the releases per mechanism the job's plan announced and the site approved
            when the job started; a job never spends beyond its plan (a server sending more
            tasks than the job announced is refused here), None for no plan.
    """
    job_after = [e for e in after if e.job_id == job_id]
    job_before = [e for e in before if e.job_id == job_id]
    fix_job = (
        "nothing was released or recorded: the job has spent what it may at this site; end it (a server that "
        "sends more rounds than the job announced is refused here), or submit a new job with a smaller epsilon"
    )
    if allowance is not None:
        for e in job_after:
            allowed = allowance.get(e.mechanism, 0)
            if e.steps > allowed:
                raise InputError(
                    f"privacy release of job {job_id}",
                    f"{e.mechanism}: {e.steps} steps",
                    f"the job's plan, approved when it started, covers {allowed} {e.mechanism} steps (runs of the "
                    "mechanism) at this site",
                    fix_job,
                )
    d, acc = policy.delta, policy.accountant
    job_eps = entries_epsilon(job_after, d, acc)
    if policy.max_job_epsilon is not None and job_eps > policy.max_job_epsilon:
        raise InputError(
            f"privacy release of job {job_id}",
            f"job epsilon {job_eps:.4f}",
            f"it would take the job from epsilon {entries_epsilon(job_before, d, acc):.4f} to {job_eps:.4f}, above "
            f"this site's per-job budget max_job_epsilon={policy.max_job_epsilon} (delta={d}; {COMPOSITION_RULE})",
            fix_job,
        )
    if policy.lifetime_epsilon is not None:
        lifetime = entries_epsilon(after, d, acc)
        if lifetime > policy.lifetime_epsilon:
            spent = entries_epsilon(before, d, acc)
            raise InputError(
                f"privacy release of job {job_id}",
                f"site epsilon {lifetime:.4f}",
                f"the site has spent epsilon {spent:.4f} of its lifetime budget {policy.lifetime_epsilon} (every job "
                f"included) and this release would bring it to {lifetime:.4f} (delta={d}; {COMPOSITION_RULE})",
                "nothing was released or recorded; run jobs that spend less "
                f"(about {max(policy.lifetime_epsilon - spent, 0):.3f} is left), or have the privacy officer "
                "raise lifetime_epsilon",
            )
    return job_eps
