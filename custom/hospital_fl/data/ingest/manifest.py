"""A site's training-ready dataset: manifest.json + images.npy in one folder (SITE_DATA).

manifest.json holds one record per usable image (salted image id, patient pseudonym, view,
labels, source file sha256, row in images.npy) and the preprocessing version; images.npy is
an (N, size, size) uint8 array that training memory-maps. Neither holds a raw identifier,
a date or a DICOM file path (the only DICOM value kept is the view position; the manifest
also notes which consent registry the site uses): the salt that makes the pseudonyms lives
in SITE_DATA/site_secret (mode 600) and never leaves the site.

Each training job that reads the manifest leaves a usage record in SITE_DATA/usage/ (job
id, manifest sha256, the patient pseudonyms it trained on) so the site can later list the
models that used a patient whose consent is now revoked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hospital_fl.errors import InputError

__all__ = [
    "MANIFEST_FILE",
    "atomic_write_bytes",
    "MANIFEST_FORMAT",
    "IMAGES_FILE",
    "Manifest",
    "ManifestRecord",
    "load_images",
    "read_manifest",
    "record_usage",
    "read_usage",
    "site_secret",
    "write_dataset",
]

MANIFEST_FORMAT = "hospital-fl-manifest/1"
MANIFEST_FILE = "manifest.json"
IMAGES_FILE = "images.npy"
SECRET_FILE = "site_secret"
USAGE_DIR = "usage"


@dataclass(frozen=True)
class ManifestRecord:
    image_id: str  # salted hash of the SOP Instance UID
    patient: str  # salted hash of the patient id (consent is checked against it)
    view_position: str  # "PA" | "AP" | "LL" ... or "" when neither DICOM nor labels say
    labels: tuple[int, ...]  # multi-hot over Manifest.label_names
    source_sha256: str  # of the DICOM file's bytes: re-ingest skips unchanged files
    row: int  # index into images.npy
    source_rows: int
    source_columns: int


@dataclass(frozen=True)
class Manifest:
    preprocessing_version: str
    image_size: int
    label_names: tuple[str, ...]
    records: tuple[ManifestRecord, ...]
    consent: dict  # registry path, window_days, date checked
    created: str

    def to_dict(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "preprocessing_version": self.preprocessing_version,
            "image_size": self.image_size,
            "label_names": list(self.label_names),
            "consent": self.consent,
            "created": self.created,
            "images_file": IMAGES_FILE,
            "records": [asdict(r) | {"labels": list(r.labels)} for r in self.records],
        }

    def column(self, name: str) -> np.ndarray:
        """One label as an (N,) int64 array (e.g. "Pneumonia" for the binary task)."""
        if name not in self.label_names:
            raise InputError(
                "label", name, f"the manifest labels {self.label_names}", "ingest a label file that has this finding"
            )
        j = self.label_names.index(name)
        return np.array([r.labels[j] for r in self.records], dtype=np.int64)

    def label_matrix(self) -> np.ndarray:
        return np.array([r.labels for r in self.records], dtype=np.int64).reshape(len(self.records), -1)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary sibling and a rename: readers see the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def site_secret(site_dir: str | Path, create: bool = False) -> bytes:
    """The site's pseudonym salt, created (32 random bytes, owner-only) on first ingest."""
    site_dir = Path(site_dir)
    path = site_dir / SECRET_FILE
    if path.is_file():
        return path.read_bytes()
    made_before = [n for n in (MANIFEST_FILE, USAGE_DIR, "ingest_cache.json") if (site_dir / n).exists()]
    if not create or made_before:
        # A new secret would turn every pseudonym in the manifest and usage records into a
        # stranger: consent checks and the audit would silently stop matching.
        raise InputError(
            "site secret",
            str(path),
            "the pseudonym salt is created by ingest and must stay with the site data",
            "run hospital-fl ingest into this folder, or restore the site_secret file from backup",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


def write_dataset(site_dir: str | Path, manifest: Manifest, images: np.ndarray) -> Path:
    """Write images.npy then manifest.json, each atomically: a crash never leaves a manifest
    pointing at rows that do not exist."""
    site_dir = Path(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)
    expected = (len(manifest.records), manifest.image_size, manifest.image_size)
    if images.shape != expected or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 {expected}, got {images.dtype} {images.shape}")
    tmp = site_dir / f".{IMAGES_FILE}.tmp"
    with tmp.open("wb") as f:
        np.save(f, images)
    os.replace(tmp, site_dir / IMAGES_FILE)
    path = site_dir / MANIFEST_FILE
    atomic_write_bytes(path, json.dumps(manifest.to_dict(), indent=1).encode())
    return path


def _manifest_path(site_dir_or_file: str | Path) -> Path:
    p = Path(site_dir_or_file)
    return p / MANIFEST_FILE if p.is_dir() else p


def read_manifest(site_dir_or_file: str | Path) -> Manifest:
    """Read and validate a manifest.

    Raises:
        InputError: missing, not a manifest, another format or inconsistent with images.npy.
    """
    path = _manifest_path(site_dir_or_file)
    if not path.is_file():
        raise InputError(
            "manifest", str(path), "a site dataset folder must hold manifest.json", "run hospital-fl ingest first"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(
            "manifest", str(path), f"manifest.json must be JSON ({err})", "run hospital-fl ingest again"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise InputError(
            "manifest format",
            raw.get("format") if isinstance(raw, dict) else type(raw).__name__,
            f"this bundle reads {MANIFEST_FORMAT}",
            "run hospital-fl ingest again with this version of the bundle",
        )
    try:
        records = tuple(ManifestRecord(**r | {"labels": tuple(r["labels"])}) for r in raw["records"])
        manifest = Manifest(
            raw["preprocessing_version"],
            int(raw["image_size"]),
            tuple(raw["label_names"]),
            records,
            raw.get("consent") or {},
            raw.get("created", ""),
        )
    except (KeyError, TypeError) as err:
        raise InputError(
            "manifest", str(path), f"a field is missing or malformed ({err})", "run hospital-fl ingest again"
        ) from None
    rows = sorted(r.row for r in records)
    if rows != list(range(len(records))):
        raise InputError(
            "manifest", str(path), "record rows must be 0..N-1 exactly once", "run hospital-fl ingest again"
        )
    return manifest


def load_images(site_dir_or_file: str | Path, manifest: Manifest) -> np.ndarray:
    """images.npy memory-mapped (training reads only the rows it needs)."""
    path = _manifest_path(site_dir_or_file).parent / IMAGES_FILE
    if not path.is_file():
        raise InputError(
            "images", str(path), "images.npy must sit beside manifest.json", "run hospital-fl ingest again"
        )
    try:
        images = np.load(path, mmap_mode="r")
    except (ValueError, EOFError, OSError) as err:
        raise InputError(
            "images",
            str(path),
            f"images.npy must be a readable numpy array ({type(err).__name__}: {err})",
            "run ingest again",
        ) from None
    expected = (len(manifest.records), manifest.image_size, manifest.image_size)
    if images.shape != expected:
        raise InputError(
            "images",
            f"{path} shape {images.shape}",
            f"it must be {expected} to match manifest.json",
            "run ingest again",
        )
    return images


def manifest_sha256(site_dir_or_file: str | Path) -> str:
    return hashlib.sha256(_manifest_path(site_dir_or_file).read_bytes()).hexdigest()


def record_usage(site_dir: str | Path, job_id: str, patients: list[str], excluded: dict[str, str]) -> Path:
    """Note that ``job_id`` trained on these patient pseudonyms (site-local, append-only per job)."""
    usage_dir = Path(site_dir) / USAGE_DIR
    usage_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    safe_job = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)
    path = usage_dir / f"{safe_job}-{started.replace(':', '')}.json"
    record = {
        "job_id": job_id,
        "started": started,
        "manifest_sha256": manifest_sha256(site_dir),
        "patients": sorted(set(patients)),
        "excluded_at_start": dict(sorted(excluded.items())),
    }
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    return path


def read_usage(site_dir: str | Path) -> list[dict]:
    usage_dir = Path(site_dir) / USAGE_DIR
    if not usage_dir.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(usage_dir.glob("*.json"))]
