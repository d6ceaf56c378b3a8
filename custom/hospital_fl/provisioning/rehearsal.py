"""A consortium on one machine's loopback: site configs for rehearsing deployment.

Before the real servers exist, an operator (and the end-to-end test and benchmark)
provisions a consortium whose server is ``localhost``, starts every participant from its
kit on this machine, and runs a tiny job through the admin API. The hospitals are named
site-1..N so the embedded chest X-rays (split by those names) serve as their data.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hospital_fl.provisioning.schema import CONSORTIUM_FILE, HOSPITALS_DIR, load_site_configs

__all__ = ["PROJECT_ADMIN", "MEMBER", "loopback_site_configs", "write_site_configs"]

PROJECT_ADMIN = "admin@consortium.org"
MEMBER = "viewer@site-1.org"  # FLARE role "member": may look, not submit


def loopback_site_configs(
    fl_port: int,
    admin_port: int,
    hospitals: tuple[str, ...] = ("site-1", "site-2"),
    he: bool = True,
    project: str = "loopback_consortium",
    scope: str = "public",
    allowed_job_types: tuple[str, ...] = ("cxr", "profile"),
) -> tuple[dict, list[dict]]:
    """(consortium.yaml, [hospitals/<name>.yaml]) contents of a consortium on loopback.

    CPU-only hospitals; one project admin and one member admin (who may not submit jobs).
    """
    consortium = {
        "name": project,
        "description": "rehearsal consortium on this machine's loopback",
        "server_host": "localhost",
        "server_org": "consortium",
        "fl_port": fl_port,
        "admin_port": admin_port,
        "he": he,
        "admins": [
            {"email": PROJECT_ADMIN, "org": "consortium", "role": "project_admin"},
            {"email": MEMBER, "org": "site_1", "role": "member"},
        ],
    }
    sites = [
        {
            "name": name,
            "org": name.replace("-", "_"),
            "gpus": 0,
            "gpu_memory_gb": 0,
            "data_root": f"/data/{name}",
            "image": "hospital-fl-site:0.1.0",
            "resources": {"num_of_gpus": 0, "mem_per_gpu_in_GiB": 0},
            "allowed_job_types": list(allowed_job_types),
            "privacy": {"scope": scope, "lifetime_epsilon": 20.0, "max_job_epsilon": 8.0, "delta": 1.0e-5},
        }
        for name in hospitals
    ]
    return consortium, sites


def write_site_configs(folder: str | Path, consortium: dict, hospitals: list[dict]) -> Path:
    """Write consortium.yaml and hospitals/<name>.yaml into ``folder``; validated on the way."""
    folder = Path(folder)
    (folder / HOSPITALS_DIR).mkdir(parents=True, exist_ok=True)
    (folder / CONSORTIUM_FILE).write_text(yaml.safe_dump(consortium, sort_keys=False))
    for hospital in hospitals:
        (folder / HOSPITALS_DIR / f"{hospital['name']}.yaml").write_text(yaml.safe_dump(hospital, sort_keys=False))
    load_site_configs(folder)
    return folder
