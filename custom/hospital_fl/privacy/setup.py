"""Set up a site for DP jobs: its policy file and an empty ledger (never overwritten)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hospital_fl.privacy.ledger import PrivacyLedger
from hospital_fl.privacy.policy import SITE_POLICY_FILE, SitePrivacyPolicy, read_site_policy

__all__ = ["init_site_privacy"]


def init_site_privacy(workspace_root: str | Path, site: str, policy: SitePrivacyPolicy | None = None) -> PrivacyLedger:
    """Write ``local/hospital_fl_privacy.json`` (when ``policy`` is given and none exists) and
    create the site's ledger when it has none; an existing policy or ledger is kept as is."""
    root = Path(workspace_root)
    policy_file = root / "local" / SITE_POLICY_FILE
    if policy is not None and not policy_file.exists():
        policy_file.parent.mkdir(parents=True, exist_ok=True)
        policy_file.write_text(json.dumps(dataclasses.asdict(policy), indent=1))
    effective = read_site_policy(root / "local") or SitePrivacyPolicy()
    path = effective.ledger_path(root)
    return PrivacyLedger(path) if path.exists() else PrivacyLedger.create(path, site)
