"""The committed job folders are what the code exports, and every class they name exists
and is allowed by the bundle's site policy (so no BYOC code is needed at a hospital)."""

import filecmp
import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
from hospital_fl.aggregation.strategy import AggregationConfig
from hospital_fl.compression.codecs import CompressionConfig
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.kits.site_policy import BUNDLE_ALLOW_LIST, allow_bundle_components, is_allowed, wider_entries
from hospital_fl.flare.profile_job import ProfileRecipe
from hospital_fl.flare.recipes.cxr import STANDARD_JOBS, export_standard_jobs, read_job_folder
from hospital_fl.jobspec import JobSpec
from hospital_fl.privacy.config import DPConfig
from hospital_fl.provisioning.allowed_components import APPROVED_CLASSES, FLARE_INJECTED, class_references
from hospital_fl.provisioning.job_types import EXECUTOR_JOB_TYPES

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
    (tmp_path / "resources.json").write_text(
        json.dumps({"format_version": 2, "max_jobs": 3, "class_allow_list": ["hospital_fl.", "site_pkg.Exec"]})
    )

    allow_bundle_components(tmp_path)
    allow_bundle_components(tmp_path)  # idempotent

    resources = json.loads((tmp_path / "resources.json").read_text())
    assert resources["max_jobs"] == 3
    # the site's own entry stays; the package prefix of older kits goes, the bundle's exact classes come
    assert resources["class_allow_list"] == ["site_pkg.Exec", *BUNDLE_ALLOW_LIST]
    assert not is_allowed("evil_pkg.Exec")
    assert not is_allowed("hospital_fl.flare.provision.write")


def test_a_provisioned_site_allows_exactly_the_bundle_classes(tmp_path):
    (tmp_path / "resources.json.default").write_text(json.dumps({"format_version": 2, "class_allow_list": ["a.B"]}))

    allow_bundle_components(tmp_path, exact=True)

    assert json.loads((tmp_path / "resources.json").read_text())["class_allow_list"] == list(BUNDLE_ALLOW_LIST)
    assert wider_entries(["hospital_fl.", "torch.", "hospital_fl.flare.provision.write", *BUNDLE_ALLOW_LIST]) == [
        "hospital_fl.",
        "torch.",
        "hospital_fl.flare.provision.write",
    ]


def _job_configs():
    """Every config of every job the bundle ships: the exported folders and the profile job."""
    return {
        f"{cfg.parent.parent.parent.name}/{cfg.name}": json.loads(cfg.read_text())
        for cfg in sorted(JOBS.glob("*/app*/config/config_fed_*.json"))
    }


def test_the_allow_list_is_exactly_what_the_jobs_build(tmp_path):
    configs = _job_configs()
    ProfileRecipe("/data/{site}", num_sites=2).export(str(tmp_path))
    for cfg in sorted(tmp_path.glob("*/app*/config/config_fed_*.json")):
        configs[f"profile/{cfg.name}"] = json.loads(cfg.read_text())
    assert len(configs) == 2 * (len(list(JOBS.glob("*/meta.json"))) + 1)  # server and client, every job

    used = {}
    for label, config in configs.items():
        for where, value in class_references(config):
            assert value in APPROVED_CLASSES, f"{label} {where} = {value!r} is not on the allow list"
            used.setdefault(value, label)

    unused = APPROVED_CLASSES - set(used) - set(FLARE_INJECTED)
    assert not unused, f"{sorted(unused)} are allowed but no job builds them"
    assert set(EXECUTOR_JOB_TYPES) <= set(used)  # every job type has a job
    assert set(BUNDLE_ALLOW_LIST) == APPROVED_CLASSES


def test_the_security_page_lists_exactly_the_allowed_classes():
    page = (JOBS.parent / "docs" / "security" / "job-components.md").read_text()
    table = re.findall(r"^\| `([\w.]+)` \|", page, flags=re.MULTILINE)

    assert sorted(table) == sorted(APPROVED_CLASSES)


@pytest.mark.parametrize("path", sorted(APPROVED_CLASSES))
def test_every_allowed_entry_is_a_class(path):
    module, _, name = path.rpartition(".")
    assert inspect.isclass(getattr(importlib.import_module(module), name)), f"{path} is not a class"


@pytest.mark.parametrize(
    "path",
    [
        "hospital_fl.flare.provision.write",
        "hospital_fl.flare.recipes.cxr.export_recipe",
        "hospital_fl.privacy.setup.init_site_privacy",
    ],
)
def test_the_bundle_functions_are_not_allowed(path):
    module, _, name = path.rpartition(".")
    assert inspect.isfunction(getattr(importlib.import_module(module), name))
    assert path not in APPROVED_CLASSES and not is_allowed(path)


@pytest.mark.parametrize("job", sorted(STANDARD_JOBS))
def test_a_job_folder_reads_back_into_its_spec(job):
    assert read_job_folder(JOBS / job) == STANDARD_JOBS[job]


def test_a_missing_job_folder_is_named_with_the_fix(tmp_path):
    with pytest.raises(InputError, match=r"job folder: got '.*nowhere'; it must be a FLARE job folder.*Fix: pass one"):
        read_job_folder(tmp_path / "nowhere")
