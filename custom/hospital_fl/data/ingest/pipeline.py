"""`hospital-fl ingest`: a PACS export folder + a label file -> a training-ready site dataset.

Per file (in worker processes, one per core): sha256 of the bytes, read, screen the header,
scan for PHI, decode and preprocess to the model's input size. Then, in one pure pass over
the outcomes in path order: match labels, drop duplicate SOP instances, check consent, and
write images.npy + manifest.json. Every file that does not make it into the manifest is in
ingest_report.json with its reason; nothing is dropped silently.

Incremental: outcomes are cached by the file's sha256 (under the preprocessing version,
image size and screening settings), so re-ingesting an unchanged folder decodes nothing;
labels and consent are re-applied every run since they change without the images changing.
The cache, like the manifest, holds only pseudonyms and non-identifying header fields.

ingest_report.json names rejected files by their path under DICOM_DIR so staff can find
them; it is site-local and never sent anywhere (paths can carry identifiers).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from hospital_fl.data.ingest.consent import USABLE, ConsentPolicy, ConsentRegistry
from hospital_fl.data.ingest.labels import LabelTable, image_key
from hospital_fl.data.ingest.manifest import (
    IMAGES_FILE,
    MANIFEST_FILE,
    Manifest,
    ManifestRecord,
    read_manifest,
    site_secret,
    write_dataset,
)
from hospital_fl.data.ingest.phi import deidentify_file, phi_findings, pseudonym
from hospital_fl.data.ingest.pixels import PREPROCESSING_VERSION, to_model_image
from hospital_fl.data.ingest.screening import DicomRejected, ScreeningConfig, header_info, read_dicom, screen_header
from hospital_fl.errors import InputError

__all__ = ["IngestConfig", "IngestResult", "FileOutcome", "ingest", "process_file", "REPORT_FILE", "CACHE_FILE"]

REPORT_FILE = "ingest_report.json"
CACHE_FILE = "ingest_cache.json"


@dataclass(frozen=True)
class IngestConfig:
    """How a folder is ingested. ``burned_in``: "flag" lists images whose BurnedInAnnotation
    is YES (text such as a name may be in the pixels) in the report; "reject" excludes them."""

    image_size: int = 224
    screening: ScreeningConfig = field(default_factory=ScreeningConfig)
    consent: ConsentPolicy = field(default_factory=ConsentPolicy)
    burned_in: str = "flag"
    workers: int = 0  # 0: one per core
    deidentify_to: str | None = None  # also write de-identified copies (DICOM basic profile)

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise InputError("image size", self.image_size, "it must be a whole number >= 16", "use 224 or 28")
        if self.burned_in not in ("flag", "reject"):
            raise InputError("burned_in", self.burned_in, "it must be flag or reject", "use --burned-in reject or flag")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise InputError("workers", self.workers, "it must be >= 0 (0: one per core)", "use --workers 0")

    def cache_key(self) -> str:
        """Everything that changes a file's outcome given its bytes."""
        s = self.screening
        return f"{PREPROCESSING_VERSION}|{self.image_size}|{sorted(s.allowed_modalities)}|{s.min_size}|{s.multiframe}"


@dataclass(frozen=True)
class FileOutcome:
    """What one DICOM file gave; identifiers only as pseudonyms."""

    sha256: str
    reason: str | None = None  # None: decoded fine
    detail: str = ""
    image_id: str | None = None
    patient: str | None = None  # pseudonym of the DICOM PatientID, None when empty
    view_position: str = ""
    rows: int = 0
    columns: int = 0
    transfer_syntax: str = ""
    identifying_tags: tuple[str, ...] = ()
    burned_in_annotation: bool | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def process_file(
    path: str,
    size: int,
    screening: ScreeningConfig,
    salt: bytes,
    deidentify_to: str | None = None,
    sha256: str | None = None,
) -> tuple[FileOutcome, np.ndarray | None]:
    """Read, screen, scan and decode one file. Never raises for a bad file: the reason is returned.

    ``sha256``: the file's hash when the caller has it already (saves reading it twice).
    """
    sha = sha256 or _sha256(Path(path))
    try:
        ds = read_dicom(path)
        screen_header(ds, screening)
        info = header_info(ds)
        phi = phi_findings(ds)
        image = to_model_image(ds, size, screening.multiframe)
    except DicomRejected as rejected:
        return FileOutcome(sha, rejected.reason, rejected.detail), None
    except Exception as err:  # a decoder bug must not stop the other files
        return FileOutcome(sha, "decode_failed", f"{type(err).__name__}: {err}"), None
    image_id = pseudonym(info["sop_instance_uid"], salt) if info.get("sop_instance_uid") else None
    if deidentify_to and image_id:
        deidentify_file(path, Path(deidentify_to) / f"{image_id}.dcm", salt)
    outcome = FileOutcome(
        sha,
        image_id=image_id,
        patient=pseudonym(str(info["patient_id"]), salt) if info.get("patient_id") else None,
        view_position=info.get("view_position") or "",
        rows=int(info["rows"]),
        columns=int(info["columns"]),
        transfer_syntax=info.get("transfer_syntax_name") or info.get("transfer_syntax") or "",
        identifying_tags=tuple(phi["identifying_tags"]),
        burned_in_annotation=phi["burned_in_annotation"],
    )
    if image_id is None:
        return FileOutcome(sha, "bad_header", "the file has no SOP Instance UID; re-export it from the PACS"), None
    return outcome, image


