"""The site commands end to end: ingest (workers, progress, summary), audit, profile/compare, site check."""

import json

import numpy as np
import pydicom
from dicom_factory import upscale, write_cxr
from hospital_fl.cli import main


def _export(tmp_path, federated_data, n=12):
    site = federated_data.sites[0].train
    rows, consent = ["file,label"], ["patient_id,status,date"]
    for i in range(n):
        write_cxr(tmp_path / "pacs" / f"{i}.dcm", upscale(site.images[i], 256), patient_id=f"P{i}")
        rows.append(f"{i}.dcm,{int(site.labels[i])}")
        consent.append(f"P{i},granted,2026-01-01")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "consent.csv").write_text("\n".join(consent) + "\n")


def _ingest_args(tmp_path, *extra):
    return [
        "ingest", str(tmp_path / "pacs"), "--labels", str(tmp_path / "labels.csv"),
        "--consent", str(tmp_path / "consent.csv"), "--out", str(tmp_path / "site"), "--size", "28", *extra,
    ]  # fmt: skip


def test_ingest_with_two_workers_and_deidentified_copies(tmp_path, federated_data, capsys):
    _export(tmp_path, federated_data)

    code = main(_ingest_args(tmp_path, "--workers", "2", "--deidentify-to", str(tmp_path / "deid")))

    assert code == 0
    out = capsys.readouterr().out
    assert "ingest: 12 of 12 files in the manifest" in out
    manifest = json.loads((tmp_path / "site" / "manifest.json").read_text())
    copies = sorted((tmp_path / "deid").glob("*.dcm"))
    assert {p.stem for p in copies} == {r["image_id"] for r in manifest["records"]}
    ds = pydicom.dcmread(copies[0])
    assert ds.PatientIdentityRemoved == "YES" and "DOE" not in str(ds.PatientName)
    assert "General Hospital" not in str(ds)
    images = np.load(tmp_path / "site" / manifest["images_file"])
    assert images.shape == (12, 28, 28)


def test_ingest_refuses_bad_label_file_naming_it(tmp_path, federated_data, capsys):
    _export(tmp_path, federated_data, n=2)
    (tmp_path / "labels.csv").write_text("file,label\n0.dcm,maybe\n")

    assert main(_ingest_args(tmp_path)) == 2

    err = capsys.readouterr().err
    assert "labels.csv line 2 label: got 'maybe'" in err and "Try 'hospital-fl ingest --help'" in err
    assert not (tmp_path / "site").exists()  # nothing half-written


def test_audit_profile_and_compare(tmp_path, federated_data, capsys):
    _export(tmp_path, federated_data)
    assert main(_ingest_args(tmp_path, "--workers", "1")) == 0
    from hospital_fl.data.ingest.site_dataset import load_site_dataset

    load_site_dataset(tmp_path / "site", "site-1", image_size=28, job_id="job-7", state_dir=tmp_path / "workspace")
    with (tmp_path / "consent.csv").open("a") as f:
        f.write("P3,revoked,2026-11-01\n")
    capsys.readouterr()

    assert main(["consent", "audit", str(tmp_path / "site"), "--state", str(tmp_path / "workspace")]) == 0
    audit = json.loads(capsys.readouterr().out)
    assert [r["job_id"] for r in audit["jobs_using_patients_without_consent"]] == ["job-7"]

    assert main(["privacy", "init", str(tmp_path / "kit"), "--site", "site-1", "--job-epsilon", "3"]) == 0
    for name in ("a", "b"):  # each release checked against the site's budget and recorded in its ledger
        args = ["site", "profile", str(tmp_path / "site"), "--epsilon", "2", "--out", str(tmp_path / f"{name}.json")]
        assert main([*args, "--site-home", str(tmp_path / "kit")]) == 0
    capsys.readouterr()
    assert main(["site", "profile", str(tmp_path / "site"), "--epsilon", "4", "--site-home", str(tmp_path / "kit")]) == 2
    assert "max_job_epsilon=3" in capsys.readouterr().err  # above the site's cap: refused, nothing written
    released = json.loads((tmp_path / "a.json").read_text())
    assert released["noised"] is True and released["epsilon"] == 2
    capsys.readouterr()
    assert main(["site", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["site"] for r in report["sites"]] == ["a", "b"]


def test_site_check_exit_codes(tmp_path, capsys):
    base = ["site", "check", "--workdir", str(tmp_path), "--min-free-gb", "0.001"]
    assert main([*base, "--no-gpu"]) == 0
    import torch

    # a hospital server needs a CUDA GPU: without one the default check fails
    assert main(base) == (0 if torch.cuda.is_available() else 1)
    assert main([*base, "--no-gpu", "--manifest", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().out
