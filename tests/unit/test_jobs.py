"""The committed job folders are what the code exports, and every class they name exists
and is allowed by the bundle's site policy (so no BYOC code is needed at a hospital)."""

import filecmp
import importlib
import json
from pathlib import Path

import pytest
from hospital_fl.aggregation.strategy import AggregationConfig
from hospital_fl.compression.codecs import CompressionConfig
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.jobs import STANDARD_JOBS, JobSpec, export_standard_jobs, read_job_folder
from hospital_fl.flare.site_policy import allow_bundle_components, is_allowed
from hospital_fl.privacy.config import DPConfig

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _class_paths(node):
    if isinstance(node, dict):
        if isinstance(node.get("path"), str):
            yield node["path"]
        for value in node.values():
            yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


@pytest.mark.parametrize("job", sorted(STANDARD_JOBS))
def test_every_config_path_imports_and_is_allowed_at_sites(job):
    paths = [
        p for cfg in (JOBS / job / "app" / "config").glob("*.json") for p in _class_paths(json.loads(cfg.read_text()))
    ]

    assert "hospital_fl.flare.executor.CXRTrainExecutor" in paths
    for path in paths:
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), path
        assert is_allowed(path), f"{path} would be refused by a site running the bundle policy"


@pytest.mark.parametrize("job", sorted(STANDARD_JOBS))
def test_job_folders_ship_no_code(job):
    assert not list((JOBS / job).rglob("*.py"))
    assert not (JOBS / job / "app" / "custom").exists()


def test_committed_job_folders_equal_a_fresh_export(tmp_path):
    export_standard_jobs(tmp_path)

    for job in STANDARD_JOBS:
        cmp = filecmp.dircmp(JOBS / job, tmp_path / job)
        stack, differences = [cmp], []
        while stack:
            c = stack.pop()
            differences += c.left_only + c.right_only + c.diff_files
            stack += c.subdirs.values()
        assert not differences, f"jobs/{job} is stale; run: hospital-fl export-jobs --jobs-dir jobs"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(min_clients=6), "min_clients: got 6; it must be an integer in 1..5 (the job's sites)"),
        (
            dict(min_clients=2, aggregation=AggregationConfig(rule="trimmed_mean", trim=1)),
            "min_clients: got 2; trimming 1 per side needs at least 3 sites per round",
        ),
        (
            dict(split=SplitConfig(num_sites=4), aggregation=AggregationConfig(rule="krum", byzantine=1)),
            "min_clients: got 4; krum tolerating 1 faulty site(s) needs at least 5 sites per round",
        ),
        (dict(round_timeout=-1), "round_timeout: got -1; it must be a whole number of seconds >= 0"),
        (dict(downlink=CompressionConfig("topk")), "downlink.codec: got 'topk'; the server sends full weights"),
        (
            dict(algorithm="scaffold", aggregation=AggregationConfig(rule="median")),
            "aggregation.rule: got 'median'; FLARE's SCAFFOLD controller averages",
        ),
        (
            dict(algorithm="scaffold", privacy=DPConfig("sample", 8.0)),
            "algorithm: got 'scaffold'; SCAFFOLD's control variates leave the site without DP accounting",
        ),
    ],
)
def test_job_settings_that_cannot_work_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(InputError) as err:
        JobSpec(**kwargs)
    assert message in str(err.value) and "Fix:" in str(err.value)


def test_fedprox_without_mu_is_refused():
    with pytest.raises(InputError, match="fedprox_mu: got 0.0; FedProx needs mu > 0"):
        JobSpec(algorithm="fedprox", fedprox_mu=0.0)


def test_site_policy_keeps_existing_settings_and_adds_the_bundle(tmp_path):
    (tmp_path / "resources.json").write_text(json.dumps({"format_version": 2, "max_jobs": 3}))

    allow_bundle_components(tmp_path)
    allow_bundle_components(tmp_path)  # idempotent

    resources = json.loads((tmp_path / "resources.json").read_text())
    assert resources["max_jobs"] == 3
    assert resources["class_allow_list"].count("hospital_fl.") == 1
    assert not is_allowed("evil_pkg.Exec")


@pytest.mark.parametrize("job", sorted(STANDARD_JOBS))
def test_a_job_folder_reads_back_into_its_spec(job):
    assert read_job_folder(JOBS / job) == STANDARD_JOBS[job]


def test_a_missing_job_folder_is_named_with_the_fix(tmp_path):
    with pytest.raises(InputError, match=r"job folder: got '.*nowhere'; it must be a FLARE job folder.*Fix: pass one"):
        read_job_folder(tmp_path / "nowhere")
