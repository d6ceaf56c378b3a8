"""Ask a running FLARE system how its consortium is doing, as an admin would: the adapter
under `hospital-fl status`.

Everything comes through FLARE's admin API with an admin's startup kit (mutual TLS with the
kit's certificate): connected hospitals and their last heartbeats (get_system_info), the
jobs and their meta, a running job's round history and controller config (read from the
server's job folder with the admin `cat` command), a finished job's result
(download_job_result), the error logs sites streamed (ERRORLOG_<site> job components) and
the server's job log. One TLS handshake with the kit's certificate reads the server's
certificate for its expiry. Nothing is read from the machines' consoles or containers.
The plain data goes to hospital_fl.operations.status, which builds the report.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from nvflare.fuel.flare_api.api_spec import AuthenticationError, JobNotFound
from nvflare.fuel.flare_api.flare_api import Session, new_secure_session

from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import HISTORY_FILE
from hospital_fl.operations.status import (
    ConsortiumStatus,
    central_privacy,
    certificate_expiry,
    failure_reasons,
    job_progress,
    kit_certificates,
    privacy_releases,
    round_rows,
    site_links,
    total_rounds_of,
)
from hospital_fl.provisioning.certificates import as_utc, common_name, utc_text

__all__ = ["AdminKit", "ServerUnreachable", "collect_status", "read_admin_kit"]

log = logging.getLogger(__name__)

_FIX_KIT = "pass an admin's startup kit folder, e.g. poc/example_project/prod_00/admin@nvidia.com or a kits/<admin> folder of `hospital-fl provision`"
_SERVER_CONFIG = "app_server/config/config_fed_server.json"
_RECENT_JOBS = 5


class ServerUnreachable(RuntimeError):
    """The FLARE server did not answer, refused the admin kit's login, or failed a query."""


@dataclass(frozen=True)
class AdminKit:
    """An admin's startup kit: who logs in (the certificate's name) and where the server is."""

    path: Path
    username: str
    host: str
    port: int
    certificate: x509.Certificate

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"


def read_admin_kit(path: str | Path, now: dt.datetime | None = None) -> AdminKit:
    """Read and check an admin kit before anything connects.

    Raises:
        InputError: not an admin kit, or its certificate has expired or is not valid yet.
    """
    kit = Path(path).expanduser().resolve()
    config_file, cert_file = kit / "startup" / "fed_admin.json", kit / "startup" / "client.crt"
    try:
        admin = json.loads(config_file.read_text())["admin"]
        host, port = str(admin["host"]), int(admin["port"])
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            "--admin-kit",
            str(path),
            f"it must be an admin's startup kit holding startup/fed_admin.json and startup/client.crt ({err})",
            _FIX_KIT,
        ) from None
    now = as_utc(now)
    if now > cert.not_valid_after_utc or now < cert.not_valid_before_utc:
        expired = now > cert.not_valid_after_utc
        when = utc_text(cert.not_valid_after_utc if expired else cert.not_valid_before_utc)
        raise InputError(
            "--admin-kit",
            str(path),
            f"its certificate startup/client.crt ({common_name(cert.subject)}) "
            + (f"expired on {when}" if expired else f"is not valid before {when}")
            + ", so the server would refuse the login",
            "ask the project admin for a new admin kit (`hospital-fl provision` issues kits with fresh "
            "certificates) and pass that folder with --admin-kit",
        )
    return AdminKit(kit, common_name(cert.subject), host, port, cert)


