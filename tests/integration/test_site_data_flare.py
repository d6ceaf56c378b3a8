"""Ingested DICOM site datasets through real FLARE (SimEnv): training from manifests with consent
re-checked at job start, and the DP data-profile comparison flagging a label-shifted hospital.

The DICOM files wrap real PneumoniaMNIST chest X-rays (three of the embedded hospitals, one
of which is almost all normal), so the shift the profile job must find is real.
"""

import datetime as dt
import json

import pytest
from dicom_factory import ingest_export, upscale, write_cxr
from hospital_fl.data.ingest.manifest import read_usage
from hospital_fl.data.ingest.site_dataset import SITE_STATE_ENV

pytestmark = pytest.mark.integration
TODAY = dt.date.today()
SOURCE_SITES = {"site-1": 0, "site-2": 1, "site-3": 4}  # embedded hospitals: pneumonia share ~0.87, 0.53, 0.05
PER_SITE = 120


@pytest.fixture(scope="module")
def site_datasets(tmp_path_factory, federated_data):
    root = tmp_path_factory.mktemp("hospitals")
    for site, index in SOURCE_SITES.items():
        source = federated_data.sites[index].train
        export = root / f"{site}-pacs"
        rows, consent = [], []
        for i in range(min(PER_SITE, len(source))):
            write_cxr(export / f"img{i:04d}.dcm", upscale(source.images[i], 256), patient_id=f"{site}-P{i:04d}")
            rows.append(f"img{i:04d}.dcm,{int(source.labels[i])}")
            consent.append(f"{site}-P{i:04d},granted,2026-01-01")
        ingest_export(export, rows, consent, root, site, root / site)
    return root


def test_profile_job_flags_the_label_shifted_hospital(site_datasets, tmp_path):
    from hospital_fl.flare.profile_job import run_profile_in_simulator

    result = run_profile_in_simulator(str(site_datasets / "{site}"), 3, tmp_path / "ws", epsilon=1.0)

    assert set(result["profiles"]) == set(SOURCE_SITES)
    assert all(p["noised"] and p["epsilon"] == 1.0 for p in result["profiles"].values())
    rows = {r["site"]: r for r in result["shift"]["sites"]}
    assert any(f.startswith("label_shift") for f in rows["site-3"]["flags"]), rows["site-3"]
    text = json.dumps(result)
    assert "P0001" not in text and "img0001" not in text  # no identifiers in what the server holds


def test_training_reads_manifests_and_rechecks_consent(site_datasets, tmp_path, monkeypatch):
    from hospital_fl.data.splits import SplitConfig
    from hospital_fl.flare.runners.simulator import run_in_simulator
    from hospital_fl.jobspec import JobSpec
    from hospital_fl.training.config import TrainConfig

    state = tmp_path / "state"  # usage records go to each site's writable state folder, not its data
    monkeypatch.setenv(SITE_STATE_ENV, str(state))
    consent = site_datasets / "site-2-consent.csv"
    consent.write_text(consent.read_text() + f"site-2-P0005,revoked,{TODAY}\n")
    spec = JobSpec(
        name="cxr_manifest",
        num_rounds=2,
        split=SplitConfig(num_sites=2),
        train=TrainConfig(epochs=1, torch_threads=1),
        site_data=str(site_datasets / "{site}"),
        wait_after_min=0,
    )

    run = run_in_simulator(spec, tmp_path / "ws")

    assert len(run.history) == 2 and {s["site"] for s in run.history[-1]["sites"]} == {"site-1", "site-2"}
    for site in ("site-1", "site-2"):
        (usage,) = read_usage(state / site)
        assert usage["job_id"] and len(usage["patients"]) >= PER_SITE - 1
        assert not (site_datasets / site / "usage").exists()
    (usage2,) = read_usage(state / "site-2")
    assert list(usage2["excluded_at_start"].values()) == ["revoked"]
    assert len(usage2["patients"]) == PER_SITE - 1
