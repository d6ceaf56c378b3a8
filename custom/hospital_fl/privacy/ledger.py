"""A site's privacy ledger: every DP release made with its data, across jobs and restarts.

The ledger is a JSON file in the site's privacy folder holding one entry per (job, mechanism):
Gaussian entries carry the Opacus release parameters (noise multiplier, sample rate, steps),
Laplace entries the pure epsilon of each release and their count. Epsilon per job and in total
is recomputed from them (``hospital_fl.privacy.budget``), never summed by hand, and equals
Opacus for Gaussian releases.

Spending is one step: ``spend`` reads the ledger, lets the caller's check refuse the release
(the budget caps), appends it to the site's audit trail and rewrites the ledger, all under one
exclusive lock on ``<ledger>.lock``, so concurrent jobs and processes at one site see each
other's spend and can never both pass a cap they would exceed together.

Tamper evidence, in three layers:

- the file carries an HMAC-SHA256 of its entries keyed with the site's ledger key
  (``ledger.key`` beside it, 32 random bytes, mode 0600, made by ``privacy init``): an edited
  entry without the key fails;
- every spend is first appended to the hash-chained audit trail beside the ledger
  (``audit.jsonl``, ``hospital_fl.audit``), and the ledger records the trail record it last
  wrote (seq and hash): a ledger rolled back to an older copy, or a trail cut short, no longer
  meets the other at every read;
- ``audit_problems`` compares each entry with the sum of the trail's spends (at the start of
  every job and by ``privacy init``): an edited or deleted entry is named.

A missing or corrupt ledger is refused, never reset: a reset would hand back spent budget. It
is rebuilt from the verified audit trail instead (``rebuild_from_audit``), which holds every
spend. Version-1 ledgers (unkeyed checksum) are refused with that rebuild as the migration.

One module (~610 lines): the ledger's HMAC, its link to the audit trail and the check-and-
record under one lock are a single guarantee.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from hospital_fl.audit import AUDIT_FILE, append_event, read_trail, verify_trail
from hospital_fl.errors import InputError
from hospital_fl.privacy.accounting import Release
from hospital_fl.privacy.budget import compose_epsilon, kind_of

__all__ = [
    "LedgerEntry",
    "PrivacyLedger",
    "Spend",
    "LEDGER_VERSION",
    "KEY_FILE",
    "SPEND_EVENT",
    "entries_epsilon",
]

LEDGER_VERSION = 2
KEY_FILE = "ledger.key"  # beside the ledger, 0600
SPEND_EVENT = "privacy.spend"
INIT_EVENT = "privacy.init"
REBUILD_EVENT = "privacy.rebuild"
_TAIL_BYTES = 1 << 16


def _rebuild_fix(path: Path) -> str:
    home = path.parent.parent if path.parent.name == "privacy" else path.parent
    return (
        f"rebuild it from the site's audit trail {path.with_name(AUDIT_FILE)}, which holds every spend: "
        f"`hospital-fl privacy init {home} --site SITE --rebuild`; ask the privacy officer before any manual change"
    )


@dataclass(frozen=True)
class LedgerEntry:
    """One (job, mechanism): ``steps`` releases at (noise, rate), or at ``pure_epsilon`` each."""

    job_id: str
    mechanism: str  # see hospital_fl.privacy.budget.MECHANISM_KINDS
    noise_multiplier: float
    sample_rate: float
    steps: int
    updated_at: float
    pure_epsilon: float | None = None  # Laplace entries: epsilon of one release

    @property
    def kind(self) -> str:
        return kind_of(self.mechanism, f"ledger entry {self.job_id}")

    @property
    def release(self) -> Release:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Spend:
    """One mechanism's part of a release: ``steps`` more runs of it.

    Gaussian: ``noise_multiplier`` and ``sample_rate``. Laplace: ``pure_epsilon`` (the
    noise multiplier and rate are then 0 and 1, unused).
    """

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    pure_epsilon: float | None = None

    @classmethod
    def gaussian(cls, mechanism: str, release: Release) -> "Spend":
        noise, rate, steps = release
        return cls(mechanism, float(noise), float(rate), int(steps))

    @classmethod
    def laplace(cls, mechanism: str, epsilon: float, steps: int = 1) -> "Spend":
        return cls(mechanism, 0.0, 1.0, int(steps), float(epsilon))

    def checked(self) -> "Spend":
        """Refuse a release whose spend could not be accounted (InputError)."""
        kind = kind_of(self.mechanism)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise InputError("privacy release steps", self.steps, "it must be a whole number >= 0", "fix the caller")
        if kind == "laplace":
            eps = self.pure_epsilon
            if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
                raise InputError(
                    f"privacy release {self.mechanism}: epsilon",
                    eps,
                    "a Laplace release needs a finite epsilon > 0",
                    "set it",
                )
        elif not (self.noise_multiplier > 0 and 0 < self.sample_rate <= 1) or self.pure_epsilon is not None:
            raise InputError(
                f"privacy release {self.mechanism}",
                (self.noise_multiplier, self.sample_rate),
                "a Gaussian release needs a noise multiplier > 0 and a sample rate in (0, 1]",
                "fix the caller",
            )
        return self


def entries_epsilon(entries: list[LedgerEntry], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of ``entries`` composed (see hospital_fl.privacy.budget for the rule)."""
    gaussian = [e.release for e in entries if e.kind == "gaussian"]
    pure = [(e.pure_epsilon, e.steps) for e in entries if e.kind == "laplace"]
    return compose_epsilon(gaussian, pure, delta, accountant)


