"""A site's ingested dataset as training arrays, with consent re-checked at every training start.

The manifest's records are divided into train / validation / local test by patient (a
deterministic function of the patient pseudonym), so no patient's images are on both sides
of an evaluation. Patients whose consent is no longer "granted" today are left out before
anything trains, and the job's use of the remaining patients is recorded at the site, in its
writable state folder: SITE_DATA itself is only read (it may be a read-only mount).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hospital_fl.data.federated import SiteData
from hospital_fl.data.ingest.consent import ConsentPolicy, read_consent
from hospital_fl.data.ingest.manifest import (
    Manifest,
    ManifestRecord,
    load_images,
    manifest_sha256,
    read_manifest,
    record_usage,
    site_secret,
)
from hospital_fl.data.ingest.phi import patient_pseudonym
from hospital_fl.data.ingest.pixels import PREPROCESSING_VERSION
from hospital_fl.data.pneumoniamnist import CXRArrays
from hospital_fl.errors import InputError

__all__ = [
    "SITE_STATE_ENV",
    "SiteDataset",
    "consented_records",
    "load_site_dataset",
    "site_data_path",
    "site_state_dir",
    "patient_portion",
    "TASK_LABELS",
]

# Where a site keeps what its jobs write about its data (usage records) when not in its FLARE
# workspace: $HOSPITAL_FL_SITE_STATE/<site>/ (e.g. a volume that outlives containers, or
# simulated sites, whose workspaces FLARE recreates for every run).
SITE_STATE_ENV = "HOSPITAL_FL_SITE_STATE"

# Which manifest labels each model task trains on.
TASK_LABELS = {"pneumonia": ("Pneumonia",)}
_PORTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def site_data_path(template: str, site_name: str) -> Path:
    """A job's site_data setting at one site: "{site}" -> the site name, "${VAR}" -> its environment.

    Raises:
        InputError: a variable the setting names is not set in the site's environment.
    """
    expanded = os.path.expandvars(template.replace("{site}", site_name))
    if "$" in expanded:
        raise InputError(
            "site_data",
            template,
            f"it names an environment variable that is not set at {site_name}",
            "set it in the site's start-up environment (e.g. HOSPITAL_FL_SITE_DATA=/data/site) or export the job "
            "with a plain path",
        )
    return Path(expanded)


def site_state_dir(workspace_root: str | Path | None, site_name: str) -> Path | None:
    """The writable folder a site's jobs record data usage in: ``$HOSPITAL_FL_SITE_STATE/<site>``
    when set, else the site's FLARE workspace root; None when neither is known."""
    base = os.environ.get(SITE_STATE_ENV)
    if base:
        return Path(base) / site_name
    return Path(workspace_root) if workspace_root else None


def _unit(patient: str) -> float:
    return int.from_bytes(hashlib.sha256(f"portion|{patient}".encode()).digest()[:8], "big") / 2**64


def _portions(records: list[ManifestRecord]) -> dict[str, list[int]]:
    """Rows per portion. A small site whose hashes leave validation or test without a patient
    gets the training patients nearest the boundary moved there, so every portion scores."""
    by_patient: dict[str, list[int]] = {}
    for r in records:
        by_patient.setdefault(r.patient, []).append(r.row)
    if len(by_patient) < 3:
        raise InputError(
            "site dataset",
            f"{len(by_patient)} consented patients",
            "training splits patients into train, validation and local test, so it needs at least 3",
            "ingest more patients' images",
        )
    assigned = {p: patient_portion(p) for p in by_patient}
    for portion in ("val", "test"):
        if portion not in assigned.values():
            sizes = Counter(assigned.values())
            donor = max((p for p, a in assigned.items() if sizes[a] > 1), key=_unit)
            assigned[donor] = portion
    rows: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for patient, portion in assigned.items():
        rows[portion] += by_patient[patient]
    return rows


def patient_portion(patient: str) -> str:
    """Train, val or test for a patient pseudonym: 80/10/10 by a hash of the pseudonym."""
    u = _unit(patient)
    edge = 0.0
    for name, share in _PORTIONS:
        edge += share
        if u < edge:
            return name
    return _PORTIONS[-1][0]


@dataclass(frozen=True)
class SiteDataset:
    site: SiteData
    manifest: Manifest
    excluded: dict[str, str]  # patient pseudonym -> consent status, left out at this start
    usage_record: Path | None


