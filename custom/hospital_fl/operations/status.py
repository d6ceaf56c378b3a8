"""What `hospital-fl status` reports about a consortium, built from plain data.

The FLARE adapter (hospital_fl.flare.runners.status) asks the server through the admin API
and hands its raw answers here: each connected hospital's last heartbeat, the job's meta,
the job's round history (the aggregator's round_history.json), the error logs the sites
streamed (FLARE's ERRORLOG_<site> job components) and the server's job log. These functions
turn them into a ``ConsortiumStatus``: who is connected, which job runs and at which round,
each site's training seconds and metrics per round, rejected updates with their reasons,
the privacy figures the sites released, days until each certificate in view expires, and
why each site failed a failed job (refusal, exception, timeout).

Only what the server already holds is shown: a DP site's replies carry its mechanism and
the job's epsilon bound, never its exact spend or lifetime budget, which stay at the site.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509

from hospital_fl.provisioning.certificates import as_utc, common_name, utc_text

__all__ = [
    "CentralPrivacy",
    "CertificateExpiry",
    "ConsortiumStatus",
    "JobProgress",
    "PrivacyRelease",
    "SiteFailure",
    "SiteLink",
    "SiteRound",
    "central_privacy",
    "certificate_expiry",
    "error_log_reason",
    "failure_reasons",
    "job_progress",
    "kit_certificates",
    "log_message",
    "privacy_releases",
    "round_rows",
    "site_links",
    "total_rounds_of",
]

FailureKind = Literal["refusal", "exception", "timeout"]


@dataclass(frozen=True)
class SiteLink:
    """A hospital's connection to the server.

    Attributes:
        site: the site's name.
        connected: whether the server counts it as connected now.
        last_heartbeat: the server's time of its last heartbeat ("2026-01-31 12:00:00 UTC"), or None.
        heartbeat_age_s: seconds since then, or None.
        job_state: FLARE's client job state ("started", "no_jobs"), or None when not connected.
    """

    site: str
    connected: bool
    last_heartbeat: str | None = None
    heartbeat_age_s: float | None = None
    job_state: str | None = None


@dataclass(frozen=True)
class JobProgress:
    """A job and how far it got.

    Attributes:
        status: FLARE's job status (RUNNING, FINISHED:COMPLETED, FINISHED:EXECUTION_EXCEPTION, ...).
        rounds_done: rounds aggregated so far (the round in progress is this number, from 0).
        total_rounds: the rounds the job's controller runs (None when not known).
    """

    job_id: str
    name: str
    status: str
    submitted: str | None
    rounds_done: int
    total_rounds: int | None

    @property
    def running(self) -> bool:
        return self.status == "RUNNING"


@dataclass(frozen=True)
class SiteRound:
    """One site in one round of the round history: what the server recorded for its update."""

    round: int
    site: str
    train_seconds: float | None
    accepted: bool
    reason: str | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PrivacyRelease:
    """What a DP site's replies say about its privacy: the mechanism and the job's bound.

    Attributes:
        epsilon_bound: the job's total epsilon at ``delta`` the site's privacy gate approved.
        rounds_released: rounds whose update the site released under it.
        total_rounds: the job's rounds (the bound covers all of them), None when not known.
    """

    site: str
    mechanism: str
    epsilon_bound: float | None
    delta: float | None
    accountant: str | None
    rounds_released: int
    total_rounds: int | None


@dataclass(frozen=True)
class CentralPrivacy:
    """Central client-level DP run by the server: its own spend after the last round."""

    epsilon_spent: float
    delta: float
    noise_multiplier: float | None
    rounds: int


@dataclass(frozen=True)
class CertificateExpiry:
    """A certificate in view and the days until it expires (negative: expired)."""

    holder: str
    file: str
    not_after: str
    days_left: int

    @property
    def expired(self) -> bool:
        return self.days_left < 0


@dataclass(frozen=True)
class SiteFailure:
    """Why a site failed a job.

    Attributes:
        kind: "refusal" (the site declined the job: privacy gate, data, policy), "exception"
            (something raised), "timeout" (the site stopped answering).
        reason: the sentence the site or the server logged.
        source: where it was read (ERRORLOG_site-1, the server's job log, the job's deployment).
    """

    site: str
    kind: FailureKind
    reason: str
    source: str


@dataclass(frozen=True)
class ConsortiumStatus:
    """Everything `hospital-fl status` shows; ``to_dict`` is its --json form."""

    checked_at: str
    server: str
    server_state: str
    sites: tuple[SiteLink, ...]
    job: JobProgress | None
    rounds: tuple[SiteRound, ...] = ()
    privacy: tuple[PrivacyRelease, ...] = ()
    central_privacy: CentralPrivacy | None = None
    certificates: tuple[CertificateExpiry, ...] = ()
    failures: tuple[SiteFailure, ...] = ()
    recent_jobs: tuple[dict, ...] = ()

    @property
    def rejections(self) -> tuple[SiteRound, ...]:
        return tuple(r for r in self.rounds if not r.accepted)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["rejections"] = [dataclasses.asdict(r) for r in self.rejections]
        return out


# ---------------------------------------------------------------- connections and progress


def site_links(
    heartbeats: Mapping[str, float], job_states: Mapping[str, str], expected: Iterable[str], now: float
) -> tuple[SiteLink, ...]:
    """Each site connected now (``heartbeats``: name -> epoch seconds of its last heartbeat)
    or expected (a site of the job or a kit in view) but not connected."""
    links = []
    for site in sorted(set(heartbeats) | set(expected)):
        seen = heartbeats.get(site)
        if seen is None:
            links.append(SiteLink(site, False))
            continue
        when = dt.datetime.fromtimestamp(seen, dt.timezone.utc)
        links.append(SiteLink(site, True, utc_text(when), round(max(0.0, now - seen), 1), job_states.get(site)))
    return tuple(links)


def total_rounds_of(server_config: Mapping) -> int | None:
    """The rounds a job's server config runs (its first workflow's num_rounds), None if it names none."""
    for workflow in server_config.get("workflows", []):
        rounds = (workflow.get("args") or {}).get("num_rounds")
        if isinstance(rounds, int):
            return rounds
    return None


def job_progress(meta: Mapping, history: list[dict], total_rounds: int | None) -> JobProgress:
    """A job's meta (FLARE's get_job_meta) and round history as progress."""
    return JobProgress(
        job_id=str(meta.get("job_id")),
        name=str(meta.get("name") or meta.get("job_folder_name") or ""),
        status=str(meta.get("status")),
        submitted=meta.get("submit_time_iso"),
        rounds_done=len(history),
        total_rounds=total_rounds,
    )


# ---------------------------------------------------------------- round history


def round_rows(history: list[dict]) -> tuple[SiteRound, ...]:
    """One row per site per round of a round_history.json."""
    rows = []
    for entry in history:
        for s in entry.get("sites", []):
            metrics = {k: float(v) for k, v in (s.get("metrics") or {}).items() if isinstance(v, (int, float))}
            seconds = s.get("train_seconds")
            rows.append(
                SiteRound(
                    round=int(entry.get("round", len(rows))),
                    site=str(s.get("site")),
                    train_seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
                    accepted=bool(s.get("accepted")),
                    reason=s.get("reason") or s.get("control_reason"),
                    metrics=metrics,
                )
            )
    return tuple(sorted(rows, key=lambda r: (r.round, r.site)))


def privacy_releases(history: list[dict], total_rounds: int | None) -> tuple[PrivacyRelease, ...]:
    """Each DP site's released privacy figures: its mechanism and the job's bound, and in
    how many rounds it released an update under them."""
    latest: dict[str, dict] = {}
    released: dict[str, int] = {}
    for entry in history:
        for s in entry.get("sites", []):
            privacy = s.get("privacy")
            if isinstance(privacy, Mapping):
                latest[s["site"]] = dict(privacy)
                released[s["site"]] = released.get(s["site"], 0) + 1
    return tuple(
        PrivacyRelease(
            site=site,
            mechanism=str(p.get("mechanism")),
            epsilon_bound=_number(p.get("epsilon_bound")),
            delta=_number(p.get("delta")),
            accountant=p.get("accountant"),
            rounds_released=released[site],
            total_rounds=total_rounds,
        )
        for site, p in sorted(latest.items())
    )


def central_privacy(history: list[dict]) -> CentralPrivacy | None:
    """The server's own central DP spend after the last round that ran it (None: no central DP)."""
    rounds = [e["central_dp"] for e in history if isinstance(e.get("central_dp"), Mapping)]
    if not rounds:
        return None
    last = rounds[-1]
    return CentralPrivacy(
        epsilon_spent=float(last.get("epsilon", 0.0)),
        delta=float(last.get("delta", 0.0)),
        noise_multiplier=_number(last.get("noise_multiplier")),
        rounds=len(rounds),
    )


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