def _as_dict(entry: LedgerEntry | Spend) -> dict:
    return dict(vars(entry))  # flat dataclasses: a shallow copy is asdict, without its deep copy


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(site: str, entries: list[dict]) -> str:
    return hashlib.sha256(_canonical({"site": site, "entries": entries})).hexdigest()


def _v1_checksum(site: str, entries: list[dict]) -> str:
    return hashlib.sha256(
        json.dumps({"site": site, "entries": entries}, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


_MAC_FIELD = ',"mac":"'


def _encode(key: bytes, body: dict) -> str:
    """The file's text: the canonical JSON of ``body`` with its HMAC-SHA256 appended as the last field."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))  # the C encoder: fast
    mac = hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()
    return f'{canonical[:-1]}{_MAC_FIELD}{mac}"}}'


def _authentic(key: bytes, text: str) -> bool:
    """Whether the file's bytes before its ``mac`` field carry that HMAC (no re-encoding needed)."""
    cut = text.rfind(_MAC_FIELD)
    if cut < 0 or not text.endswith('"}'):
        return False
    expected = hmac.new(key, (text[:cut] + "}").encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, text[cut + len(_MAC_FIELD) : -2])


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(
        "privacy ledger",
        str(path),
        f"{why}; a ledger is never reset, since that would give back spent budget",
        _rebuild_fix(path),
    )


def _trail_tail(trail: Path) -> tuple[int, str] | None:
    """(seq, hash) of the trail's last record, reading only its end; None when it has none."""
    try:
        with open(trail, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            lines = f.read().rstrip(b"\n").rsplit(b"\n", 1)
    except FileNotFoundError:
        return None
    if not lines[-1]:
        return None
    try:
        record = json.loads(lines[-1])
        return int(record["seq"]), str(record["hash"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(
            "privacy audit trail", str(trail), f"its last line does not parse ({err})", "run `hospital-fl audit verify`"
        ) from err


def _spends_in_trail(trail: Path) -> dict[tuple[str, str], dict]:
    """Every (job, mechanism) the verified trail records, with its summed steps and parameters."""
    verification = verify_trail(trail)
    if not verification.ok:
        raise InputError(
            "privacy audit trail",
            str(trail),
            f"it does not verify ({'; '.join(verification.problems[:3])})",
            f"run `hospital-fl audit verify {trail}` and restore the trail from backup",
        )
    spent: dict[tuple[str, str], dict] = {}
    for record in read_trail(trail):
        if record.event != SPEND_EVENT:
            continue
        job = record.actor.removeprefix("job ")
        # format 1 (one mechanism per record) and format 2 (a list of releases per record)
        for part in record.details.get("releases", [record.details]):
            key = (job, part["mechanism"])
            item = spent.setdefault(
                key,
                {
                    "noise_multiplier": float(part["noise_multiplier"]),
                    "sample_rate": float(part["sample_rate"]),
                    "pure_epsilon": part.get("pure_epsilon"),
                    "steps": 0,
                },
            )
            item["steps"] += int(part["steps"])
    return spent


class PrivacyLedger:
    """The ledger file at ``path``; every method re-reads it, so it survives restarts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def trail(self) -> Path:
        return self.path.with_name(AUDIT_FILE)

    @property
    def key_path(self) -> Path:
        return self.path.with_name(KEY_FILE)

    # -- creating ----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, site: str) -> "PrivacyLedger":
        """Start an empty ledger with a new key; refuses to overwrite an existing ledger, and
        refuses where the audit trail beside it already records spend (that would be a reset)."""
        ledger = cls(path)
        if ledger.path.exists():
            raise InputError(
                "privacy ledger",
                str(ledger.path),
                "it already exists and a ledger is never overwritten",
                "keep using it",
            )
        ledger.path.parent.mkdir(parents=True, exist_ok=True)
        with ledger._locked():
            spent = _spends_in_trail(ledger.trail) if ledger.trail.exists() else {}
            if spent:
                steps = sum(s["steps"] for s in spent.values())
                raise InputError(
                    "privacy ledger",
                    str(ledger.path),
                    f"it is missing but the site's audit trail {ledger.trail} records {len(spent)} earlier "
                    f"(job, mechanism) spends ({steps} releases); a fresh ledger would give that budget back",
                    _rebuild_fix(ledger.path),
                )
            key = ledger._make_key()
            record = append_event(ledger.trail, INIT_EVENT, f"site {site}", {"site": site, "ledger": ledger.path.name})
            ledger._write(site, [], (record.seq, record.hash), key)
        return ledger

    def _make_key(self) -> bytes:
        if self.key_path.exists():
            return self._key()
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        return self._key()

    def _key(self) -> bytes:
        try:
            mode = self.key_path.stat().st_mode
            key = self.key_path.read_bytes()
        except FileNotFoundError:
            raise InputError(
                "privacy ledger key",
                str(self.key_path),
                "the key that authenticates the ledger is missing, so the ledger cannot be trusted",
                "restore it from the site's backup, or " + _rebuild_fix(self.path),
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InputError(
                "privacy ledger key",
                f"{self.key_path} mode {stat.S_IMODE(mode):o}",
                "the key must be readable by its owner only: whoever reads it can forge ledger entries",
                f"chmod 600 {self.key_path}",
            )
        if len(key) < 32:
            raise InputError("privacy ledger key", str(self.key_path), "it is shorter than 32 bytes", "restore it")
        return key

    @classmethod
    def rebuild_from_audit(cls, path: str | Path, site: str) -> "PrivacyLedger":
        """Write the ledger again from the verified audit trail (a missing, damaged, rolled-back or
        version-1 ledger). Spend is never lowered: an entry the old ledger still proves (valid
        keyed MAC or version-1 checksum) with more steps than the trail keeps its steps."""
        ledger = cls(path)
        ledger.path.parent.mkdir(parents=True, exist_ok=True)
        with ledger._locked():
            if not ledger.trail.exists():
                raise InputError(
                    "privacy audit trail",
                    str(ledger.trail),
                    "it is missing, so there is nothing to rebuild the ledger from",
                    "restore the trail (and the ledger) from the site's backup",
                )
            spent = _spends_in_trail(ledger.trail)
            old = {(e.job_id, e.mechanism): e for e in ledger._provable_old_entries()}
            now = time.time()
            entries = []
            for (job, mechanism), item in spent.items():
                kind_of(mechanism, f"audit trail {ledger.trail}")
                steps = max(item["steps"], old[(job, mechanism)].steps if (job, mechanism) in old else 0)
                entries.append(
                    LedgerEntry(
                        job, mechanism, item["noise_multiplier"], item["sample_rate"], steps, now, item["pure_epsilon"]
                    )
                )
            entries += [e for k, e in old.items() if k not in spent]  # spend from before the trail existed
            key = ledger._make_key()
            record = append_event(
                ledger.trail,
                REBUILD_EVENT,
                f"site {site}",
                {"site": site, "entries": len(entries), "digest": _digest(site, [_as_dict(e) for e in entries])},
            )
            if ledger.path.exists():
                shutil.copy2(ledger.path, ledger.path.with_name(ledger.path.name + ".before-rebuild"))
            ledger._write(site, entries, (record.seq, record.hash), key)
        return ledger

    def _provable_old_entries(self) -> list[LedgerEntry]:
        """Entries of the current file that its own MAC (or version-1 checksum) still vouches for."""
        try:
            text = self.path.read_text()
            data = json.loads(text)
            site, raw = data["site"], data["entries"]
            if data.get("version") == 1:
                ok = data.get("checksum") == _v1_checksum(site, raw)
            else:
                ok = _authentic(self._key(), text)
            return [LedgerEntry(**e) for e in raw] if ok else []
        except (OSError, ValueError, KeyError, TypeError, InputError):
            return []

    # -- reading -----------------------------------------------------------------------
    def _read(self) -> tuple[str, list[LedgerEntry]]:
        """The ledger's site and entries, verified: MAC, format, and its link to the audit trail."""
        if not self.path.is_file():
            spent = _spends_in_trail(self.trail) if self.trail.exists() else {}
            earlier = (
                f"; the audit trail beside it records {len(spent)} (job, mechanism) spends, so it was deleted"
                if spent
                else ""
            )
            raise InputError(
                "privacy ledger",
                str(self.path),
                f"the file is missing, so this site's spent budget is unknown{earlier}",
                _rebuild_fix(self.path)
                if spent
                else "restore it from backup; for a new site run `hospital-fl privacy init SITE_WORKSPACE --site SITE`",
            )
        try:
            text = self.path.read_text()
            data = json.loads(text)
            version, site, raw = data["version"], data["site"], data["entries"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise _corrupt(self.path, f"it does not parse as a ledger ({type(err).__name__}: {err})") from err
        if version == 1:
            raise InputError(
                "privacy ledger",
                str(self.path),
                "it is a version-1 ledger, whose checksum is not keyed, so an edit cannot be told from a spend",
                "migrate it once: " + _rebuild_fix(self.path),
            )
        if version != LEDGER_VERSION:
            raise _corrupt(self.path, f"its version {version!r} is not {LEDGER_VERSION}")
        if not _authentic(self._key(), text) or "audit" not in data:
            raise _corrupt(self.path, "its keyed checksum (HMAC) does not match its entries (edited or truncated)")
        try:
            entries = [LedgerEntry(**e) for e in raw]
        except TypeError as err:
            raise _corrupt(self.path, f"an entry is malformed ({err})") from err
        for e in entries:
            kind_of(e.mechanism, f"privacy ledger {self.path}: entry {e.job_id}")
        head = data["audit"]
        tail = _trail_tail(self.trail)
        if tail is None or [int(head["seq"]), str(head["hash"])] != list(tail):
            found = "missing or empty" if tail is None else f"at record {tail[0]} ({tail[1][:12]}...)"
            raise _corrupt(
                self.path,
                f"it was last written with audit record {head['seq']} ({str(head['hash'])[:12]}...) but the site's "
                f"audit trail {self.trail} is {found}: the ledger was rolled back to an older copy, or the trail "
                "was cut or replaced",
            )
        return site, entries

    @property
    def site(self) -> str:
        with self._locked(shared=True):
            return self._read()[0]

    def entries(self) -> list[LedgerEntry]:
        with self._locked(shared=True):
            return self._read()[1]

    def releases(self, job_id: str | None = None, mechanism: str | None = None) -> list[Release]:
        """The Gaussian releases of the selected entries (Laplace entries have none)."""
        return [e.release for e in self._select(self.entries(), job_id, mechanism) if e.kind == "gaussian"]

    @staticmethod
    def _select(entries: list[LedgerEntry], job_id: str | None, mechanism: str | None) -> list[LedgerEntry]:
        return [
            e
            for e in entries
            if (job_id is None or e.job_id == job_id) and (mechanism is None or e.mechanism == mechanism)
        ]

    def epsilon(self, delta: float, accountant: str = "rdp", job_id: str | None = None, mechanism=None) -> float:
        """Epsilon(delta) of the selected entries composed (all of them by default)."""
        return entries_epsilon(self._select(self.entries(), job_id, mechanism), delta, accountant)

    def summary(self, delta: float, accountant: str = "rdp") -> dict:
        """Per-job (per mechanism) and lifetime epsilon at ``delta``: what a privacy officer reads."""
        with self._locked(shared=True):
            site, entries = self._read()
        jobs: dict[str, dict] = {}
        for e in entries:
            job = jobs.setdefault(e.job_id, {"job_id": e.job_id, "mechanisms": {}})
            item = {"kind": e.kind, "steps": e.steps, "epsilon": entries_epsilon([e], delta, accountant)}
            if e.kind == "laplace":
                item["pure_epsilon"] = e.pure_epsilon
            else:
                item.update(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate)
            job["mechanisms"][e.mechanism] = item
        for job in jobs.values():
            job["epsilon"] = entries_epsilon(self._select(entries, job["job_id"], None), delta, accountant)
        return {
            "site": site,
            "delta": delta,
            "accountant": accountant,
            "jobs": list(jobs.values()),
            "lifetime_epsilon": entries_epsilon(entries, delta, accountant),
        }

    def audit_problems(self) -> list[str]:
        """Every difference between the ledger's entries and the spends its audit trail records
        (empty when they agree); refuses a ledger or trail that does not verify."""
        with self._locked(shared=True):
            _, entries = self._read()
            spent = _spends_in_trail(self.trail)
        problems = []
        for e in entries:
            item = spent.pop((e.job_id, e.mechanism), None)
            if item is None:
                problems.append(f"{e.job_id}/{e.mechanism}: in the ledger ({e.steps} releases) but not in the trail")
            elif item["steps"] != e.steps:
                problems.append(
                    f"{e.job_id}/{e.mechanism}: the ledger holds {e.steps} releases, the audit trail {item['steps']}"
                )
            elif (item["noise_multiplier"], item["sample_rate"], item["pure_epsilon"]) != (
                e.noise_multiplier,
                e.sample_rate,
                e.pure_epsilon,
            ):
                problems.append(f"{e.job_id}/{e.mechanism}: its noise, rate or epsilon differ from the audit trail")
        problems += [
            f"{job}/{mechanism}: in the audit trail ({item['steps']} releases) but not in the ledger"
            for (job, mechanism), item in spent.items()
        ]
        return problems

    def check_against_audit(self) -> None:
        """Refuse (InputError) a ledger that disagrees with its audit trail, naming each difference."""
        problems = self.audit_problems()
        if problems:
            raise _corrupt(self.path, "it disagrees with the site's audit trail: " + "; ".join(problems))

    # -- writing -----------------------------------------------------------------------
    def spend(
        self,
        job_id: str,
        releases: list[Spend],
        check: Callable[[list[LedgerEntry], list[LedgerEntry]], object] | None = None,
    ) -> list[LedgerEntry]:
        """Check and record one release as one step, under the ledger's exclusive lock.

        Args:
            job_id: the job the release belongs to.
            releases: each mechanism's part of the release.
            check: called with (entries before, entries after) as read inside the lock, every
                other job's latest spend included; it raises InputError to refuse, and then
                nothing is recorded.

        Returns:
            The ledger's entries after the release. Refused releases raise InputError.
        """
        releases = [r.checked() for r in releases if r.steps > 0] if releases else []
        with self._locked():
            site, before = self._read()
            after = _merged(before, job_id, releases, time.time())
            if check is not None:
                check(before, after)
            if releases:
                key = self._key()
                record = append_event(
                    self.trail,
                    SPEND_EVENT,
                    f"job {job_id}",
                    {"site": site, "releases": [_as_dict(r) for r in releases]},
                )
                self._write(site, after, (record.seq, record.hash), key)
        return after

    def record(self, job_id: str, mechanism: str, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record ``steps`` Gaussian releases with no cap (callers with a policy use ``spend``)."""
        self.spend(job_id, [Spend(mechanism, float(noise_multiplier), float(sample_rate), int(steps))])

    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, site: str, entries: list[LedgerEntry], head: tuple[int, str], key: bytes) -> None:
        """Atomic rewrite (temporary file, rename): readers see the old ledger or the new, never half.

        Not fsynced: the audit record of the spend was fsynced just before, so a ledger that
        a power cut leaves behind (or empty) is refused at the next read and rebuilt from the
        trail; the spend is never lost, and one fsync per release keeps the gate fast.
        """
        body = {
            "version": LEDGER_VERSION,
            "site": site,
            "entries": [_as_dict(e) for e in entries],
            "audit": {"seq": head[0], "hash": head[1]},
        }
        text = _encode(key, body)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)


def _merged(entries: list[LedgerEntry], job_id: str, releases: list[Spend], now: float) -> list[LedgerEntry]:
    """``entries`` with ``releases`` added to the job's entries; a change of a mechanism's
    parameters within one job is refused (it would make the entry's accounting wrong)."""
    out = list(entries)
    for r in releases:
        for i, e in enumerate(out):
            if e.job_id == job_id and e.mechanism == r.mechanism:
                if (e.noise_multiplier, e.sample_rate, e.pure_epsilon) != (
                    r.noise_multiplier,
                    r.sample_rate,
                    r.pure_epsilon,
                ):
                    raise InputError(
                        "privacy ledger entry",
                        f"{job_id}/{r.mechanism}",
                        f"its noise {e.noise_multiplier}, rate {e.sample_rate} and epsilon {e.pure_epsilon} are fixed "
                        f"for the job, got {r.noise_multiplier}, {r.sample_rate} and {r.pure_epsilon}",
                        "record a new job id for new settings",
                    )
                out[i] = replace(e, steps=e.steps + r.steps, updated_at=now)
                break
        else:
            out.append(
                LedgerEntry(job_id, r.mechanism, r.noise_multiplier, r.sample_rate, r.steps, now, r.pure_epsilon)
            )
    return out

