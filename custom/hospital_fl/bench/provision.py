"""Provisioning and deployment timings: site configs -> kits, and kits -> a finished job.

1. The example consortium in site_configs/ (server, 3 hospitals, 3 admins, HE on) is
   provisioned ``repeats`` times into fresh folders (FLARE's Provisioner, certificates,
   TenSEAL contexts, signatures, archives, audit trail).
2. A loopback consortium (server, 2 hospitals, HE on) is provisioned; its server and
   hospitals start from their kits' own start scripts; the tiny cxr_fedavg job (2 sites,
   2 rounds) is submitted through the admin API as the project admin and followed to its
   end; the system is shut down. "kits_to_finished_s" runs from the first start script to
   the job's completion; shutdown is timed apart.
"""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

from hospital_fl.bench.machine import machine_info
from hospital_fl.data.splits import SplitConfig
from hospital_fl.flare.kits.provision import provision
from hospital_fl.flare.recipes.cxr import STANDARD_JOBS, export_job
from hospital_fl.flare.runners.poc import run_job, running_system, system_from_kits
from hospital_fl.provisioning.rehearsal import PROJECT_ADMIN, loopback_site_configs, write_site_configs
from hospital_fl.training.config import TrainConfig

__all__ = ["run_provision_benchmark", "TARGET_PROVISION_S", "TARGET_KITS_TO_JOB_S", "TINY_JOB", "free_ports"]

TARGET_PROVISION_S = 10.0
TARGET_KITS_TO_JOB_S = 180.0
TINY_JOB = replace(
    STANDARD_JOBS["cxr_fedavg"], num_rounds=2, split=SplitConfig(num_sites=2), train=TrainConfig(torch_threads=1)
)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on loopback right now (for a rehearsal server)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_provision_benchmark(site_configs: str | Path, workspace: str | Path, repeats: int = 3) -> dict:
    """Both timings as one JSON-ready dict; ``ok`` says whether both targets hold."""
    root = Path(workspace).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    provision_s = []
    for i in range(repeats):
        result = provision(site_configs, root / f"example_{i}")
        provision_s.append(round(result.seconds, 3))

    fl_port, admin_port = free_ports(2)
    configs = write_site_configs(root / "loopback_configs", *loopback_site_configs(fl_port, admin_port))
    loopback = provision(configs, root / "loopback")
    system = system_from_kits(loopback.out_dir / "kits", PROJECT_ADMIN)
    job = export_job(TINY_JOB, root / "jobs")
    start = time.perf_counter()
    with running_system(system) as live:
        up_s = time.perf_counter() - start
        run = run_job(live, job, root / "result", timeout_s=600)
        finished_s = time.perf_counter() - start
        stop_start = time.perf_counter()
    stop_s = time.perf_counter() - stop_start
    final = run.history[-1] if run.history else {}
    return {
        "benchmark": "provision",
        "example_consortium": {
            "site_configs": str(Path(site_configs)),
            "hospitals": len([k for k in result.kits if k.type == "client"]),
            "kits": len(result.kits),
            "he": result.he,
            "provision_s": provision_s,
        },
        "loopback": {
            "hospitals": list(system.clients),
            "he": loopback.he,
            "job": f"{TINY_JOB.name}: {TINY_JOB.num_sites} sites, {TINY_JOB.num_rounds} rounds",
            "system_up_s": round(up_s, 2),
            "job_s": round(run.wall_seconds, 2),
            "kits_to_finished_s": round(finished_s, 2),
            "shutdown_s": round(stop_s, 2),
            "rounds": len(run.history),
            "final_round_sites": sorted(s["site"] for s in final.get("sites", [])),
        },
        "targets": {"provision_s": TARGET_PROVISION_S, "kits_to_finished_s": TARGET_KITS_TO_JOB_S},
        "ok": max(provision_s) <= TARGET_PROVISION_S and finished_s <= TARGET_KITS_TO_JOB_S,
        "machine": machine_info(),
    }