# ---------------------------------------------------------------- certificates


def certificate_expiry(cert: x509.Certificate, file: str, now: dt.datetime | None = None) -> CertificateExpiry:
    """Days until ``cert`` expires at ``now`` (whole days, rounded down; negative once expired)."""
    not_after = cert.not_valid_after_utc
    left = not_after - as_utc(now)
    holder = common_name(cert.subject) or cert.subject.rfc4514_string()
    return CertificateExpiry(holder, file, utc_text(not_after), left.days)


def kit_certificates(admin_kit: str | Path, now: dt.datetime | None = None) -> tuple[CertificateExpiry, ...]:
    """The certificates an admin kit lets one see: its own, its root CA, and those of the
    server and hospital kits beside it (a POC workspace or a `hospital-fl provision` kits/
    folder keeps every participant's kit in one folder). Unreadable files are skipped."""
    admin_kit = Path(admin_kit)
    files = [admin_kit / "startup" / "client.crt", admin_kit / "startup" / "rootCA.pem"]
    for kit in sorted(p for p in admin_kit.parent.iterdir() if p.is_dir() and p != admin_kit):
        if (kit / "startup" / "fed_server.json").is_file():
            files.append(kit / "startup" / "server.crt")
        elif (kit / "startup" / "fed_client.json").is_file():
            files.append(kit / "startup" / "client.crt")
    found = []
    for path in files:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue
        found.append(certificate_expiry(cert, str(path.relative_to(admin_kit.parent)), now))
    return tuple(found)


