"""The segmentation job folder: exported from SegJobSpec, read back, refused when inconsistent."""

from __future__ import annotations

import filecmp
import importlib
import json
from pathlib import Path

import pytest
from hospital_fl.compression.codecs import CompressionConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.kits.site_policy import is_allowed
from hospital_fl.flare.recipes.seg import SEG_JOBS, export_seg_job, read_seg_job_folder
from hospital_fl.jobspec import SegJobSpec
from hospital_fl.models.seg import SegModelConfig
from hospital_fl.privacy.he_params import CKKSParams
from hospital_fl.provisioning.job_types import job_types_of
from hospital_fl.segmentation.pipeline import SegPipelineConfig

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _paths(node):
    if isinstance(node, dict):
        if isinstance(node.get("path"), str):
            yield node["path"]
        for value in node.values():
            yield from _paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _paths(value)


def test_committed_seg_job_equals_a_fresh_export(tmp_path):
    export_seg_job(SEG_JOBS["seg_fedavg"], tmp_path)
    cmp = filecmp.dircmp(JOBS / "seg_fedavg", tmp_path / "seg_fedavg")
    stack, differences = [cmp], []
    while stack:
        c = stack.pop()
        differences += c.left_only + c.right_only + c.diff_files
        stack += c.subdirs.values()
    assert not differences, "jobs/seg_fedavg is stale; run: hospital-fl export-jobs --jobs-dir jobs"


def test_seg_job_folder_reads_back_and_every_class_is_allowed():
    assert read_seg_job_folder(JOBS / "seg_fedavg") == SEG_JOBS["seg_fedavg"]
    client = json.loads((JOBS / "seg_fedavg" / "app" / "config" / "config_fed_client.json").read_text())
    server = json.loads((JOBS / "seg_fedavg" / "app" / "config" / "config_fed_server.json").read_text())
    paths = list(_paths(client)) + list(_paths(server))
    assert "hospital_fl.flare.seg_executor.SegTrainExecutor" in paths
    for path in paths:
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), path
        assert is_allowed(path), path
    assert job_types_of(client) == ({"segmentation"}, [])
    assert not list((JOBS / "seg_fedavg").rglob("*.py"))
    # The server selects the best global model by the sites' validation Dice.
    assert "val_dice" in json.dumps(server)


def test_he_seg_job_routes_the_count_and_validate_tasks_and_encrypts(tmp_path):
    spec = SegJobSpec(name="seg_he", he=CKKSParams(), server_optimizer=None)
    folder = export_seg_job(spec, tmp_path)
    client = json.loads((folder / "app" / "config" / "config_fed_client.json").read_text())
    assert set(client["executors"][0]["tasks"]) == {"train", "sample_count", "validate"}
    assert "hospital_fl.flare.he.EncryptUpdate" in list(_paths(client))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(model=SegModelConfig(out_channels=1), pipeline=SegPipelineConfig(label_scheme="brats")), "3 regions"),
        (dict(num_rounds=0), "num_rounds"),
        (dict(min_clients=4), "min_clients"),
        (dict(he=CKKSParams(), server_optimizer=None, uplink=CompressionConfig("int8")), "HE packs"),
        (dict(he=CKKSParams()), "server optimiser"),
    ],
)
def test_inconsistent_seg_specs_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(InputError, match=match) as err:
        SegJobSpec(**kwargs)
    assert err.value.fix
