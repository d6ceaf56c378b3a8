"""Ingest on real DICOM (pydicom-data's chest CR, uncompressed and JPEG 2000) plus made-up edge cases.

Every bad file is listed with its reason while the good ones ingest; nothing identifying
reaches the manifest or cache; re-ingesting an unchanged folder decodes nothing; consent is
applied at ingest, re-checked at training start, and the audit finds jobs that used a
patient who later withdrew.
"""

import datetime as dt
import json
import shutil

import numpy as np
import pytest
from dicom_factory import upscale, write_cxr
from hospital_fl.data.ingest.consent import ConsentPolicy, read_consent
from hospital_fl.data.ingest.consent_audit import jobs_using_withdrawn_patients
from hospital_fl.data.ingest.labels import read_labels
from hospital_fl.data.ingest.manifest import images_path, load_images, read_manifest
from hospital_fl.data.ingest.pipeline import IngestConfig, ingest
from hospital_fl.data.ingest.site_dataset import load_site_dataset, patient_portion
from hospital_fl.errors import InputError
from pydicom.data import get_testdata_file

TODAY = dt.date(2026, 11, 23)
PHI_STRINGS = ("DOE^JANE", "MRN", "General Hospital", "19700101", "9RG1", "CompressedSamples")


@pytest.fixture
def export(tmp_path, federated_data):
    """A PACS export: the real chest CR twice (a duplicate), its JPEG 2000 twin, real PneumoniaMNIST
    X-rays wrapped as CR files for 12 patients, and one file for every rejection reason."""
    root = tmp_path / "pacs"
    (root / "real").mkdir(parents=True)
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), root / "real" / "rg1.dcm")
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), root / "real" / "rg1_copy.dcm")
    shutil.copy(get_testdata_file("RG1_J2KR.dcm"), root / "real" / "rg1_j2k.dcm")
    site = federated_data.sites[1]
    rows = ["file,label,patient_id", "rg1.dcm,0,", "rg1_copy.dcm,0,", "rg1_j2k.dcm,0,"]
    for i in range(24):
        name = f"cxr_{i:02d}.dcm"
        write_cxr(root / "ok" / name, upscale(site.train.images[i], 280), patient_id=f"MRN{i % 12:04d}")
        rows.append(f"{name},{int(site.train.labels[i])},")
    (root / "notes.txt").write_text("not an image")
    write_cxr(root / "bad" / "mr.dcm", upscale(site.train.images[0], 280), modality="MR")
    write_cxr(root / "bad" / "knee.dcm", upscale(site.train.images[0], 280), body_part="KNEE")
    write_cxr(root / "bad" / "small.dcm", upscale(site.train.images[0], 100))
    truncated = write_cxr(root / "bad" / "cut.dcm", upscale(site.train.images[0], 280))
    truncated.write_bytes(truncated.read_bytes()[:-5000])
    write_cxr(root / "bad" / "nolabel.dcm", upscale(site.train.images[1], 280), patient_id="MRN0001")
    write_cxr(root / "bad" / "revoked.dcm", upscale(site.train.images[2], 280), patient_id="MRN0999")
    rows += [f"{n},0," for n in ("mr.dcm", "knee.dcm", "small.dcm", "cut.dcm", "revoked.dcm", "ghost.dcm")]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    consent = tmp_path / "consent.csv"
    consent.write_text(
        "patient_id,status,date\n9RG1,granted,2026-01-01\n"
        + "".join(f"MRN{i:04d},granted,2026-01-01\n" for i in range(12))
        + "MRN0999,revoked,2026-03-01\n"
    )
    return root, labels, consent, tmp_path / "site"


def _ingest(export, **cfg):
    root, labels, consent, site = export
    config = IngestConfig(image_size=28, workers=1, **cfg)
    return ingest(root, read_labels(labels), site, read_consent(consent, today=TODAY), config, today=TODAY)