def collect_status(
    admin_kit: str | Path, timeout: float = 10.0, job_id: str | None = None, now: dt.datetime | None = None
) -> ConsortiumStatus:
    """The consortium's status as the server sees it now.

    Args:
        admin_kit: an admin's startup kit folder.
        timeout: seconds to wait for the server to answer the login.
        job_id: report this job (with each site's failure reason); default: the running job,
            else the latest one.
        now: the time certificates are checked at (default: now).

    Raises:
        InputError: a bad admin kit or timeout, an expired kit certificate, an unknown job ID.
        ServerUnreachable: the server did not answer within ``timeout`` or refused the login.
    """
    if not timeout > 0:
        raise InputError("--timeout", timeout, "it must be a number of seconds > 0", "use e.g. 10")
    kit = read_admin_kit(admin_kit, now)
    with _session(kit, timeout) as session:
        info = session.get_system_info()
        heartbeats = {c.name: float(c.last_connect_time) for c in info.client_info}
        job_states = {s["client_name"]: s.get("status") for s in session.get_client_job_status() or []}
        jobs = sorted(session.list_jobs(), key=lambda j: str(j.get("submit_time")), reverse=True)
        meta = _job_meta(session, jobs, job_id)
        history, total_rounds, failures = [], None, ()
        if meta is not None:
            history, total_rounds = _job_history(session, meta)
            if job_id is not None or _failed(meta["status"]):
                failures = _failures(session, kit, meta)
        server_cert = _server_certificate(kit, timeout)
    certificates = kit_certificates(kit.path, now)
    if server_cert is not None:
        certificates += (certificate_expiry(server_cert, f"TLS handshake with {kit.server}", now),)
    expected = set(job_states) | {r.site for r in round_rows(history)}
    if meta is not None:
        expected |= {d.split(":")[0].strip() for d in meta.get("job_deploy_detail", [])} - {"server"}
    return ConsortiumStatus(
        checked_at=utc_text(as_utc(now)),
        server=kit.server,
        server_state=str(info.server_info.status),
        sites=site_links(heartbeats, job_states, expected, time.time()),
        job=job_progress(meta, history, total_rounds) if meta is not None else None,
        rounds=round_rows(history),
        privacy=privacy_releases(history, total_rounds),
        central_privacy=central_privacy(history),
        certificates=_unique(certificates),
        failures=failures,
        recent_jobs=tuple(
            {k: j.get(k) for k in ("job_id", "job_name", "status", "submit_time", "duration")}
            for j in jobs[:_RECENT_JOBS]
        ),
    )


def _failed(status: str) -> bool:
    return status.startswith("FINISHED") and status != "FINISHED:COMPLETED"


def _unique(certificates):
    """One row per certificate file (the server's, read from its kit and over TLS, stays twice:
    they can differ when the server runs a newer kit)."""
    seen, out = set(), []
    for c in certificates:
        if c.file not in seen:
            seen.add(c.file)
            out.append(c)
    return tuple(out)