def _labels_for(manifest: Manifest, task: str, label_names: tuple[str, ...]) -> np.ndarray:
    if task in TASK_LABELS:
        return manifest.column(TASK_LABELS[task][0])
    missing = [n for n in label_names if n not in manifest.label_names]
    if missing:
        raise InputError(
            "task",
            task,
            f"the {task} task needs labels {missing} that this manifest lacks ({manifest.label_names})",
            "ingest a ChestX-ray14 label file, or train the pneumonia task",
        )
    matrix = manifest.label_matrix()
    return matrix[:, [manifest.label_names.index(n) for n in label_names]]


def consented_records(
    site_dir: str | Path, consent_file: str | Path | None = None, today: dt.date | None = None
) -> tuple[Manifest, list[ManifestRecord], dict[str, str]]:
    """The manifest, its records whose patients may be used today, and {pseudonym: status} of the rest.

    Raises:
        InputError: no manifest, no consent registry, or no consented image left.
    """
    site_dir = Path(site_dir)
    manifest = read_manifest(site_dir)
    if manifest.preprocessing_version != PREPROCESSING_VERSION:
        # Sites whose pixels went through different pipelines must not train one model.
        raise InputError(
            "manifest preprocessing_version",
            manifest.preprocessing_version,
            f"this bundle preprocesses as {PREPROCESSING_VERSION}",
            "run hospital-fl ingest again (unchanged files are re-decoded once)",
        )
    registry_path = consent_file or manifest.consent.get("registry")
    if not registry_path:
        raise InputError("consent", None, "training re-checks consent and needs the registry", "pass the consent file")
    policy = ConsentPolicy(manifest.consent.get("window_days"))
    registry = read_consent(registry_path, today=today)
    salt = site_secret(site_dir)
    today = today or dt.date.today()
    excluded = registry.unusable(
        [r.patient for r in manifest.records], lambda p: patient_pseudonym(p, salt), policy, today
    )
    keep = [r for r in manifest.records if r.patient not in excluded]
    if not keep:
        raise InputError(
            "site dataset",
            str(site_dir),
            f"no image is usable today: {len(manifest.records)} in the manifest, {len(excluded)} patients "
            "without valid consent",
            "update the consent registry or ingest more data",
        )
    return manifest, keep, excluded


def load_site_dataset(
    site_dir: str | Path,
    site_name: str,
    task: str = "pneumonia",
    image_size: int | None = None,
    label_names: tuple[str, ...] = (),
    job_id: str | None = None,
    consent_file: str | Path | None = None,
    today: dt.date | None = None,
    state_dir: str | Path | None = None,
) -> SiteDataset:
    """Load SITE_DATA for training.

    Args:
        image_size: the model's input size; the manifest must have been made for it.
        label_names: the labels of a multi-label task (ignored for "pneumonia").
        job_id: when given, the job's use of these patients is recorded under ``state_dir``.
        consent_file: the registry to re-check; the one recorded at ingest when None.
        state_dir: the site's writable state folder (see :func:`site_state_dir`); nothing is
            ever written into ``site_dir``.

    Raises:
        InputError: no manifest, images that are not the ones the manifest committed, a size
            or label mismatch, a missing consent registry, no consented images left, or a
            job id without a state folder.
    """
    site_dir = Path(site_dir)
    if job_id and state_dir is None:
        raise InputError(
            "site state folder",
            None,
            "a training job records which patients it used, in a writable folder apart from the site data",
            f"run the job in a FLARE site workspace or set {SITE_STATE_ENV} in the site's environment",
        )
    manifest, keep, excluded = consented_records(site_dir, consent_file, today)
    if image_size is not None and manifest.image_size != image_size:
        raise InputError(
            "manifest image size",
            manifest.image_size,
            f"the model takes {image_size}x{image_size} inputs",
            f"ingest again with --size {image_size}, or use the model that matches",
        )
    images = load_images(site_dir, manifest)
    labels = _labels_for(manifest, task, label_names)
    portions = _portions(keep)

    def arrays(rows: list[int]) -> CXRArrays:
        idx = np.array(sorted(rows), dtype=np.int64)
        return CXRArrays(np.ascontiguousarray(images[idx]), labels[idx])

    site = SiteData(site_name, arrays(portions["train"]), arrays(portions["val"]), arrays(portions["test"]))
    usage = None
    if job_id:
        usage = record_usage(state_dir, job_id, [r.patient for r in keep], excluded, manifest_sha256(site_dir))
    return SiteDataset(site, manifest, excluded, usage)
