"""A site's training-ready dataset: manifest.json + its images file in one folder (SITE_DATA).

manifest.json holds one record per usable image (salted image id, patient pseudonym, view,
labels, source file sha256, row in the images file) and the preprocessing version; the images
file is an (N, size, size) uint8 array that training memory-maps. Neither holds a raw
identifier, a date or a DICOM file path (the only DICOM value kept is the view position; the
manifest also notes which consent registry the site uses): the salt that makes the pseudonyms
lives in SITE_DATA/site_secret (mode 600) and never leaves the site.

Crash safety: each ingest writes a new generation. The pixels go to a new file
(``images.g<N>.npy``), fsynced; then the manifest naming that file and its SHA-256 is written
aside and fsynced; then ONE rename puts the manifest in place (the commit) and the folder is
fsynced. A crash or a full disk before the rename leaves the previous manifest, which still
names the previous images file, untouched; after it, the new pair. Older images files are
removed only after the switch. Loading recomputes the images file's SHA-256 and refuses a
mismatch, so pixels can never be paired with another generation's labels.

Each training job that reads the manifest leaves a usage record (job id, manifest sha256, the
patient pseudonyms it trained on) in the site's writable state folder, not in SITE_DATA (which
may be mounted read-only), so the site can later list the models that used a patient whose
consent is now revoked.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from hospital_fl.data.hashing import file_sha256
from hospital_fl.errors import InputError

__all__ = [
    "MANIFEST_FILE",
    "atomic_write_bytes",
    "MANIFEST_FORMAT",
    "Manifest",
    "ManifestRecord",
    "images_path",
    "load_images",
    "manifest_sha256",
    "read_manifest",
    "record_usage",
    "read_usage",
    "site_secret",
    "write_dataset",
]

MANIFEST_FORMAT = "hospital-fl-manifest/2"
LEGACY_FORMAT = "hospital-fl-manifest/1"  # images.npy beside it, no hash: not crash-safe
MANIFEST_FILE = "manifest.json"
LEGACY_IMAGES_FILE = "images.npy"
SECRET_FILE = "site_secret"
USAGE_DIR = "usage"
_IMAGES_NAME = re.compile(r"images\.g(\d{6,})\.npy")


def _commit_step(step: str) -> None:
    """Called at each step of a dataset commit; a no-op (crash tests replace it to kill the
    process or fill the disk at that exact point)."""


@dataclass(frozen=True)
class ManifestRecord:
    image_id: str  # salted hash of the SOP Instance UID
    patient: str  # salted hash of the patient id (consent is checked against it)
    view_position: str  # "PA" | "AP" | "LL" ... or "" when neither DICOM nor labels say
    labels: tuple[int, ...]  # multi-hot over Manifest.label_names
    source_sha256: str  # of the DICOM file's bytes: re-ingest skips unchanged files
    row: int  # index into the images file
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
    images_file: str = ""  # set by write_dataset: this generation's images file
    images_sha256: str = ""  # of that file's bytes, checked on every load

    def to_dict(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "preprocessing_version": self.preprocessing_version,
            "image_size": self.image_size,
            "label_names": list(self.label_names),
            "consent": self.consent,
            "created": self.created,
            "images_file": self.images_file,
            "images_sha256": self.images_sha256,
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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary sibling, fsync, rename, fsync the folder: after a crash or a full
    disk readers see the old file or the new, never half, and a finished write survives power loss."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


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
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)
    return path.read_bytes()


class _HashingFile:
    """A write-only file wrapper that hashes what passes through (np.save writes in chunks)."""

    def __init__(self, f):
        self._f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        return self._f.write(view)


def _generation(name: str) -> int:
    m = _IMAGES_NAME.fullmatch(name)
    return int(m.group(1)) if m else -1


def write_dataset(site_dir: str | Path, manifest: Manifest, images: np.ndarray) -> Path:
    """Commit a new generation: images file, then manifest, each fsynced; one rename switches.

    Before the rename the previous dataset is whole and loads; after it, the new one. Images
    files of earlier (or abandoned) generations are removed once the switch is durable.

    Returns:
        The manifest's path.

    Raises:
        InputError: the disk is full or another write failed (the previous dataset is kept).
    """
    site_dir = Path(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)
    expected = (len(manifest.records), manifest.image_size, manifest.image_size)
    if images.shape != expected or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 {expected}, got {images.dtype} {images.shape}")
    generation = 1 + max((_generation(p.name) for p in site_dir.iterdir()), default=0)
    name = f"images.g{generation:06d}.npy"
    images_file = site_dir / name
    path = site_dir / MANIFEST_FILE
    created = switched = False
    try:
        _commit_step("before_images")
        # O_EXCL: a generation's file is written once, by this run only
        with open(images_file, "xb") as f:
            created = True
            hashing = _HashingFile(f)
            np.save(hashing, np.ascontiguousarray(images))
            f.flush()
            os.fsync(f.fileno())
        _commit_step("between_writes")
        committed = replace(manifest, images_file=name, images_sha256=hashing.digest.hexdigest())
        tmp = site_dir / f".{MANIFEST_FILE}.tmp"
        with tmp.open("wb") as f:
            f.write(json.dumps(committed.to_dict(), indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        _commit_step("before_switch")
        os.replace(tmp, path)  # the commit
        switched = True
        _commit_step("after_switch")
        _fsync_dir(site_dir)
    except OSError as err:
        full = " (the disk is full)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        fix = "free disk space or fix the folder's permissions, then run hospital-fl ingest again"
        if switched:
            # The rename happened: the new pair is in place and whole, but until the folder is
            # synced a power loss could bring back the previous manifest, so its images stay.
            raise InputError(
                "site dataset",
                str(site_dir),
                f"the new dataset is in place but the folder could not be synced{full} "
                f"({type(err).__name__}: {err.strerror or err}); the previous images file is kept",
                fix,
            ) from None
        (site_dir / f".{MANIFEST_FILE}.tmp").unlink(missing_ok=True)
        if created:
            images_file.unlink(missing_ok=True)
        raise InputError(
            "site dataset",
            str(site_dir),
            f"writing the new dataset failed{full} ({type(err).__name__}: {err.strerror or err}); "
            "the previous dataset is kept",
            fix,
        ) from None
    _remove_old_generations(site_dir, keep=name)
    return path



def _remove_old_generations(site_dir: Path, keep: str) -> None:
    """After a durable switch: earlier images files, abandoned ones, and a pre-generation images.npy.
    A failure here only costs disk space; the next ingest tries again."""
    try:
        _commit_step("collect_garbage")
        for p in site_dir.iterdir():
            old = _IMAGES_NAME.fullmatch(p.name) or p.name in (LEGACY_IMAGES_FILE, f".{LEGACY_IMAGES_FILE}.tmp")
            if old and p.name != keep:
                p.unlink(missing_ok=True)
    except OSError:
        pass


def _manifest_path(site_dir_or_file: str | Path) -> Path:
    p = Path(site_dir_or_file)
    return p / MANIFEST_FILE if p.is_dir() else p


def _reingest(path: Path, why: str) -> InputError:
    return InputError("manifest", str(path), why, "run hospital-fl ingest again into this folder")


def read_manifest(site_dir_or_file: str | Path) -> Manifest:
    """Read and validate a manifest.

    Raises:
        InputError: missing, not a manifest, another format (a manifest from before crash-safe
            generations included: the fix is one re-ingest) or inconsistent.
    """
    path = _manifest_path(site_dir_or_file)
    if not path.is_file():
        raise InputError(
            "manifest", str(path), "a site dataset folder must hold manifest.json", "run hospital-fl ingest first"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _reingest(path, f"manifest.json must be JSON ({err})") from None
    if isinstance(raw, dict) and raw.get("format") == LEGACY_FORMAT:
        raise InputError(
            "manifest format",
            LEGACY_FORMAT,
            f"this bundle reads {MANIFEST_FORMAT}, which records the images file's SHA-256 so pixels can "
            "never be paired with another ingest's labels; a /1 dataset cannot be verified",
            "run the same hospital-fl ingest command again into this folder (it writes the verified layout; "
            "every file is decoded once)",
        )
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
            str(raw["images_file"]),
            str(raw["images_sha256"]),
        )
    except (KeyError, TypeError) as err:
        raise _reingest(path, f"a field is missing or malformed ({err})") from None
    if not _IMAGES_NAME.fullmatch(manifest.images_file) or not re.fullmatch(r"[0-9a-f]{64}", manifest.images_sha256):
        raise _reingest(path, "images_file must name an images.g<N>.npy file and images_sha256 its SHA-256")
    rows = sorted(r.row for r in records)
    if rows != list(range(len(records))):
        raise _reingest(path, "record rows must be 0..N-1 exactly once")
    return manifest


def images_path(site_dir_or_file: str | Path, manifest: Manifest) -> Path:
    """The images file this manifest committed (beside it)."""
    return _manifest_path(site_dir_or_file).parent / manifest.images_file


def load_images(site_dir_or_file: str | Path, manifest: Manifest) -> np.ndarray:
    """The manifest's images, memory-mapped (training reads only the rows it needs), after
    checking the file's SHA-256 against the one the manifest recorded.

    Raises:
        InputError: the file is missing, unreadable, of another shape, or not the one this
            manifest committed (its hash differs).
    """
    path = images_path(site_dir_or_file, manifest)
    if not path.is_file():
        raise InputError(
            "images", str(path), "the images file the manifest names must sit beside it", "run hospital-fl ingest again"
        )
    try:
        digest = file_sha256(path)
        images = np.load(path, mmap_mode="r")
    except (ValueError, EOFError, OSError) as err:
        raise InputError(
            "images",
            str(path),
            f"it must be a readable numpy array ({type(err).__name__}: {err})",
            "run hospital-fl ingest again",
        ) from None
    if digest != manifest.images_sha256:
        raise InputError(
            "images",
            f"{path} sha256 {digest[:16]}...",
            f"it must be the file manifest.json committed (sha256 {manifest.images_sha256[:16]}...); the pixels "
            "and labels are from different ingests or the file was changed",
            "run hospital-fl ingest again (nothing trains on a mismatched pair)",
        )
    expected = (len(manifest.records), manifest.image_size, manifest.image_size)
    if images.shape != expected or images.dtype != np.uint8:
        raise InputError(
            "images",
            f"{path} {images.dtype} {images.shape}",
            f"it must be uint8 {expected} to match manifest.json",
            "run hospital-fl ingest again",
        )
    return images


def manifest_sha256(site_dir_or_file: str | Path) -> str:
    return hashlib.sha256(_manifest_path(site_dir_or_file).read_bytes()).hexdigest()


def record_usage(
    state_dir: str | Path, job_id: str, patients: list[str], excluded: dict[str, str], manifest_digest: str
) -> Path:
    """Note that ``job_id`` trained on these patient pseudonyms, in the site's writable state
    folder (``state_dir/usage/``; never the data folder, which may be read-only)."""
    usage_dir = Path(state_dir) / USAGE_DIR
    usage_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    safe_job = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)
    path = usage_dir / f"{safe_job}-{started.replace(':', '')}.json"
    record = {
        "job_id": job_id,
        "started": started,
        "manifest_sha256": manifest_digest,
        "patients": sorted(set(patients)),
        "excluded_at_start": dict(sorted(excluded.items())),
    }
    atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    return path


def read_usage(*folders: str | Path | None) -> list[dict]:
    """Usage records under ``<folder>/usage/`` of each folder given (a site's state folder; a site
    dataset folder holds them only from bundles that wrote them there), oldest first."""
    records, seen = [], set()
    for folder in folders:
        if folder is None or not (Path(folder) / USAGE_DIR).is_dir() or Path(folder).resolve() in seen:
            continue
        seen.add(Path(folder).resolve())
        records += [json.loads(p.read_text()) for p in sorted((Path(folder) / USAGE_DIR).glob("*.json"))]
    return sorted(records, key=lambda r: (r.get("started", ""), r.get("job_id", "")))
