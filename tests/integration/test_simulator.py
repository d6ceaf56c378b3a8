"""A real FLARE simulator run of the CXR job, then the whole demo pipeline on it."""

import json

import pytest
import torch
from hospital_fl.apps.cxr_demo import OUTPUT_FILES, DemoConfig, run_demo
from hospital_fl.data.splits import SplitConfig
from hospital_fl.flare.runners.simulator import run_in_simulator
from hospital_fl.jobspec import JobSpec
from hospital_fl.models.cxr import build_cxr_model
from hospital_fl.training.config import TrainConfig

pytestmark = pytest.mark.integration

SMALL = JobSpec(num_rounds=2, split=SplitConfig(num_sites=2), train=TrainConfig(torch_threads=1))


def test_two_round_simulator_job_trains_and_records_every_round(tmp_path):
    rounds_seen = []

    run = run_in_simulator(SMALL, tmp_path, on_round=rounds_seen.append)

    assert [h["round"] for h in run.history] == [0, 1]
    for entry in run.history:
        assert sorted(s["site"] for s in entry["sites"]) == ["site-1", "site-2"]
        assert all(s["accepted"] and s["train_seconds"] > 0 for s in entry["sites"])
    # the global model sites receive in round 1 is better than the random start
    start = {s["site"]: s["metrics"]["val_auc"] for s in run.history[0]["sites"]}
    after = {s["site"]: s["metrics"]["val_auc"] for s in run.history[1]["sites"]}
    assert sum(after.values()) > sum(start.values())
    assert rounds_seen and rounds_seen[-1] == 2
    checkpoint = torch.load(run.global_model_path, map_location="cpu", weights_only=False)
    build_cxr_model().load_state_dict(checkpoint["model"])


def test_demo_writes_a_complete_report_and_plots(tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "report.md").write_text("stale report from an earlier run")

    report = run_demo(DemoConfig(spec=SMALL, out_dir=out, workspace=tmp_path / "ws"))

    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "report.json").read_text())
    assert saved["complete"] is True and saved["rounds"] == 2
    assert [s["name"] for s in saved["sites"]] == ["site-1", "site-2"]
    assert 0.5 < saved["federated"]["auc"] <= 1.0
    assert saved["timing"]["client_train_seconds"] > 0
    assert saved["communication"]["bytes_per_round_per_site"] > 100_000
    assert "stale" not in (out / "report.md").read_text()
    assert report["federated"]["auc"] == saved["federated"]["auc"]
