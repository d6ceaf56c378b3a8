"""`hospital-fl ingest`: a PACS export folder + a label file -> a training-ready site dataset.

Per file (in worker processes, one per core): sha256 of the bytes, read, screen the header,
scan for PHI, decode and preprocess to the model's input size. Then, in one pure pass over
the outcomes in path order: match labels, drop duplicate SOP instances, check consent, and
commit a new generation of the images file + manifest.json (see manifest.py: a crash or a full
disk at any point leaves the previous dataset whole). Every file that does not make it into the manifest is in
ingest_report.json with its reason; nothing is dropped silently.

Incremental: outcomes are cached by the file's sha256 (under the preprocessing version,
image size and screening settings), so re-ingesting an unchanged folder decodes nothing;
labels and consent are re-applied every run since they change without the images changing.
The cache, like the manifest, holds only pseudonyms and non-identifying header fields.

ingest_report.json names rejected files by their path under DICOM_DIR so staff can find
them; it is site-local and never sent anywhere (paths can carry identifiers).

One module (~530 lines): the ingest run's crash-safe order (stage, screen, write the
generation, then switch) reads top to bottom; its checks live in screening, phi, pixels and
labels.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pydicom

from hospital_fl.data.hashing import file_sha256
from hospital_fl.data.ingest.consent import USABLE, ConsentPolicy, ConsentRegistry
from hospital_fl.data.ingest.labels import LabelTable, base_key, image_key
from hospital_fl.data.ingest.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestRecord,
    atomic_write_bytes,
    load_images,
    read_manifest,
    site_secret,
    write_dataset,
)
from hospital_fl.data.ingest.phi import (
    DEIDENTIFICATION_METHOD,
    BurnedInWithheld,
    burned_in_risk,
    deidentify_file,
    image_pseudonym,
    patient_pseudonym,
    phi_findings,
    pseudonym,
)
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
    deidentify_to: str | None = None  # also write de-identified copies (allow list; see phi.py)
    # Copies of images whose pixels may show identifying text (phi.burned_in_risk) are withheld
    # unless the operator, having reviewed them, allows them.
    copy_burned_in: bool = False

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


def safe_detail(detail: str) -> str:
    """A rejection detail fit for the cache and report: quoted header values that could carry
    identifying text (long, or outside the DICOM code-string alphabet, e.g. a corrupt element
    that swallowed its neighbours) are withheld."""
    return _QUOTED.sub(lambda m: m.group(0) if _CODE_STRING.fullmatch(m.group(1)) else "'<value withheld>'", detail)


_QUOTED = re.compile(r"'([^']*)'")
_CODE_STRING = re.compile(r"[A-Z0-9 _]{0,16}")  # the DICOM code-string alphabet and length


def process_file(
    path: str, size: int, screening: ScreeningConfig, salt: bytes, sha256: str | None = None
) -> tuple[FileOutcome, np.ndarray | None]:
    """Read, screen, scan and decode one file. Never raises for a bad file: the reason is returned.

    ``sha256``: the file's hash when the caller has it already (saves reading it twice).
    """
    try:
        sha = sha256 or file_sha256(Path(path))
        ds = read_dicom(path)
        screen_header(ds, screening)
        info = header_info(ds)
        phi = phi_findings(ds)
        image = to_model_image(ds, size, screening.multiframe)
    except DicomRejected as rejected:
        return FileOutcome(sha, rejected.reason, safe_detail(rejected.detail)), None
    except OSError as err:
        return FileOutcome(sha256 or "", UNREADABLE, f"the file could not be read ({type(err).__name__})"), None
    except Exception as err:  # a decoder bug must not stop the other files; its message may quote values
        return FileOutcome(sha, "decode_failed", f"the decoder failed ({type(err).__name__})"), None
    if not info.get("sop_instance_uid"):
        return FileOutcome(sha, "bad_header", "the file has no SOP Instance UID; re-export it from the PACS"), None
    outcome = FileOutcome(
        sha,
        image_id=image_pseudonym(info["sop_instance_uid"], salt),
        patient=patient_pseudonym(str(info["patient_id"]), salt) if info.get("patient_id") else None,
        view_position=info.get("view_position") or "",
        rows=int(info["rows"]),
        columns=int(info["columns"]),
        transfer_syntax=info.get("transfer_syntax_name") or info.get("transfer_syntax") or "",
        identifying_tags=tuple(phi["identifying_tags"]),
        burned_in_annotation=phi["burned_in_annotation"],
    )
    return outcome, image


@dataclass
class IngestResult:
    manifest_path: Path
    report_path: Path
    report: dict


def _list_files(dicom_dir: Path) -> tuple[list[Path], list[dict]]:
    """Every regular file under ``dicom_dir`` (hidden ones too), and what could not be listed."""
    if not dicom_dir.is_dir():
        raise InputError(
            "DICOM_DIR", str(dicom_dir), "it must be an existing folder", "pass the folder of the PACS export"
        )
    files, unlisted = [], []

    def unreadable(err: OSError) -> None:
        unlisted.append({"file": str(Path(err.filename).relative_to(dicom_dir)), "reason": "unreadable_directory",
                         "detail": f"the folder could not be listed ({err.strerror}); check its permissions"})  # fmt: skip

    for root, _, names in os.walk(dicom_dir, onerror=unreadable):
        for name in names:
            path = Path(root) / name
            if path.is_file():
                files.append(path)
            else:
                unlisted.append({"file": str(path.relative_to(dicom_dir)), "reason": "not_a_regular_file",
                                 "detail": "a link to nothing, a pipe or a device; copy the real file into the export"})  # fmt: skip
    if not files:
        raise InputError("DICOM_DIR", str(dicom_dir), "the folder holds no readable files", "check the export path")
    return sorted(files), unlisted


def _load_cache(site_dir: Path, cfg: IngestConfig, salt: bytes) -> tuple[dict[str, dict], np.ndarray | None]:
    """Previous outcomes by sha256 and the previous images, only when made with the same settings
    and site secret and when every cached row still holds the file it claims (an interrupted or
    concurrent run must not pair pixels with another image's labels)."""
    cache_path = site_dir / CACHE_FILE
    if not cache_path.is_file() or not (site_dir / MANIFEST_FILE).is_file():
        return {}, None
    try:
        cache = json.loads(cache_path.read_text())
        if cache.get("key") != cfg.cache_key() or cache.get("secret") != _secret_fingerprint(salt):
            return {}, None
        manifest = read_manifest(site_dir)
        if cache.get("images_sha256") != manifest.images_sha256:
            return {}, None  # made for another generation (a run stopped between commit and cache)
        images = load_images(site_dir, manifest)  # checks the pixels are the ones the manifest committed
        by_row = {r.row: r.source_sha256 for r in manifest.records}
        if any(e["row"] is not None and by_row.get(e["row"]) != sha for sha, e in cache["files"].items()):
            return {}, None
    except (OSError, ValueError, KeyError, InputError):
        return {}, None  # an unusable cache only costs a full decode
    return cache["files"], images


def _secret_fingerprint(salt: bytes) -> str:
    return pseudonym("cache-key", salt)


def _decode_all(
    todo: list[Path], cfg: IngestConfig, salt: bytes, shas: dict[Path, str], progress
) -> dict[Path, tuple[FileOutcome, np.ndarray]]:
    results: dict[Path, tuple] = {}
    workers = cfg.workers or len(os.sched_getaffinity(0))  # the cores this process may use (containers)
    args = (cfg.image_size, cfg.screening, salt)
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
            path = futures[fut]
            try:
                results[path] = fut.result()
            except Exception as err:  # a decoder that kills its worker process
                results[path] = (
                    FileOutcome(shas.get(path, ""), "decode_failed", f"the decoder crashed ({type(err).__name__})"),
                    None,
                )
            progress()
    return results


def _outcome_from_cache(entry: dict) -> FileOutcome:
    return FileOutcome(**entry["outcome"] | {"identifying_tags": tuple(entry["outcome"]["identifying_tags"])})


@contextlib.contextmanager
def _exclusive(site_dir: Path):
    """One ingest per site folder at a time."""
    site_dir.mkdir(parents=True, exist_ok=True)
    with (site_dir / ".ingest.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                "--out", str(site_dir), "another ingest is writing this site dataset", "wait for it to finish"
            ) from None
        yield


def _write_deidentified(accepted: list, dicom_dir: Path, target: Path, salt: bytes, allow_burned_in: bool) -> list[dict]:
    """De-identified copies of the accepted images only; copies of images no longer accepted
    (consent withdrawn, relabelled), withheld (burned-in text) or made by an earlier method are
    removed or rewritten. Returns withheld copies and failures for the report."""
    target.mkdir(parents=True, exist_ok=True)
    keep, problems = set(), []
    for path, outcome, *_ in accepted:
        dst = target / f"{outcome.image_id}.dcm"
        rel = str(path.relative_to(dicom_dir))
        existing = _current_copy(dst) if dst.exists() else None
        if existing is not None and (allow_burned_in or burned_in_risk(existing) is None):
            keep.add(dst.name)  # made by this method under this policy: nothing to redo
            continue
        try:
            deidentify_file(path, dst, salt, allow_burned_in=allow_burned_in)
            keep.add(dst.name)
        except BurnedInWithheld as withheld:
            problems.append({"file": rel, "reason": "copy_withheld_burned_in",
                             "detail": f"{withheld.value}: no de-identified copy (the image still trains); "
                             "review it and pass --copy-burned-in to share it"})  # fmt: skip
        except Exception as err:  # the image still trains; only its shareable copy is missing
            problems.append({"file": rel, "reason": "deidentify_failed",
                             "detail": f"no de-identified copy was written ({type(err).__name__})"})  # fmt: skip
    for old in target.glob("*.dcm"):
        if _PSEUDONYM_FILE.fullmatch(old.name) and old.name not in keep:
            old.unlink()
    return problems


def _current_copy(path: Path):
    """The copy's header when this bundle's de-identification made it, else None (older copies
    may hold attributes it now drops, so they are rewritten)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None
    return header if str(header.get("DeidentificationMethod")) == DEIDENTIFICATION_METHOD else None


_PSEUDONYM_FILE = re.compile(r"[0-9a-f]{24}\.dcm")
UNREADABLE = "unreadable"


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

    Raises:
        InputError: bad folders, a lost site secret, another ingest running, or no file
            accepted (the report is written; the previous dataset is kept).
    """
    dicom_dir, site_dir = Path(dicom_dir), Path(site_dir)
    if site_dir.resolve() == dicom_dir.resolve() or dicom_dir.resolve() in site_dir.resolve().parents:
        raise InputError("--out", str(site_dir), "the site dataset must be outside DICOM_DIR", "choose another folder")
    files, unlisted = _list_files(dicom_dir)
    with _exclusive(site_dir):
        return _ingest_locked(
            dicom_dir, files, unlisted, labels, site_dir, consent, cfg, today or dt.date.today(), progress_factory
        )


def _ingest_locked(dicom_dir, files, unlisted, labels, site_dir, consent, cfg, today, progress_factory) -> IngestResult:
    started = time.perf_counter()
    salt = site_secret(site_dir, create=True)
    cached, old_images = _load_cache(site_dir, cfg, salt)
    shas: dict[Path, str] = {}
    unreadable: dict[Path, FileOutcome] = {}
    for p in files:
        try:
            shas[p] = file_sha256(p)
        except OSError as err:  # vanished or not readable: listed, the rest ingest
            unreadable[p] = FileOutcome(
                "", UNREADABLE, f"the file could not be read ({err.strerror}); check its permissions"
            )
    todo = [p for p in files if p in shas and shas[p] not in cached]
    advance, close = progress_factory(len(todo)) if progress_factory and todo else (lambda: None, lambda: None)
    try:
        decoded = _decode_all(todo, cfg, salt, shas, advance)
    finally:
        close()

    keys = {p: image_key(str(p.relative_to(dicom_dir))) for p in files}
    base_counts = Counter(base_key(k) for k in keys.values())
    accepted: list[tuple[Path, FileOutcome, np.ndarray | None, tuple[int, ...], str, str]] = []
    rejected: list[dict] = list(unlisted)
    seen_images: dict[str, str] = {}
    statuses = consent.statuses_by_pseudonym(lambda pid: patient_pseudonym(pid, salt), cfg.consent, today)
    matched_keys: set[str] = set()
    new_cache: dict[str, dict] = {}
    phi_tags: Counter = Counter()
    burned_in: list[str] = []
    for path in files:
        rel = str(path.relative_to(dicom_dir))

        def reject(reason: str, detail: str) -> None:
            rejected.append({"file": rel, "reason": reason, "detail": detail})

        if path in unreadable:
            reject(UNREADABLE, unreadable[path].detail)
            continue
        if path in decoded:
            outcome, image = decoded[path]
        else:
            entry = cached[shas[path]]
            outcome = _outcome_from_cache(entry)
            image = None if entry.get("row") is None else old_images[entry["row"]]
        if outcome.reason not in _NOT_CACHED:
            new_cache[outcome.sha256] = {"outcome": asdict(outcome)}
        if outcome.reason is not None:
            reject(outcome.reason, outcome.detail)
            continue
        phi_tags.update(outcome.identifying_tags)
        key = keys[path]
        if key in labels.entries:
            entry = labels.entries[key]
        elif base_key(key) in labels.entries and base_counts[base_key(key)] > 1:
            reject("ambiguous_label", f"{base_counts[base_key(key)]} files are named {base_key(key)!r}; "
                   "name each by its path under DICOM_DIR in the label file")  # fmt: skip
            continue
        else:
            entry = labels.entries.get(base_key(key))
        if entry is None:
            reject("no_label", f"no row in {Path(labels.source).name} for image {key!r}")
            continue
        matched_keys.add(key if key in labels.entries else base_key(key))
        if outcome.burned_in_annotation:
            burned_in.append(rel)
            if cfg.burned_in == "reject":
                reject("burned_in_annotation", "BurnedInAnnotation is YES: the pixels may show identifying text")
                continue
        if outcome.image_id in seen_images:
            reject("duplicate_sop_instance", f"same SOP Instance UID as {seen_images[outcome.image_id]}; kept that one")
            continue
        seen_images[outcome.image_id] = rel
        patient = outcome.patient or (patient_pseudonym(entry.patient_id, salt) if entry.patient_id else None)
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

    report_path = site_dir / REPORT_FILE

    def write_report() -> dict:
        reasons = Counter(r["reason"] for r in rejected)
        report = {
            "dicom_dir": str(dicom_dir.resolve()),
            "site_dir": str(site_dir.resolve()),
            "preprocessing_version": PREPROCESSING_VERSION,
            "image_size": cfg.image_size,
            "files": len(files) + len(unlisted),
            "accepted": len(accepted),
            "rejected": len(rejected),
            "rejections_by_reason": dict(sorted(reasons.items())),
            "rejected_files": rejected,
            "labels_without_image": sorted(
                set(labels.entries) - matched_keys - set(keys.values()) - {base_key(k) for k in keys.values()}
            ),
            "decoded": len(decoded),
            "reused_from_cache": len(files) - len(unreadable) - len(decoded),
            "phi": {
                "files_with_identifying_tags": sum(1 for e in new_cache.values() if e["outcome"]["identifying_tags"]),
                "identifying_tags_seen": dict(sorted(phi_tags.items())),
                "burned_in_annotation_files": burned_in,
                "note": "tag names only; no values are stored. manifest.json and the images file carry no DICOM "
                "attribute values other than view position, and no file paths.",
            },
            "label_prevalence": {
                n: float(np.mean([lab[i] for _, _, _, lab, _, _ in accepted])) if accepted else 0.0
                for i, n in enumerate(labels.label_names)
            },
            "seconds": round(time.perf_counter() - started, 3),
        }
        atomic_write_bytes(report_path, json.dumps(report, indent=1).encode())
        return report

    if not accepted:
        write_report()
        top = ", ".join(f"{r} {n}" for r, n in Counter(r["reason"] for r in rejected).most_common(3))
        raise InputError(
            "ingest",
            str(dicom_dir),
            f"no file was accepted ({top}); the previous dataset in {site_dir} is kept",
            f"read {report_path} for each file's reason and fix the export, labels or consent registry",
        )
    if cfg.deidentify_to:
        rejected += _write_deidentified(accepted, dicom_dir, Path(cfg.deidentify_to), salt, cfg.copy_burned_in)
    size = cfg.image_size
    images = np.zeros((len(accepted), size, size), dtype=np.uint8)
    records = []
    for row, (_, outcome, image, label_vec, patient, view) in enumerate(accepted):
        images[row] = image
        records.append(ManifestRecord(outcome.image_id, patient, view, tuple(int(v) for v in label_vec),
                                      outcome.sha256, row, outcome.rows, outcome.columns))  # fmt: skip
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
    # Cache rows point into the images file just committed (checked against the manifest on load).
    row_of = {r.source_sha256: r.row for r in records}
    cache = {
        "key": cfg.cache_key(),
        "secret": _secret_fingerprint(salt),
        "images_sha256": read_manifest(manifest_path).images_sha256,
        "files": {sha: {"outcome": e["outcome"], "row": row_of.get(sha)} for sha, e in new_cache.items()},
    }
    try:
        atomic_write_bytes(site_dir / CACHE_FILE, json.dumps(cache).encode())
        report = write_report()
    except OSError as err:
        # The dataset is committed; a cache left from the previous generation is ignored next time.
        raise InputError(
            "site dataset",
            str(site_dir),
            f"the new dataset is committed, but the ingest cache or report could not be written "
            f"({type(err).__name__}: {err.strerror or err})",
            "free disk space; the next ingest decodes every file once and writes them",
        ) from None
    return IngestResult(manifest_path, report_path, report)


# Outcomes that are not cached: they can change without the file changing (a decoder plugin
# installed after a decode failure, permissions fixed).
_NOT_CACHED = ("decode_failed", UNREADABLE)