# ---------------------------------------------------------------- why a job failed

# FLARE's log line: "<date> <time> - <logger> - <LEVEL> - [<context>] - <message>"
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \S+ - \S+ - [A-Z]+ - (?:\[[^\]]*\] - )?(?P<message>.*)$")
_REFUSAL = re.compile(r"\brefus(?:e|ed|es|ing)\b", re.IGNORECASE)
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\b(?::.*)?$")
_DEAD = re.compile(r"client \[(?P<sites>[^\]]*)\] is dead")
_DISCONNECTED = re.compile(r"Client (?P<site>\S+) is deemed disconnected")
_REPORTED = re.compile(r"due to reported failure from (?P<site>[^\s:]+): (?P<reason>.*)")
_BAD_RESULT = re.compile(r"Result from (?P<site>\S+) is bad, error code: (?P<code>\w+)")
_ROUND = re.compile(r"Round (?P<round>\d+) started\.")
_SENT = re.compile(r"Sending task (?P<task>\S+) to \[(?P<sites>[^\]]*)\]")
_RESULT = re.compile(r"got result from client (?P<site>\S+) for task: name=(?P<task>[^,\s]+)")
_TIMED_OUT = re.compile(r"task (?P<task>\S+) exit with status TaskCompletionStatus\.TIMEOUT")


