"""The site's consent registry: which patients' images may train a model today.

A registry is a CSV with columns patient_id, status, date (ISO 8601). It is a history: a
patient may have several rows and the one with the latest date is in force (same date: the
later row). Statuses are ``granted`` and ``revoked`` (``withdrawn`` reads as revoked); any
other status is an error for the whole file, since guessing could train on a patient who
said no. A patient is usable when the status in force is ``granted`` and, with a rolling
window, that consent is not older than the window. A patient absent from the registry is
not usable ("missing"): consent is opt-in.

Patient ids are compared as salted pseudonyms (hospital_fl.data.ingest.phi.pseudonym), so
the check also works on manifests, which never hold a raw patient id.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from hospital_fl.data.ingest.labels import read_csv_rows
from hospital_fl.errors import InputError

__all__ = ["ConsentPolicy", "ConsentRecord", "ConsentRegistry", "USABLE", "read_consent"]

USABLE = "granted"
_STATUSES = {"granted": "granted", "revoked": "revoked", "withdrawn": "revoked"}


@dataclass(frozen=True)
class ConsentPolicy:
    """``window_days``: consent older than this many days counts as expired (None: no expiry)."""

    window_days: int | None = None

    def __post_init__(self):
        if self.window_days is not None and (not isinstance(self.window_days, int) or self.window_days < 1):
            raise InputError(
                "consent window_days",
                self.window_days,
                "the rolling consent window must be a whole number of days >= 1",
                "pass e.g. --consent-window-days 365, or leave it out for consent without expiry",
            )


@dataclass(frozen=True)
class ConsentRecord:
    status: str  # "granted" | "revoked"
    date: dt.date


@dataclass(frozen=True)
class ConsentRegistry:
    """The status in force per patient id (raw ids; they never leave the site)."""

    records: dict[str, ConsentRecord]
    source: str

    def status(self, patient_id: str, policy: ConsentPolicy, today: dt.date) -> str:
        """ "granted", "revoked", "expired" or "missing" for one raw patient id."""
        record = self.records.get(patient_id)
        if record is None:
            return "missing"
        if record.status != USABLE:
            return record.status
        if policy.window_days is not None and (today - record.date).days > policy.window_days:
            return "expired"
        return USABLE

    def statuses_by_pseudonym(
        self, pseudonymize: Callable[[str], str], policy: ConsentPolicy, today: dt.date
    ) -> dict[str, str]:
        """{patient pseudonym: status} for every patient in the registry."""
        return {pseudonymize(pid): self.status(pid, policy, today) for pid in self.records}

    def unusable(
        self, pseudonyms: Iterable[str], pseudonymize: Callable[[str], str], policy: ConsentPolicy, today: dt.date
    ) -> dict[str, str]:
        """{pseudonym: status} for the given patients whose images may not train today."""
        known = self.statuses_by_pseudonym(pseudonymize, policy, today)
        return {p: known.get(p, "missing") for p in set(pseudonyms) if known.get(p, "missing") != USABLE}


def _parse_date(text: str, where: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise InputError(where, text, "consent dates must be ISO 8601 (YYYY-MM-DD)", "write e.g. 2026-01-31") from None


def read_consent(path: str | Path, today: dt.date | None = None) -> ConsentRegistry:
    """Read a consent registry CSV (patient_id, status, date).

    Raises:
        InputError: unreadable file, missing columns, unknown status, bad or future date,
            naming the file, line and value.
    """
    path = Path(path)
    today = today or dt.date.today()
    if not path.is_file():
        raise InputError("consent", str(path), "the consent registry must exist", "pass --consent PATH/TO/consent.csv")
    header, rows = read_csv_rows(path, "consent", "export the registry as CSV")
    if not {"patient_id", "status", "date"} <= set(header):
        raise InputError(
            "consent",
            f"{path} (columns {header})",
            "the registry needs columns patient_id, status, date",
            "rename the columns",
        )
    latest: dict[str, ConsentRecord] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path.name} line {line}"
        if not row["patient_id"]:
            raise InputError(f"{where} patient_id", "", "every row must name a patient", "fill in or remove the row")
        status = _STATUSES.get(row["status"].lower())
        if status is None:
            raise InputError(
                f"{where} status",
                row["status"],
                f"consent status must be one of {sorted(_STATUSES)}",
                "map the registry's statuses to granted or revoked before ingest",
            )
        date = _parse_date(row["date"], f"{where} date")
        if date > today:
            raise InputError(
                f"{where} date",
                row["date"],
                f"a consent decision cannot be dated after today ({today})",
                "fix the date",
            )
        previous = latest.get(row["patient_id"])
        if previous is None or date >= previous.date:
            latest[row["patient_id"]] = ConsentRecord(status, date)
    return ConsentRegistry(latest, str(path))