def test_bad_files_listed_with_reasons_while_good_files_ingest(export):
    result = _ingest(export)

    report = result.report
    reasons = {r["file"]: r["reason"] for r in report["rejected_files"]}
    assert reasons == {
        "notes.txt": "not_dicom",
        "bad/mr.dcm": "modality_not_allowed",
        "bad/knee.dcm": "body_part_not_chest",
        "bad/small.dcm": "too_small",
        "bad/cut.dcm": "truncated_pixel_data",
        "bad/nolabel.dcm": "no_label",
        "bad/revoked.dcm": "consent_excluded",
        "real/rg1_copy.dcm": "duplicate_sop_instance",
    }
    assert report["labels_without_image"] == ["ghost"]
    assert report["accepted"] == 24 + 2 and report["files"] == 34
    manifest = read_manifest(result.manifest_path)
    assert len(manifest.records) == 26 and manifest.image_size == 28
    assert {r.view_position for r in manifest.records} == {"PA"}
    images = np.load(images_path(result.manifest_path, manifest))
    assert images.shape == (26, 28, 28) and images.dtype == np.uint8 and images.std() > 10


def test_nothing_identifying_in_manifest_or_cache(export):
    result = _ingest(export)

    site = result.manifest_path.parent
    for name in ("manifest.json", "ingest_cache.json"):
        text = (site / name).read_text()
        for phi in PHI_STRINGS:
            assert phi not in text, (name, phi)
        assert "pacs" not in text  # no source paths either
    assert "PatientName" in result.report["phi"]["identifying_tags_seen"]  # tag names are reported, not values


def test_reingest_unchanged_folder_decodes_nothing_and_changed_file_once(export):
    first = _ingest(export)
    again = _ingest(export)

    assert again.report["decoded"] == 0 and again.report["reused_from_cache"] == again.report["files"]
    assert read_manifest(again.manifest_path).records == read_manifest(first.manifest_path).records
    assert np.array_equal(
        load_images(first.manifest_path, read_manifest(first.manifest_path)),
        load_images(again.manifest_path, read_manifest(again.manifest_path)),
    )
    root = export[0]
    write_cxr(root / "ok" / "cxr_00.dcm", np.full((280, 280), 2000, np.uint16), patient_id="MRN0000")
    third = _ingest(export)
    assert third.report["decoded"] == 1  # only the changed file
    assert third.report["accepted"] == 26


def test_training_start_rechecks_consent_and_audit_finds_withdrawn_patients(export):
    result = _ingest(export)
    site_dir = result.manifest_path.parent
    state = site_dir.parent / "workspace"
    before = load_site_dataset(site_dir, "site-1", image_size=28, job_id="job-a", today=TODAY, state_dir=state)
    assert before.excluded == {}
    n_before = len(before.site.train) + len(before.site.val) + len(before.site.test)
    assert n_before == 26

    consent = export[2]
    consent.write_text(consent.read_text() + "MRN0003,revoked,2026-11-20\n")
    after = load_site_dataset(site_dir, "site-1", image_size=28, job_id="job-b", today=TODAY, state_dir=state)

    assert list(after.excluded.values()) == ["revoked"]
    n_after = len(after.site.train) + len(after.site.val) + len(after.site.test)
    assert n_after == n_before - 2  # MRN0003 has two images
    rows = jobs_using_withdrawn_patients(
        site_dir, read_consent(consent, today=TODAY), ConsentPolicy(), TODAY, state_dir=state
    )
    assert [r["job_id"] for r in rows] == ["job-a"]  # job-b started after the revocation left them out
    assert rows[0]["patients_now_unusable"] == 1 and rows[0]["by_status"] == {"revoked": 1}


def test_patient_level_split_never_shares_a_patient(export):
    result = _ingest(export)
    manifest = read_manifest(result.manifest_path)
    portions = {}
    for r in manifest.records:
        portions.setdefault(r.patient, set()).add(patient_portion(r.patient))
    assert all(len(p) == 1 for p in portions.values())


def test_model_size_mismatch_and_missing_consent_refused(export):
    result = _ingest(export)
    site_dir = result.manifest_path.parent
    with pytest.raises(InputError, match="ingest again with --size 224"):
        load_site_dataset(site_dir, "site-1", image_size=224)
    export[2].unlink()
    with pytest.raises(InputError, match="the consent registry must exist"):
        load_site_dataset(site_dir, "site-1", image_size=28)


def test_report_is_json_with_summary(export):
    result = _ingest(export)
    on_disk = json.loads(result.report_path.read_text())
    assert on_disk["rejections_by_reason"]["not_dicom"] == 1
    assert on_disk["decoded"] == 34