def log_message(line: str) -> str:
    """The message part of a FLARE log line (the line itself when it is not one)."""
    match = _LOG_LINE.match(line.strip())
    return match.group("message").strip() if match else line.strip()


def error_log_reason(text: str) -> tuple[FailureKind, str] | None:
    """A site's streamed error log as (kind, reason): its first refusal, else the last
    exception raised, else its first error message; None when it holds none."""
    lines = [line for line in text.splitlines() if line.strip()]
    messages = [log_message(line) for line in lines if _LOG_LINE.match(line.strip())]
    refusals = [m for m in messages if _REFUSAL.search(m)]
    if refusals:
        return "refusal", refusals[0]
    raised = [line.strip() for line in lines if _EXCEPTION.match(line.strip())]
    if raised:
        return "exception", raised[-1]
    if messages:
        return "exception", messages[0]
    return None


def failure_reasons(
    error_logs: Mapping[str, str], server_log: str = "", deploy_detail: Iterable[str] = ()
) -> tuple[SiteFailure, ...]:
    """Each site's reason for a failed job, one per site, most specific first: what the site
    itself logged (its ERRORLOG), a failed deployment, the server's verdict (no heartbeat:
    timeout; a result the site reported as an error: exception).

    Args:
        error_logs: site -> the text of its ERRORLOG_<site> job component.
        server_log: the server's log of the job.
        deploy_detail: the job meta's job_deploy_detail lines ("site-1: OK").
    """
    found: dict[str, SiteFailure] = {}

    def add(site: str, kind: FailureKind, reason: str, source: str) -> None:
        found.setdefault(site, SiteFailure(site, kind, reason, source))

    for site, text in sorted(error_logs.items()):
        reason = error_log_reason(text)
        if reason is not None:
            add(site, reason[0], reason[1], f"ERRORLOG_{site}")
    for line in deploy_detail:  # FLARE's JobRunner writes "<site>: OK", "<site>: <why not>" and summary lines
        site, _, outcome = (part.strip() for part in str(line).partition(":"))
        if not outcome or outcome == "OK" or site in ("server", "invalid_clients") or " " in site:
            continue
        kind = "timeout" if "timeout" in outcome else "refusal" if _REFUSAL.search(outcome) else "exception"
        add(site, kind, f"deployment: {outcome}", "job deployment")
    rnd, waiting = None, {}  # task -> sites sent it that have not answered yet
    for raw in server_log.splitlines():
        message = log_message(raw)
        if (m := _ROUND.search(message)) is not None:
            rnd = int(m["round"])
        elif (m := _SENT.search(message)) is not None:
            waiting[m["task"]] = set(re.findall(r"[\w@.-]+", m["sites"]))
        elif (m := _RESULT.search(message)) is not None:
            waiting.get(m["task"], set()).discard(m["site"])
        elif (m := _TIMED_OUT.search(message)) is not None:
            where = f" in round {rnd}" if rnd is not None else ""
            for site in sorted(waiting.pop(m["task"], set())):
                add(site, "timeout", f"no {m['task']} result{where} before the task's timeout", "server job log")
        elif (m := _DISCONNECTED.search(message)) is not None:
            add(m["site"], "timeout", f"no heartbeat: {message}", "server job log")
        elif (m := _DEAD.search(message)) is not None:
            for site in re.findall(r"[\w@.-]+", m["sites"]):
                add(site, "timeout", f"no heartbeat: {message}", "server job log")
        elif (m := _REPORTED.search(message)) is not None:
            add(m["site"], "exception", f"the site reported a failure: {m['reason']}", "server job log")
        elif (m := _BAD_RESULT.search(message)) is not None:
            add(m["site"], "exception", f"its result was an error ({m['code']})", "server job log")
    return tuple(found[s] for s in sorted(found))
