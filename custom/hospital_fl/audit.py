"""An append-only, hash-chained audit trail of what the consortium did and who did it.

The trail is a JSON Lines file (``audit.jsonl``): one record per line, each holding a format
version ``v``, a sequence number ``seq`` counting from 0, the UTC ``time``, an ``event`` name
such as ``provision.run``, ``kit.issued``, ``job.submitted`` or ``privacy.spend``, the ``actor``,
free-form ``details``, the ``prev`` hash of the record before it (64 zeros for the first) and its
own ``hash``: SHA-256 of the canonical JSON of every other field. Appends hold an exclusive lock
on ``<trail>.lock``, so concurrent writers (threads or processes) never fork the chain, and each
line is written with ``O_APPEND`` and fsynced before the append returns.

What the chain detects, on ``verify_trail``:

* an edited record (its recomputed hash differs from the stored one);
* a deleted, inserted or reordered record (a ``prev`` no longer matches its predecessor's hash,
  and ``seq`` is no longer consecutive from 0);
* a damaged line (not JSON, missing or unknown fields, wrong format version) and a final line
  cut short by a crash mid-write;
* time running backwards by more than ``TIME_TOLERANCE_S`` (a clock problem or a spliced record).

What it does not detect on its own:

* removal of the last records: the remaining prefix is a valid chain;
* a writer with file access who edits a record and then recomputes every hash after it: the
  rewritten chain is internally consistent.

Both are defeated by an anchor: ``anchor(path)`` gives ``{"records": n, "last_hash": h}``, which an
operator writes down or publishes outside this machine (minutes, a ticket, another site).
``verify_trail(path, anchor=...)`` then checks that the trail still holds record ``n - 1`` with
hash ``h``; a truncated or rewritten trail fails. The chain protects against undetected change,
not against change: keep backups, and keep write access to the trail's folder narrow.

One module (~510 lines): appending, verifying and showing the trail share one hash-chain
format, and the verifier must read exactly what the writer wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hospital_fl.errors import InputError

__all__ = [
    "AUDIT_FILE",
    "FORMAT_VERSION",
    "GENESIS_HASH",
    "TIME_TOLERANCE_S",
    "AuditRecord",
    "AuditVerification",
    "anchor",
    "append_event",
    "read_trail",
    "verify_trail",
]

AUDIT_FILE = "audit.jsonl"
FORMAT_VERSION = 1
GENESIS_HASH = "0" * 64
# Clocks get stepped back by NTP; a small backwards step is normal, a large one is not.
TIME_TOLERANCE_S = 2.0
# An audit record describes an action, it does not carry data; a bound keeps tail reads cheap.
MAX_RECORD_BYTES = 1 << 20

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_EVENT_PATTERN = re.compile(r"[a-z0-9_.-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = ("v", "seq", "time", "event", "actor", "details", "prev", "hash")
_TAIL_BLOCK = 8192
_VERIFY_HINT = "run `hospital-fl audit verify {path}` to see every problem, then restore the trail from backup"


@dataclass(frozen=True)
class AuditRecord:
    """One line of the trail."""

    seq: int
    time: str
    event: str
    actor: str
    details: dict
    prev: str
    hash: str


@dataclass(frozen=True)
class AuditVerification:
    """The outcome of checking a whole trail; ``problems`` name the line and what is wrong."""

    ok: bool
    records: int
    problems: tuple[str, ...]
    last_hash: str


# -- canonical form ---------------------------------------------------------------------
def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _hashed_fields(record: AuditRecord) -> dict:
    """Every field the hash covers: all but ``hash`` itself, format version included."""
    return {"v": FORMAT_VERSION, **{name: getattr(record, name) for name in _FIELDS if name not in ("v", "hash")}}


def _hash_of(fields: dict) -> str:
    return hashlib.sha256(_canonical(fields)).hexdigest()


def _line_of(record: AuditRecord) -> bytes:
    return _canonical({**_hashed_fields(record), "hash": record.hash}) + b"\n"


def _format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime(_TIME_FORMAT)


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=timezone.utc)


# -- parsing one line -------------------------------------------------------------------
def _parse_line(raw: bytes) -> tuple[AuditRecord | None, list[str]]:
    """The record on a line and what is wrong with it; the record is None when unusable.

    A record with a wrong format version is still returned (with the problem), so the
    chain check can go on past it.
    """
    if not raw.strip():
        return None, ["empty line"]
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, [f"not JSON ({err})"]
    if not isinstance(data, dict):
        return None, [f"not a JSON object but {type(data).__name__}"]
    problems = []
    missing = [name for name in _FIELDS if name not in data]
    if missing:
        problems.append(f"missing fields {', '.join(missing)}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        problems.append(f"unknown fields {', '.join(unknown)} (not covered by the hash)")
    if missing:
        return None, problems
    types = {"seq": int, "time": str, "event": str, "actor": str, "details": dict, "prev": str, "hash": str}
    for name, kind in types.items():
        value = data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"field {name} is {type(value).__name__}, not {kind.__name__}")
    if any(p.startswith("field ") for p in problems):
        return None, problems
    if data["v"] != FORMAT_VERSION:
        problems.append(f"format version {data['v']!r}, this reader knows version {FORMAT_VERSION}")
    for name in ("prev", "hash"):
        if not _HEX64.fullmatch(data[name]):
            problems.append(f"field {name} is not 64 lowercase hex digits")
    return AuditRecord(**{name: data[name] for name in _FIELDS if name != "v"}), problems


def _content_problems(record: AuditRecord, version_ok: bool) -> list[str]:
    """A hash mismatch; only meaningful when the record is in the version this code hashes."""
    if version_ok and _hash_of(_hashed_fields(record)) != record.hash:
        return ["its hash does not match its content (the record was edited)"]
    return []


def _link_problems(record: AuditRecord, before: AuditRecord | None, before_line: int | None) -> list[str]:
    """How ``record`` fails to follow ``before`` (the previous readable record, None at the start)."""
    problems = []
    if before is None:
        if record.prev != GENESIS_HASH:
            problems.append("the first record's prev is not 64 zeros (records before it were removed)")
        if record.seq != 0:
            problems.append(f"seq {record.seq}, expected 0 for the first record")
        return problems
    if record.prev != before.hash:
        problems.append(
            f"prev does not match the hash of line {before_line} (a record was deleted, inserted or reordered here)"
        )
    if record.seq != before.seq + 1:
        problems.append(f"seq {record.seq} does not follow seq {before.seq} of line {before_line}")
    try:
        back = (_parse_time(before.time) - _parse_time(record.time)).total_seconds()
    except ValueError:
        return problems  # reported by the time format check
    if back > TIME_TOLERANCE_S:
        problems.append(f"time {record.time} is {back:.1f} s before line {before_line}'s {before.time}")
    return problems


def _time_problems(record: AuditRecord) -> list[str]:
    try:
        _parse_time(record.time)
    except ValueError:
        return [f"time {record.time!r} is not UTC ISO-8601 like 2026-01-31T12:00:00.000000Z"]
    return []


# -- reading ----------------------------------------------------------------------------
def _require_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(
            "audit trail",
            str(path),
            "the file is missing",
            f"pass the trail's path (the file is called {AUDIT_FILE}); restore it from backup if it was removed",
        )


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number from 1, content without newline, whether it ended with a newline)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            complete = raw.endswith(b"\n")
            yield number, raw[:-1] if complete else raw, complete


def read_trail(path: str | Path) -> list[AuditRecord]:
    """Every record in file order; refuses a trail with an unreadable line.

    Reading does not check the chain: use ``verify_trail`` before trusting the records.
    """
    path = Path(path)
    _require_file(path)
    records = []
    for number, raw, complete in _lines(path):
        record, problems = _parse_line(raw)
        if not complete:
            problems = ["the line has no end (a partial write)", *problems]
        if record is None or problems:
            raise InputError("audit trail", str(path), f"line {number} is damaged: {'; '.join(problems)}", _hint(path))
        records.append(record)
    return records


def verify_trail(path: str | Path, anchor: dict | None = None) -> AuditVerification:
    """Check every line and every link of the trail; report all problems, not just the first.

    After a broken link the check goes on, each record judged against the readable record
    just before it, so one deletion shows as one problem and later damage still shows.
    With ``anchor`` (from ``anchor()``), also check that the anchored record is still there.
    """
    path = Path(path)
    _require_file(path)
    expected = _check_anchor_value(anchor) if anchor is not None else None
    problems: list[str] = []
    before: AuditRecord | None = None
    before_line: int | None = None
    count = 0
    anchor_seen: str | None = None
    for number, raw, complete in _lines(path):
        if not complete:
            problems.append(f"line {number}: the last line has no end, so its write was cut short (a partial write)")
            continue
        record, line_problems = _parse_line(raw)
        if record is not None:
            version_ok = not any(p.startswith("format version") for p in line_problems)
            line_problems += _time_problems(record)
            line_problems += _content_problems(record, version_ok)
            line_problems += _link_problems(record, before, before_line)
        problems.extend(f"line {number}: {p}" for p in line_problems)
        if record is None:
            continue
        count += 1
        before, before_line = record, number
        if expected is not None and record.seq == expected[0] - 1:
            anchor_seen = record.hash
    if expected is not None and expected[0] > 0:
        records, last_hash = expected
        if anchor_seen is None:
            problems.append(
                f"anchor: no record with seq {records - 1}, so the trail lost records at its end "
                f"(the anchor says {records} records ending in {last_hash})"
            )
        elif anchor_seen != last_hash:
            problems.append(
                f"anchor: record seq {records - 1} has hash {anchor_seen}, the anchor says {last_hash} "
                "(the trail was rewritten from an earlier point)"
            )
    return AuditVerification(
        ok=not problems,
        records=count,
        problems=tuple(problems),
        last_hash=before.hash if before is not None else GENESIS_HASH,
    )


def anchor(path: str | Path) -> dict:
    """The value to publish away from this machine, so later truncation or rewriting shows.

    Refuses a trail that does not verify: anchoring damage would vouch for it.
    """
    result = verify_trail(path)
    if not result.ok:
        raise InputError(
            "audit trail",
            str(path),
            f"it has {len(result.problems)} problems, first: {result.problems[0]}",
            _hint(Path(path)),
        )
    return {"records": result.records, "last_hash": result.last_hash}


def _check_anchor_value(value: dict) -> tuple[int, str]:
    fix = 'pass the dict anchor() returned: {"records": N, "last_hash": "<64 hex>"}'
    if not isinstance(value, dict) or set(value) != {"records", "last_hash"}:
        raise InputError("anchor", value, "it must have exactly the keys records and last_hash", fix)
    records, last_hash = value["records"], value["last_hash"]
    if not isinstance(records, int) or isinstance(records, bool) or records < 0:
        raise InputError("anchor records", records, "it must be a whole number >= 0", fix)
    if not isinstance(last_hash, str) or not _HEX64.fullmatch(last_hash):
        raise InputError("anchor last_hash", last_hash, "it must be 64 lowercase hex digits", fix)
    if records == 0 and last_hash != GENESIS_HASH:
        raise InputError("anchor last_hash", last_hash, "an anchor of 0 records has 64 zeros as its hash", fix)
    return records, last_hash


def _hint(path: Path) -> str:
    return _VERIFY_HINT.format(path=path)


# -- appending --------------------------------------------------------------------------
def _check_event(event: object) -> str:
    if not isinstance(event, str) or not _EVENT_PATTERN.fullmatch(event):
        raise InputError(
            "event",
            event,
            "it must be a non-empty name of lowercase letters, digits, '_', '.' and '-'",
            "name it area.action, e.g. provision.run, kit.issued, job.submitted or privacy.spend",
        )
    return event


def _check_actor(actor: object) -> str:
    if not isinstance(actor, str) or not actor.strip():
        raise InputError(
            "actor", actor, "it must be a non-empty string", "pass who acted, e.g. the admin's email or the site name"
        )
    return actor


def _find_unserialisable(value: object, where: str) -> tuple[str, object, str] | None:
    """The first place in ``value`` that JSON cannot hold exactly: (key path, value, why)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}[{key!r}]", key, "keys must be strings"
            found = _find_unserialisable(item, f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_unserialisable(item, f"{where}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return where, value, "NaN and infinity are not JSON"
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return where, value, f"a {type(value).__name__} is not JSON"


def _check_details(details: object) -> dict:
    """A JSON copy of ``details``, so the returned record equals the one read back later."""
    if details is None:
        return {}
    if not isinstance(details, dict):
        raise InputError("details", details, "it must be a dict", "pass a dict of JSON values, e.g. {'job_id': 'x'}")
    found = _find_unserialisable(details, "details")
    if found:
        where, value, why = found
        raise InputError(where, value, why, "convert it to a string, number, bool, None, list or dict first")
    return json.loads(_canonical(details))


def _now(now: datetime | None) -> str:
    if now is None:
        return _format_time(datetime.now(timezone.utc))
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise InputError("now", now, "it must be a timezone-aware datetime", "pass datetime.now(timezone.utc)")
    return _format_time(now)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive flock on a sibling file: flock is per open file, so it orders threads too."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _last_line(fd: int, size: int) -> tuple[bytes, bool]:
    """The final line's bytes (without newline) and whether it ended with one, reading back in blocks."""
    end = size
    complete = os.pread(fd, 1, size - 1) == b"\n"
    if complete:
        end -= 1
    tail = b""
    start = end
    while start > 0 and len(tail) <= MAX_RECORD_BYTES:
        step = min(_TAIL_BLOCK, start)
        start -= step
        tail = os.pread(fd, step, start) + tail
        cut = tail.rfind(b"\n")
        if cut >= 0:
            return tail[cut + 1 :], complete
    return tail, complete


def _count_lines(fd: int, size: int) -> int:
    """Lines in the file; read in full, but only to name the damaged line in an error."""
    newlines, offset = 0, 0
    while offset < size:
        block = os.pread(fd, 1 << 20, offset)
        newlines += block.count(b"\n")
        offset += len(block)
    last_complete = size == 0 or os.pread(fd, 1, size - 1) == b"\n"
    return newlines if last_complete else newlines + 1


def _tail_record(path: Path, fd: int) -> AuditRecord | None:
    """The last record, checked on its own; None for an empty trail; refuses a damaged tail."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    raw, complete = _last_line(fd, size)
    record, problems = _parse_line(raw)
    if not complete:
        problems = ["it has no line end (a partial write)", *problems]
    elif len(raw) > MAX_RECORD_BYTES:
        problems = [f"it is longer than {MAX_RECORD_BYTES} bytes", *problems]
    elif record is not None and not problems:
        problems = _time_problems(record) + _content_problems(record, True)
    if record is None or problems:
        line = _count_lines(fd, size)
        raise InputError(
            "audit trail",
            str(path),
            f"the trail is damaged at line {line} ({'; '.join(problems)}), so nothing can be chained to it",
            _hint(path),
        )
    return record


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_event(
    path: str | Path, event: str, actor: str, details: dict | None = None, now: datetime | None = None
) -> AuditRecord:
    """Chain one event to the trail at ``path`` (created with its folders if missing) and return it.

    The lock is held from reading the tail to the fsync of the new line, so two appenders
    can never both chain to the same predecessor.
    """
    path = Path(path)
    event, actor, details = _check_event(event), _check_actor(actor), _check_details(details)
    stamp = _now(now) if now is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            if created:
                os.fchmod(fd, 0o640)  # the umask must not widen or narrow who can read the trail
            last = _tail_record(path, fd)
            fields = {
                "seq": 0 if last is None else last.seq + 1,
                "time": stamp or _now(None),  # taken under the lock, so times follow seq
                "event": event,
                "actor": actor,
                "details": details,
                "prev": GENESIS_HASH if last is None else last.hash,
            }
            record = AuditRecord(**fields, hash=_hash_of({"v": FORMAT_VERSION, **fields}))
            line = memoryview(_line_of(record))
            if len(line) > MAX_RECORD_BYTES:
                raise InputError(
                    "details",
                    f"a record of {len(line)} bytes",
                    f"an audit record must stay under {MAX_RECORD_BYTES} bytes",
                    "record a reference (a path and its SHA-256) instead of the data itself",
                )
            while line:
                line = line[os.write(fd, line) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(path.parent)
    return record