def test_same_file_name_in_two_folders_is_ambiguous_unless_labelled_by_path(tmp_path, federated_data):
    images = federated_data.sites[0].train.images
    for patient in ("PAT1", "PAT2", "PAT3"):
        write_cxr(tmp_path / "pacs" / patient / "IM000001", upscale(images[0], 256), patient_id=patient)
    (tmp_path / "labels.csv").write_text("file,label\nIM000001,1\nPAT3/IM000001,0\n")
    (tmp_path / "consent.csv").write_text("patient_id,status,date\nPAT1,granted,2026-01-01\nPAT3,granted,2026-01-01\n")

    result = _ingest((tmp_path / "pacs", tmp_path / "labels.csv", tmp_path / "consent.csv", tmp_path / "site"))

    reasons = {r["file"]: r["reason"] for r in result.report["rejected_files"]}
    assert reasons == {"PAT1/IM000001": "ambiguous_label", "PAT2/IM000001": "ambiguous_label"}
    assert result.report["accepted"] == 1  # PAT3, named by its path


def test_deidentified_copies_only_for_accepted_images(export):
    root, labels, consent, site = export
    deid = site.parent / "deid"

    result = _ingest(export, deidentify_to=str(deid))

    ids = {r.image_id for r in read_manifest(result.manifest_path).records}
    assert {p.stem for p in deid.glob("*.dcm")} == ids  # not the revoked patient's, not the unlabelled one


def test_header_values_in_rejection_details_are_withheld_when_they_could_identify(export):
    root = export[0]
    write_cxr(root / "bad" / "odd.dcm", np.zeros((280, 280), np.uint16), modality="CR\\DOE^JANE MRN0042 GENERAL")
    with open(export[1], "a") as f:
        f.write("odd.dcm,0,\n")

    result = _ingest(export)

    text = json.dumps(result.report) + (result.manifest_path.parent / "ingest_cache.json").read_text()
    assert "DOE^JANE" not in text and "MRN0042" not in text
    assert any(r["file"] == "bad/odd.dcm" for r in result.report["rejected_files"])


def test_lost_site_secret_and_empty_runs_never_replace_a_good_dataset(export):
    first = _ingest(export)
    site = first.manifest_path.parent
    before = (site / "manifest.json").read_bytes()

    export[1].write_text("file,label\nnothing_matches.dcm,1\n")
    with pytest.raises(InputError, match="no file was accepted .*the previous dataset in .* is kept"):
        _ingest(export)
    assert (site / "manifest.json").read_bytes() == before

    (site / "site_secret").unlink()
    with pytest.raises(InputError, match="site secret"):
        _ingest(export)
    assert (site / "manifest.json").read_bytes() == before


def test_a_cache_that_disagrees_with_the_manifest_is_not_trusted(export):
    first = _ingest(export)
    site = first.manifest_path.parent
    first_images = np.array(load_images(site, read_manifest(site)))
    cache = json.loads((site / "ingest_cache.json").read_text())
    rows = [e for e in cache["files"].values() if e["row"] is not None]
    rows[0]["row"], rows[1]["row"] = rows[1]["row"], rows[0]["row"]  # as an interrupted run could leave it
    (site / "ingest_cache.json").write_text(json.dumps(cache))

    again = _ingest(export)

    assert again.report["decoded"] == again.report["files"]  # everything decoded afresh
    assert np.array_equal(load_images(site, read_manifest(site)), first_images)


def test_a_dataset_from_before_generations_is_refused_with_the_fix_and_one_ingest_migrates_it(export):
    first = _ingest(export)
    site = first.manifest_path.parent
    manifest = read_manifest(site)
    # the layout earlier bundles wrote: images.npy beside a /1 manifest, no hash
    raw = json.loads((site / "manifest.json").read_text())
    raw["format"], raw["images_file"] = "hospital-fl-manifest/1", "images.npy"
    del raw["images_sha256"]
    shutil.move(images_path(site, manifest), site / "images.npy")
    (site / "manifest.json").write_text(json.dumps(raw))

    with pytest.raises(InputError, match="a /1 dataset cannot be verified.*run the same hospital-fl ingest command"):
        load_site_dataset(site, "site-1", image_size=28, today=TODAY)
    again = _ingest(export)

    assert again.report["decoded"] == again.report["files"]  # the unverifiable cache is not trusted
    assert read_manifest(site).records == manifest.records
    assert not (site / "images.npy").exists() and len(list(site.glob("images.g*.npy"))) == 1
