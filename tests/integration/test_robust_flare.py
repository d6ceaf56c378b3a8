"""Robust aggregation, compression, stragglers, FedOpt and SCAFFOLD through the real FLARE simulator."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hospital_fl.aggregation.strategy import AggregationConfig
from hospital_fl.compression.codecs import CompressionConfig
from hospital_fl.data.splits import SplitConfig
from hospital_fl.flare.filters import RESIDUAL_FILE
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.flare.recipes import cxr as jobs
from hospital_fl.flare.runners.simulator import environment, read_job_result, run_in_simulator, simulator_env
from hospital_fl.jobspec import JobSpec
from hospital_fl.training.config import TrainConfig

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
FAST = TrainConfig(torch_threads=1, augment=False)


def _run_with_faulty_site(spec: JobSpec, tmp_path: Path, monkeypatch, **fault):
    """Run ``spec`` in the simulator with one site misbehaving (tests/integration/faulty_sites.py)."""
    from faulty_sites import FaultySiteExecutor  # noqa: PLC0415 (the same module the sites import)

    monkeypatch.setattr(jobs, "CXRTrainExecutor", lambda **args: FaultySiteExecutor(**fault, **args))

    env = simulator_env(tmp_path, spec.name, spec.num_sites)
    policy = allow_bundle_components(tmp_path / spec.name / "local")
    resources = json.loads(policy.read_text())
    resources[next(k for k in resources if isinstance(resources[k], list))].append("faulty_sites.")
    policy.write_text(json.dumps(resources))
    recipe = jobs.build_recipe(spec)
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    with environment({"PYTHONPATH": path}):
        recipe.run(env)
    return read_job_result(tmp_path / spec.name / "server", 0.0)


@pytest.fixture(autouse=True)
def _importable_test_sites(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_a_site_sending_nan_is_rejected_every_round_and_compressed_rounds_go_on(tmp_path, monkeypatch):
    spec = JobSpec(
        name="robust_nan",
        num_rounds=2,
        split=SplitConfig(num_sites=3),
        train=FAST,
        aggregation=AggregationConfig(rule="median"),
        uplink=CompressionConfig("topk", 0.05),
        downlink=CompressionConfig("int8"),
    )
    run = _run_with_faulty_site(spec, tmp_path, monkeypatch, faulty_site="site-3", fault="nan")

    assert [h["round"] for h in run.history] == [0, 1]
    for entry in run.history:
        sites = {s["site"]: s for s in entry["sites"]}
        assert not sites["site-3"]["accepted"] and "NaN" in sites["site-3"]["reason"]
        assert sites["site-1"]["accepted"] and sites["site-2"]["accepted"]
        # top-k 5% of a weight difference: ~1/10 of the fp32 bytes (index + value per kept entry)
        assert sites["site-1"]["payload_bytes"] < sites["site-1"]["uncompressed_bytes"] / 8
    state = torch.load(run.global_model_path, map_location="cpu", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
    residuals = {p.relative_to(tmp_path / spec.name).parts[0]: p for p in (tmp_path / spec.name).rglob(RESIDUAL_FILE)}
    assert set(residuals) >= {"site-1", "site-2"}
    with np.load(residuals["site-1"]) as saved:
        assert any(np.abs(saved[k]).sum() > 0 for k in saved.files)  # what top-k held back


def test_a_slow_site_does_not_hold_up_the_round_and_its_late_update_is_dropped(tmp_path, monkeypatch):
    spec = JobSpec(
        name="straggler", num_rounds=2, split=SplitConfig(num_sites=3), train=FAST, min_clients=2, wait_after_min=0
    )
    run = _run_with_faulty_site(spec, tmp_path, monkeypatch, faulty_site="site-3", fault="slow", delay=25.0)

    assert [h["round"] for h in run.history] == [0, 1]
    round0 = {s["site"] for s in run.history[0]["sites"]}
    assert round0 == {"site-1", "site-2"}  # closed without the sleeping site
    # site-3's round-0 update arrived after its round closed: never aggregated anywhere
    for entry in run.history:
        for s in entry["sites"]:
            assert not (s["site"] == "site-3" and entry["round"] == 0)


@pytest.mark.parametrize("algorithm", ["fedopt", "scaffold"])
def test_fedopt_and_scaffold_run_on_flare_controllers(tmp_path, algorithm):
    spec = dataclasses.replace(
        JobSpec(num_rounds=2, split=SplitConfig(num_sites=2), train=FAST), name=f"cxr_{algorithm}", algorithm=algorithm
    )
    run = run_in_simulator(spec, tmp_path)

    assert [h["round"] for h in run.history] == [0, 1]
    first = {s["site"]: s["metrics"]["val_auc"] for s in run.history[0]["sites"]}
    second = {s["site"]: s["metrics"]["val_auc"] for s in run.history[1]["sites"]}
    assert sum(second.values()) > sum(first.values())  # the round-1 global model learned something
    state = torch.load(run.global_model_path, map_location="cpu", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
