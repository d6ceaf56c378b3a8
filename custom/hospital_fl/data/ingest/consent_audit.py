"""Which trained models used a patient whose consent is now revoked (or expired, or gone)?

Answered at the site from the usage records each training job leaves (patient pseudonyms
per job) and today's consent registry; no identifier leaves the site.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from hospital_fl.data.ingest.consent import ConsentPolicy, ConsentRegistry
from hospital_fl.data.ingest.manifest import read_usage, site_secret
from hospital_fl.data.ingest.phi import patient_pseudonym

__all__ = ["jobs_using_withdrawn_patients"]


def jobs_using_withdrawn_patients(
    site_dir: str | Path,
    registry: ConsentRegistry,
    policy: ConsentPolicy,
    today: dt.date | None = None,
    state_dir: str | Path | None = None,
) -> list[dict]:
    """One row per job that trained on at least one patient not usable today.

    Usage records are read from ``state_dir`` (the site's writable state folder, where jobs
    record them) and, for records left by earlier bundles, from ``site_dir/usage``.

    Returns:
        [{"job_id", "started", "manifest_sha256", "patients_used", "patients_now_unusable",
          "by_status": {status: count}}], oldest job first.
    """
    today = today or dt.date.today()
    salt = site_secret(site_dir)
    rows = []
    for usage in read_usage(state_dir, site_dir):
        unusable = registry.unusable(usage["patients"], lambda p: patient_pseudonym(p, salt), policy, today)
        if not unusable:
            continue
        by_status: dict[str, int] = {}
        for status in unusable.values():
            by_status[status] = by_status.get(status, 0) + 1
        rows.append(
            {
                "job_id": usage["job_id"],
                "started": usage["started"],
                "manifest_sha256": usage["manifest_sha256"],
                "patients_used": len(usage["patients"]),
                "patients_now_unusable": len(unusable),
                "by_status": dict(sorted(by_status.items())),
            }
        )
    return rows
