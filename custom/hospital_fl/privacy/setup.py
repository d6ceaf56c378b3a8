"""Set up a site for DP jobs: its policy file, its ledger key and an empty ledger.

Nothing here loosens what exists: a site's policy is never rewritten (flags that differ from
it are refused, naming what they would loosen), a ledger is never overwritten, and a fresh
ledger is refused where the audit trail beside it already records spend (a reset). A
missing, damaged, rolled-back or version-1 ledger is rebuilt from the verified audit trail
(``rebuild=True``), never reset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from hospital_fl.errors import InputError
from hospital_fl.privacy.ledger import PrivacyLedger
from hospital_fl.privacy.policy import SITE_POLICY_FILE, SitePrivacyPolicy, read_site_policy

__all__ = ["init_site_privacy", "loosened_fields"]


def loosened_fields(existing: SitePrivacyPolicy, given: SitePrivacyPolicy) -> list[str]:
    """The fields in which ``given`` allows more than ``existing``."""
    out = []
    if existing.require_dp and not given.require_dp:
        out.append("require_dp")
    for field in ("max_job_epsilon", "lifetime_epsilon"):
        old, new = getattr(existing, field), getattr(given, field)
        if old is not None and (new is None or new > old):
            out.append(field)
    if given.delta > existing.delta:
        out.append("delta")
    return out


def init_site_privacy(
    workspace_root: str | Path, site: str, policy: SitePrivacyPolicy | None = None, rebuild: bool = False
) -> PrivacyLedger:
    """Write ``local/hospital_fl_privacy.json`` (``policy``, or the default policy) when none
    exists, and create the site's ledger (with its key) when it has none.

    An existing policy is kept; a ``policy`` that differs from it is refused. An existing
    ledger is checked against the site's audit trail. ``rebuild`` writes the ledger again from
    the audit trail (the fix for a missing, damaged or version-1 ledger).
    """
    root = Path(workspace_root)
    policy_file = root / "local" / SITE_POLICY_FILE
    existing = read_site_policy(root / "local")
    if existing is None:
        policy_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = policy_file.with_name(policy_file.name + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(policy or SitePrivacyPolicy()), indent=1))
        os.replace(tmp, policy_file)
    elif policy is not None and policy != existing:
        loose = loosened_fields(existing, policy)
        raise InputError(
            "privacy init settings",
            {k: v for k, v in dataclasses.asdict(policy).items() if v != getattr(existing, k)},
            f"the site's policy {policy_file} already exists and init never rewrites it"
            + (f"; these would loosen it: {', '.join(loose)}" if loose else ""),
            "run init without policy flags to keep the site's policy; a privacy officer changes it in the kit "
            "(re-provision the site), and a job's privacy scope can only tighten it",
        )
    effective = read_site_policy(root / "local") or SitePrivacyPolicy()
    path = effective.ledger_path(root)
    if rebuild:
        return PrivacyLedger.rebuild_from_audit(path, site)
    if not path.exists():
        return PrivacyLedger.create(path, site)
    ledger = PrivacyLedger(path)
    ledger.check_against_audit()
    return ledger
