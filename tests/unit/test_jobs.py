"""The committed job folders are what the code exports, and every class they name exists
and is allowed by the bundle's site policy (so no BYOC code is needed at a hospital)."""

import filecmp
import importlib
import json
from pathlib import Path

import pytest
from hospital_fl.errors import InputError
from hospital_fl.flare.jobs import STANDARD_JOBS, JobSpec, export_standard_jobs, read_job_folder
from hospital_fl.flare.site_policy import allow_bundle_components, is_allowed

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