@dataclass
class IngestResult:
    manifest_path: Path
    report_path: Path
    report: dict


def _list_files(dicom_dir: Path) -> list[Path]:
    if not dicom_dir.is_dir():
        raise InputError(
            "DICOM_DIR", str(dicom_dir), "it must be an existing folder", "pass the folder of the PACS export"
        )
    files = sorted(p for p in dicom_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError("DICOM_DIR", str(dicom_dir), "the folder holds no files", "check the export path")
    return files


def _load_cache(site_dir: Path, cfg: IngestConfig) -> tuple[dict[str, dict], np.ndarray | None]:
    """Previous outcomes by sha256 and the previous images (only when made with the same settings)."""
    cache_path = site_dir / CACHE_FILE
    if not cache_path.is_file() or not (site_dir / MANIFEST_FILE).is_file():
        return {}, None
    try:
        cache = json.loads(cache_path.read_text())
        if cache.get("key") != cfg.cache_key():
            return {}, None
        read_manifest(site_dir)  # validates rows
        images = np.load(site_dir / IMAGES_FILE, mmap_mode="r")
    except (OSError, ValueError, InputError):
        return {}, None  # an unreadable cache only costs a full decode
    return cache["files"], images


def _decode_all(
    todo: list[Path], cfg: IngestConfig, salt: bytes, shas: dict[Path, str], progress
) -> dict[Path, tuple[FileOutcome, np.ndarray]]:
    results: dict[Path, tuple] = {}
    workers = cfg.workers or os.cpu_count() or 1
    args = (cfg.image_size, cfg.screening, salt, cfg.deidentify_to)
    if workers == 1 or len(todo) <= 2:
        for p in todo:
            results[p] = process_file(str(p), *args, shas.get(p))
            progress()
        return results
    # spawn: workers start clean (no inherited torch/OpenMP thread state from the parent);
    # they import only numpy, pydicom and Pillow, so starting them costs well under a second.
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(process_file, str(p), *args, shas.get(p)): p for p in todo}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            progress()
    return results


def _outcome_from_cache(entry: dict) -> FileOutcome:
    return FileOutcome(**entry["outcome"] | {"identifying_tags": tuple(entry["outcome"]["identifying_tags"])})


