"""A site's privacy ledger: every DP release made with its data, across jobs and restarts.

The ledger is a JSON file in the site's workspace holding one entry per (job, mechanism)
with the Opacus release parameters (noise multiplier, sample rate, steps). Epsilon per job,
per mechanism and in total is the composition of those releases by the Opacus accountant,
so it is recomputed, never summed by hand, and equals Opacus for the same steps.

The file carries a checksum of its entries. A missing or corrupt ledger is refused, never
reset: a reset would silently hand the site its spent budget back. Writes are atomic
(write, fsync, rename), keep the previous version as ``.bak`` and hold an exclusive lock,
so concurrent jobs at one site cannot lose each other's spend.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hospital_fl.audit import AUDIT_FILE, append_event
from hospital_fl.errors import InputError
from hospital_fl.privacy.accounting import Release, epsilon_of

__all__ = ["LedgerEntry", "PrivacyLedger", "LEDGER_VERSION"]

LEDGER_VERSION = 1


@dataclass(frozen=True)
class LedgerEntry:
    job_id: str
    mechanism: str  # "sample" | "client-local" | "metrics"
    noise_multiplier: float
    sample_rate: float
    steps: int
    updated_at: float

    @property
    def release(self) -> Release:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _checksum(site: str, entries: list[dict]) -> str:
    canonical = json.dumps({"site": site, "entries": entries}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(
        "privacy ledger",
        str(path),
        f"{why}; a ledger is never reset, since that would give back spent budget",
        f"restore it from {path.name}.bak or the site's backup; ask the privacy officer before any manual change",
    )


class PrivacyLedger:
    """The ledger file at ``path``; every method re-reads it, so it survives restarts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, site: str) -> "PrivacyLedger":
        """Start an empty ledger; refuses to overwrite an existing one."""
        path = Path(path)
        if path.exists():
            raise InputError(
                "privacy ledger", str(path), "it already exists and a ledger is never overwritten", "keep using it"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        ledger = cls(path)
        with ledger._locked():
            ledger._write(site, [])
        return ledger

    # -- reading -----------------------------------------------------------------------
    def _read(self) -> tuple[str, list[LedgerEntry]]:
        if not self.path.is_file():
            raise InputError(
                "privacy ledger",
                str(self.path),
                "the file is missing, so this site's spent budget is unknown",
                "restore it from backup; for a new site run `hospital-fl privacy init SITE_WORKSPACE`",
            )
        try:
            data = json.loads(self.path.read_text())
            site, raw, version = data["site"], data["entries"], data["version"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise _corrupt(self.path, f"it does not parse as a ledger ({type(err).__name__}: {err})") from err
        if version != LEDGER_VERSION:
            raise _corrupt(self.path, f"its version {version!r} is not {LEDGER_VERSION}")
        if data.get("checksum") != _checksum(site, raw):
            raise _corrupt(self.path, "its checksum does not match its entries (edited or truncated)")
        try:
            return site, [LedgerEntry(**e) for e in raw]
        except TypeError as err:
            raise _corrupt(self.path, f"an entry is malformed ({err})") from err

    @property
    def site(self) -> str:
        return self._read()[0]

    def entries(self) -> list[LedgerEntry]:
        return self._read()[1]

    def releases(self, job_id: str | None = None, mechanism: str | None = None) -> list[Release]:
        return [
            e.release
            for e in self.entries()
            if (job_id is None or e.job_id == job_id) and (mechanism is None or e.mechanism == mechanism)
        ]

    def epsilon(self, delta: float, accountant: str = "rdp", job_id: str | None = None, mechanism=None) -> float:
        """Epsilon(delta) of the selected entries composed (all of them by default)."""
        return epsilon_of(self.releases(job_id, mechanism), delta, accountant)

    def summary(self, delta: float, accountant: str = "rdp") -> dict:
        """Per-job (per mechanism) and lifetime epsilon at ``delta``: what a privacy officer reads."""
        entries = self.entries()
        jobs: dict[str, dict] = {}
        for e in entries:
            job = jobs.setdefault(e.job_id, {"job_id": e.job_id, "mechanisms": {}})
            job["mechanisms"][e.mechanism] = {
                "noise_multiplier": e.noise_multiplier,
                "sample_rate": e.sample_rate,
                "steps": e.steps,
                "epsilon": epsilon_of([e.release], delta, accountant),
            }
        for job in jobs.values():
            job["epsilon"] = self.epsilon(delta, accountant, job_id=job["job_id"])
        return {
            "site": self.site,
            "delta": delta,
            "accountant": accountant,
            "jobs": list(jobs.values()),
            "lifetime_epsilon": epsilon_of([e.release for e in entries], delta, accountant),
        }

    # -- writing -----------------------------------------------------------------------
    def record(self, job_id: str, mechanism: str, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add ``steps`` releases of (noise, rate) to the job's entry for ``mechanism``.

        Called after every round, so a job stopped midway has spent exactly what it ran.
        A change of noise or rate within one job's mechanism is refused (it would make the
        entry's accounting wrong).
        """
        if steps <= 0:
            return
        with self._locked():
            site, entries = self._read()
            now = time.time()
            for i, e in enumerate(entries):
                if e.job_id == job_id and e.mechanism == mechanism:
                    if (e.noise_multiplier, e.sample_rate) != (noise_multiplier, sample_rate):
                        raise InputError(
                            "privacy ledger entry",
                            f"{job_id}/{mechanism}",
                            f"its noise {e.noise_multiplier} and rate {e.sample_rate} are fixed for the job, "
                            f"got {noise_multiplier} and {sample_rate}",
                            "record a new job id for new settings",
                        )
                    entries[i] = replace(e, steps=e.steps + int(steps), updated_at=now)
                    break
            else:
                entries.append(LedgerEntry(job_id, mechanism, float(noise_multiplier), float(sample_rate), steps, now))
            self._write(site, entries)
            # the site's own tamper-evident record of every spend, beside its ledger
            append_event(
                self.path.with_name(AUDIT_FILE),
                "privacy.spend",
                f"job {job_id}",
                {
                    "site": site,
                    "mechanism": mechanism,
                    "noise_multiplier": float(noise_multiplier),
                    "sample_rate": float(sample_rate),
                    "steps": int(steps),
                    "ledger_checksum": _checksum(site, [asdict(e) for e in entries]),
                },
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, site: str, entries: list[LedgerEntry]) -> None:
        raw = [asdict(e) for e in entries]
        body = json.dumps(
            {"version": LEDGER_VERSION, "site": site, "entries": raw, "checksum": _checksum(site, raw)}, indent=1
        )
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        if self.path.exists():  # copy, not move: the ledger file never goes missing
            shutil.copy2(self.path, self.path.with_name(self.path.name + ".bak"))
        os.replace(tmp, self.path)