@contextlib.contextmanager
def _session(kit: AdminKit, timeout: float) -> Iterator[Session]:
    where = f"the FLARE server at {kit.server} (startup/fed_admin.json of {kit.path})"
    try:
        with _quiet():
            session = new_secure_session(kit.username, str(kit.path), timeout=timeout)
    except AuthenticationError as err:
        raise ServerUnreachable(
            f"{where} refused the login of {kit.username} ({err}). Fix: use an admin kit of this project, "
            "issued by its provisioning (`hospital-fl kit verify <admin kit>` checks one)"
        ) from None
    except Exception as err:  # noqa: BLE001 - NoConnection, or the login timing out
        raise ServerUnreachable(
            f"{where} did not answer within {timeout:g}s ({type(err).__name__}: {err}). Fix: start the server "
            "(startup/start.sh in the server's kit), check the address and the network between here and the "
            "server, or wait longer with --timeout"
        ) from None
    try:
        yield session
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - a query the server refused or failed: name it, no traceback
        raise ServerUnreachable(
            f"{where} answered a status query with an error ({type(err).__name__}: {err}). Fix: use an admin kit "
            "whose role may list and download jobs and run the server's `cat` command (FLARE's project_admin may), "
            "or retry if the server was restarting"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            session.close()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the admin client's login banner and its retry warnings."""
    cell_logger = logging.getLogger("nvflare.fuel.f3")
    level = cell_logger.level
    cell_logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        cell_logger.setLevel(level)


def _job_meta(session: Session, jobs: list[dict], job_id: str | None) -> dict | None:
    """The asked job's meta; else the running job's, else the latest job's (None: no jobs yet)."""
    if job_id is None:
        running = [j for j in jobs if j.get("status") == "RUNNING"]
        chosen = (running or jobs)[:1]
        return session.get_job_meta(chosen[0]["job_id"]) if chosen else None
    try:
        return session.get_job_meta(job_id)
    except JobNotFound:
        known = ", ".join(f"{j['job_id']} ({j.get('job_name')})" for j in jobs[:_RECENT_JOBS]) or "none yet"
        raise InputError(
            "--job",
            job_id,
            "the server has no job with this ID",
            f"pass one of the server's jobs (latest: {known}); `hospital-fl status` without --job lists them",
        ) from None


def _job_history(session: Session, meta: dict) -> tuple[list[dict], int | None]:
    """A job's round history and rounds: from the server's job folder while the job runs (the
    aggregator rewrites round_history.json after every round), from its result once it ended."""
    job_id = meta["job_id"]
    if meta["status"] == "RUNNING":
        return _read_json_on_server(session, f"{job_id}/{HISTORY_FILE}", []), total_rounds_of(
            _read_json_on_server(session, f"{job_id}/{_SERVER_CONFIG}", {})
        )
    with tempfile.TemporaryDirectory(prefix="hospital_fl_status_") as tmp:
        try:
            with _quiet():
                result = Path(session.download_job_result(job_id, tmp))
        except Exception as err:  # noqa: BLE001 - a job that never ran has no result
            log.info("no result for job %s: %s", job_id, err)
            return [], None
        history = next(iter(sorted(result.rglob(HISTORY_FILE))), None)
        config = next(iter(sorted(result.rglob("config_fed_server.json"))), None)
        return (
            json.loads(history.read_text()) if history else [],
            total_rounds_of(json.loads(config.read_text())) if config else None,
        )


def _read_json_on_server(session: Session, relative: str, missing):
    """A JSON file under the server's workspace through the admin `cat` command (``missing``
    when it is not there yet, e.g. before the first round ends, or when the admin's role may
    not run shell commands on the server)."""
    try:
        return json.loads(session.cat_target("server", file=relative))
    except json.JSONDecodeError:  # "cat: ...: No such file or directory"
        return missing
    except Exception as err:  # noqa: BLE001 - e.g. AuthorizationError: the rest of the report still stands
        log.warning("could not read %s on the server: %s", relative, err)
        return missing


def _failures(session: Session, kit: AdminKit, meta: dict):
    """Each site's reason for the job's failure, from the error logs sites streamed to the
    server (ERRORLOG_<site>), the job's deployment and the server's job log."""
    job_id, error_logs = meta["job_id"], {}
    if any(c.startswith("ERRORLOG_") for c in session.list_job_components(job_id)):
        with _quiet():
            location = Path(session.download_job_components(job_id))
        try:
            for path in sorted(location.glob("ERRORLOG_*")):
                error_logs[path.name.removeprefix("ERRORLOG_")] = path.read_text(errors="replace")
        finally:  # the admin API downloads into the kit's transfer/ folder; keep the kit as it was
            if location.is_relative_to(kit.path):
                shutil.rmtree(location, ignore_errors=True)
    try:
        server_log = session.get_job_logs(job_id, "server").get("logs", {}).get("server", "")
    except Exception as err:  # noqa: BLE001 - an old job whose logs are gone: the other sources still count
        log.info("no server log for job %s: %s", job_id, err)
        server_log = ""
    return failure_reasons(error_logs, server_log, meta.get("job_deploy_detail", []))


def _server_certificate(kit: AdminKit, timeout: float) -> x509.Certificate | None:
    """The certificate the server presents, read in a TLS handshake made with the admin
    kit's certificate (None when the handshake fails: the report then lacks that row)."""
    startup = kit.path / "startup"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only read it: an expired one must still show
    try:
        context.load_cert_chain(startup / "client.crt", startup / "client.key")
        with (
            socket.create_connection((kit.host, kit.port), timeout=timeout) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    except (OSError, ValueError) as err:
        log.info("could not read the server certificate at %s: %s", kit.server, err)
        return None
