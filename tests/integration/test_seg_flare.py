"""Segmentation through real FLARE (SimEnv): the demo federation on the embedded real MRI,
with a bad case at one site listed while both sites train."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hospital_fl.apps.seg_demo import SegDemoConfig, demo_spec, run_seg_demo
from hospital_fl.segmentation.pipeline import SegTrainConfig
from hospital_fl.segmentation.sample import write_sample_datalists

pytestmark = pytest.mark.integration


def test_seg_demo_federates_real_mri_and_lists_a_bad_case(tmp_path):
    lists = write_sample_datalists(tmp_path / "datalists", sites=("site-1", "site-2"))
    site2 = json.loads(lists["site-2"].read_text())
    good = site2["training"][0]
    site2["training"].append({"image": str(tmp_path / "absent_t1c.nrrd"), "label": good["label"]})
    lists["site-2"].write_text(json.dumps(site2))
    spec = dataclasses.replace(
        demo_spec(tmp_path / "datalists", rounds=1), train=SegTrainConfig(steps_per_epoch=2, torch_threads=1)
    )

    report = run_seg_demo(SegDemoConfig(spec=spec, out_dir=tmp_path / "out", workspace=tmp_path / "ws"))

    assert [s["name"] for s in report["sites"]] == ["site-1", "site-2"]
    for site in report["sites"]:
        assert 0.0 <= site["dice"] <= 1.0 and not math.isnan(site["dice"])
        assert set(site["dice_per_region"]) == {"tumour"}
        assert site["validation_cases"] == 1
    assert [p["reason"] for p in report["sites"][1]["left_out"]] == ["missing_file"]
    assert report["sites"][0]["left_out"] == []
    (round0,) = report["history"]
    assert sorted(s["site"] for s in round0["sites"]) == ["site-1", "site-2"]
    assert all(s["accepted"] for s in round0["sites"])
    assert all(0.0 <= s["metrics"]["val_dice"] <= 1.0 for s in round0["sites"])
    for name in ("report.json", "report.md", "seg_rounds.png", "global_model.pt"):
        assert (tmp_path / "out" / name).is_file()
    # Each site wrote its datalist validation report into its FLARE run folder.
    reports = list((tmp_path / "ws").rglob("seg_datalist_report.json"))
    assert len(reports) == 2
