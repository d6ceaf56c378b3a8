"""A tiny CXR job on a real FLARE POC system (server + 2 client processes on loopback)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import psutil
import pytest
import torch
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.runners.poc import run_in_poc
from hospital_fl.jobspec import JobSpec
from hospital_fl.models.cxr import CXRClassifier
from hospital_fl.training.config import TrainConfig

pytestmark = pytest.mark.integration

TINY = JobSpec(num_rounds=2, split=SplitConfig(num_sites=2), train=TrainConfig(torch_threads=1))


def _free_port() -> int:
    # A port of our own, so a POC system someone runs on FLARE's default 8002 does not interfere.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_under(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path`` (POC server, clients, job processes)."""
    needle, found = str(path.resolve()), []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or ())
        if needle in cmdline:
            found.append(f"{proc.pid}: {cmdline}")
    return found


def test_poc_runs_job_and_stops_system(tmp_path):
    rounds: list[int] = []

    run = run_in_poc(TINY, tmp_path, on_round=rounds.append, timeout_s=240, port=_free_port())

    assert [entry["round"] for entry in run.history] == [0, 1]
    for entry in run.history:
        assert sorted(site["site"] for site in entry["sites"]) == ["site-1", "site-2"]
        assert all(site["accepted"] for site in entry["sites"])
    assert rounds and rounds[-1] == 2 and rounds == sorted(rounds)
    assert run.wall_seconds > 0
    assert run.result_dir.is_relative_to(tmp_path / "result")

    assert run.global_model_path.is_file()
    checkpoint = torch.load(run.global_model_path, map_location="cpu", weights_only=True)
    model = CXRClassifier(TINY.model.arch, TINY.model.task, TINY.model.image_size)
    model.load_state_dict(checkpoint["model"])

    assert _processes_under(tmp_path) == []


def test_port_in_use_is_reported_and_nothing_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(InputError, match=str(port)) as err:
            run_in_poc(TINY, tmp_path, port=port)

    assert err.value.value == port
    assert "nvflare poc stop" in err.value.fix
    assert _processes_under(tmp_path) == []


def _require_dp_scope(site: str, kit: Path) -> None:
    """site-1's privacy officer: every job at this site falls in a scope that requires DP."""
    if site == "site-1":
        scope = {"name": "hospital", "properties": {"hospital_fl_privacy": {"require_dp": True}}}
        (kit / "local" / "privacy.json").write_text(json.dumps({"scopes": [scope], "default_scope": "hospital"}))


def test_a_privacy_json_scope_requiring_dp_refuses_a_plain_job(tmp_path):
    with pytest.raises(RuntimeError, match="ended with status"):
        run_in_poc(TINY, tmp_path, timeout_s=240, port=_free_port(), site_setup=_require_dp_scope)

    kit_logs = (tmp_path / "poc").rglob("site-1/**/log.txt")
    assert any("requires differential privacy" in p.read_text() for p in kit_logs)
    assert _processes_under(tmp_path) == []