def ingest(
    dicom_dir: str | Path,
    labels: LabelTable,
    site_dir: str | Path,
    consent: ConsentRegistry,
    cfg: IngestConfig = IngestConfig(),
    today: dt.date | None = None,
    progress_factory=None,
) -> IngestResult:
    """Ingest every file under ``dicom_dir`` into ``site_dir``.

    Args:
        progress_factory: callable(total) -> (advance callable, close callable); None: silent.

    Returns:
        The written manifest and report paths and the report.
    """
    started = time.perf_counter()
    dicom_dir, site_dir = Path(dicom_dir), Path(site_dir)
    today = today or dt.date.today()
    files = _list_files(dicom_dir)
    if site_dir.resolve() == dicom_dir.resolve() or dicom_dir.resolve() in site_dir.resolve().parents:
        raise InputError("--out", str(site_dir), "the site dataset must be outside DICOM_DIR", "choose another folder")
    if cfg.deidentify_to:
        Path(cfg.deidentify_to).mkdir(parents=True, exist_ok=True)
    salt = site_secret(site_dir, create=True)
    cached, old_images = _load_cache(site_dir, cfg)
    shas = {p: _sha256(p) for p in files}
    # De-identified copies are written while decoding: asking for them decodes the good files again.
    todo = [
        p
        for p in files
        if shas[p] not in cached or (cfg.deidentify_to and cached[shas[p]]["outcome"]["reason"] is None)
    ]
    advance, close = progress_factory(len(todo)) if progress_factory and todo else (lambda: None, lambda: None)
    try:
        decoded = _decode_all(todo, cfg, salt, shas, advance)
    finally:
        close()

    accepted: list[tuple[Path, FileOutcome, np.ndarray, tuple[int, ...], str, str]] = []
    rejected: list[dict] = []
    seen_images: dict[str, str] = {}
    statuses = consent.statuses_by_pseudonym(lambda pid: pseudonym(pid, salt), cfg.consent, today)
    matched_keys: set[str] = set()
    new_cache: dict[str, dict] = {}
    phi_tags: Counter = Counter()
    burned_in: list[str] = []
    for path in files:
        rel = str(path.relative_to(dicom_dir))
        if path in decoded:
            outcome, image = decoded[path]
        else:
            entry = cached[shas[path]]
            outcome = _outcome_from_cache(entry)
            image = None if entry.get("row") is None else old_images[entry["row"]]
        new_cache[outcome.sha256] = {"outcome": asdict(outcome), "image": image}

        def reject(reason: str, detail: str) -> None:
            rejected.append({"file": rel, "reason": reason, "detail": detail})

        if outcome.reason is not None:
            reject(outcome.reason, outcome.detail)
            continue
        phi_tags.update(outcome.identifying_tags)
        entry = labels.get(path.name)
        if entry is None:
            reject("no_label", f"no row in {Path(labels.source).name} for image {image_key(path.name)!r}")
            continue
        matched_keys.add(image_key(path.name))
        if outcome.burned_in_annotation:
            burned_in.append(rel)
            if cfg.burned_in == "reject":
                reject("burned_in_annotation", "BurnedInAnnotation is YES: the pixels may show identifying text")
                continue
        if outcome.image_id in seen_images:
            reject("duplicate_sop_instance", f"same SOP Instance UID as {seen_images[outcome.image_id]}; kept that one")
            continue
        seen_images[outcome.image_id] = rel
        patient = outcome.patient or (pseudonym(entry.patient_id, salt) if entry.patient_id else None)
        if patient is None:
            reject(
                "no_patient_id",
                "neither the DICOM PatientID nor the label file names the patient: consent cannot be checked",
            )
            continue
        status = statuses.get(patient, "missing")
        if status != USABLE:
            reject("consent_excluded", f"patient consent is {status} on {today}")
            continue
        view = outcome.view_position or (entry.view_position or "")
        accepted.append((path, outcome, image, entry.labels, patient, view))

    # Files excluded last time (no label, consent, duplicate) keep no pixels in the cache; the
    # few that became usable since are decoded now.
    late = _decode_all([a[0] for a in accepted if a[2] is None], cfg, salt, shas, lambda: None)
    decoded.update(late)
    accepted = [(p, o, late[p][1] if img is None else img, lab, pat, v) for p, o, img, lab, pat, v in accepted]
    size = cfg.image_size
    images = np.zeros((len(accepted), size, size), dtype=np.uint8)
    records = []
    for row, (_, outcome, image, label_vec, patient, view) in enumerate(accepted):
        images[row] = image
        records.append(
            ManifestRecord(
                outcome.image_id,
                patient,
                view,
                tuple(int(v) for v in label_vec),
                outcome.sha256,
                row,
                outcome.rows,
                outcome.columns,
            )
        )
    manifest = Manifest(
        PREPROCESSING_VERSION,
        size,
        labels.label_names,
        tuple(records),
        {
            "registry": str(Path(consent.source).resolve()),
            "window_days": cfg.consent.window_days,
            "checked_on": str(today),
        },
        dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    manifest_path = write_dataset(site_dir, manifest, images)
    # Cache rows point into the images.npy just written; screening rejections are cached too.
    row_of = {r.source_sha256: r.row for r in records}
    cache = {
        "key": cfg.cache_key(),
        "files": {sha: {"outcome": e["outcome"], "row": row_of.get(sha)} for sha, e in new_cache.items()},
    }
    (site_dir / CACHE_FILE).write_text(json.dumps(cache))

    seconds = time.perf_counter() - started
    reasons = Counter(r["reason"] for r in rejected)
    report = {
        "dicom_dir": str(dicom_dir.resolve()),
        "site_dir": str(site_dir.resolve()),
        "preprocessing_version": PREPROCESSING_VERSION,
        "image_size": size,
        "files": len(files),
        "accepted": len(records),
        "rejected": len(rejected),
        "rejections_by_reason": dict(sorted(reasons.items())),
        "rejected_files": rejected,
        "labels_without_image": sorted(set(labels.entries) - matched_keys - {image_key(p.name) for p in files}),
        "decoded": len(decoded),
        "reused_from_cache": len(files) - len(decoded),
        "phi": {
            "files_with_identifying_tags": sum(1 for e in new_cache.values() if e["outcome"]["identifying_tags"]),
            "identifying_tags_seen": dict(sorted(phi_tags.items())),
            "burned_in_annotation_files": burned_in,
            "note": "tag names only; no values are stored. manifest.json and images.npy carry no DICOM attributes.",
        },
        "label_prevalence": {
            n: float(np.mean([r.labels[i] for r in records])) if records else 0.0
            for i, n in enumerate(labels.label_names)
        },
        "seconds": round(seconds, 3),
    }
    report_path = site_dir / "ingest_report.json"
    report_path.write_text(json.dumps(report, indent=1))
    return IngestResult(manifest_path, report_path, report)
