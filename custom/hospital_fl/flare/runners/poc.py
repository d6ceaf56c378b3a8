"""Run a CXR job on a real FLARE POC system: one server and one client process per site.

This is what a consortium admin does on one machine before going to production:
``nvflare poc prepare`` provisions startup kits for a server, the sites and the admins;
each site's local policy is widened to this bundle's classes; the server and clients
are started from their kits' startup scripts; the job is submitted and followed through
the FLARE admin API; the result is downloaded; the system is shut down. Everything
talks over loopback with the mutual-TLS certificates the provisioning created.

One module (~610 lines): starting, watching and always stopping a POC system are one lifecycle;
splitting it would scatter the cleanup that guarantees no process outlives a command.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nvflare.lighter
import psutil
import yaml
from nvflare.apis.job_def import RunStatus
from nvflare.fuel.flare_api.api_spec import MonitorReturnCode
from nvflare.fuel.flare_api.flare_api import Session, new_secure_session
from nvflare.tool.api_utils import shutdown_system
from nvflare.tool.poc.poc_commands import (
    get_prod_dir,
    setup_service_config,
    update_clients,
    update_server_name,
)
from nvflare.tool.poc.service_constants import FlareServiceConstants as SC

from hospital_fl.data.splits import site_names
from hospital_fl.errors import InputError
from hospital_fl.flare.interrupts import sigterm_as_interrupt
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.flare.progress import RoundWatcher
from hospital_fl.flare.recipes.cxr import export_job
from hospital_fl.flare.runners.simulator import FederatedRun, read_job_result
from hospital_fl.jobspec import JobSpec
from hospital_fl.privacy.setup import init_site_privacy

__all__ = [
    "DEFAULT_PORT",
    "PocSystem",
    "LiveSystem",
    "system_from_kits",
    "with_he_builder",
    "running_system",
    "submit_folder",
    "wait_for_job",
    "run_job",
    "connected_clients",
    "kit_env",
    "poc_project",
    "check_ports_free",
    "poc_processes",
    "run_in_poc",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8002  # FLARE's POC default; the server serves clients and admins on it
CONNECT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
ORPHAN_GRACE_S = 5.0
POLL_S = 1.0
CONSOLE_LOG = "poc_console.log"  # same name `nvflare poc start` uses
_TEMPLATE_PROJECT = "dummy_project.yml"  # in nvflare.lighter: the template `nvflare poc prepare` uses


@dataclass(frozen=True)
class PocSystem:
    """Startup kits of one FLARE system on this machine: a POC workspace, or the kits
    `hospital-fl provision` issued (system_from_kits).

    Attributes:
        workspace: folder holding every kit (processes are found by this path).
        prod_dir: folder whose sub-folders are the kits, one per participant name.
        server: the server's participant name.
        clients: the client (hospital) names started with the system.
        admin: the admin user whose kit logs in (and shuts the system down).
    """

    workspace: Path
    prod_dir: Path
    server: str
    clients: tuple[str, ...]
    admin: str

    def kit(self, name: str) -> Path:
        return self.prod_dir / name

    @property
    def participants(self) -> tuple[str, ...]:
        """The processes a POC runs: the server and every client (admin consoles excluded)."""
        return (self.server, *self.clients)

    @property
    def server_log(self) -> Path:
        return self.kit(self.server) / "log.txt"


# ---------------------------------------------------------------- helpers


def poc_project(num_sites: int, port: int = DEFAULT_PORT) -> dict:
    """FLARE's POC project config with clients site-1..N and the server on ``port``.

    Starts from the template ``nvflare poc prepare -n N`` uses and applies the same edits
    (server named "server", the client list); only the port is ours to choose.
    """
    if not 1024 <= port <= 65535:
        raise InputError("port", port, "it must lie in 1024..65535", "use e.g. 8002 (FLARE's POC default)")
    project = yaml.safe_load((Path(nvflare.lighter.__file__).parent / _TEMPLATE_PROJECT).read_text())
    project = update_clients(site_names(num_sites), num_sites, update_server_name(project))
    for participant in project["participants"]:
        if participant["type"] == "server":
            participant["fed_learn_port"] = port  # the admin port follows it
    return project


def with_he_builder(project: dict, he_args: dict) -> dict:
    """``project`` with FLARE's HEBuilder before its SignatureBuilder: every kit gets a TenSEAL
    context (the server's without the secret key) and is signed with it."""
    builders = [b for b in project["builders"] if not b["path"].endswith(".HEBuilder")]
    at = next((i for i, b in enumerate(builders) if b["path"].endswith(".SignatureBuilder")), len(builders))
    builders.insert(at, {"path": "nvflare.lighter.impl.he.HEBuilder", "args": dict(he_args)})
    return {**project, "builders": builders}


def _port_in_use(port: int) -> bool:
    """Whether a process listens on ``port`` (on any IPv4 address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Like the FLARE server: ignore sockets lingering in TIME_WAIT from an earlier run.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return True
    return False


def check_ports_free(ports: list[int]) -> None:
    """Raise InputError naming the first of ``ports`` another process already holds."""
    for port in ports:
        if _port_in_use(port):
            raise InputError(
                "POC server port",
                port,
                "another process is listening on it, so the FLARE server cannot start",
                f"stop that process (find it with `ss -ltnp 'sport = :{port}'`; an earlier POC system stops with "
                "`nvflare poc stop`), or use another port (run_in_poc's port argument)",
            )


def poc_processes(workspace: str | Path) -> list[psutil.Process]:
    """Live FLARE processes whose command line names ``workspace``: a POC system's server,
    clients, their start-script daemons and the per-job processes they spawn (not, say,
    a `tail -f` on one of its logs)."""
    needle, found = str(Path(workspace).resolve()), []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        info = proc.info
        if proc.pid == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = info["cmdline"] or ()
        is_flare = any("nvflare" in arg or arg.endswith("sub_start.sh") for arg in cmdline)
        if is_flare and any(needle in arg for arg in cmdline):
            found.append(proc)
    return found


def system_from_kits(kits_dir: str | Path, admin: str, clients: tuple[str, ...] | None = None) -> PocSystem:
    """The system whose kits ``hospital-fl provision`` wrote to ``kits_dir`` (its out/kits).

    Args:
        kits_dir: folder with one unpacked kit per participant.
        admin: the admin user (email) whose kit logs in; needs the right to shut down.
        clients: the hospitals to start (default: every hospital kit there).
    """
    kits = Path(kits_dir).resolve()
    kinds = {"server": [], "client": [], "admin": []}
    for kit in sorted(p for p in kits.iterdir() if p.is_dir()) if kits.is_dir() else []:
        for kind in kinds:
            if (kit / "startup" / f"fed_{kind}.json").is_file():
                kinds[kind].append(kit.name)
    if len(kinds["server"]) != 1 or admin not in kinds["admin"]:
        raise InputError(
            "startup kits folder",
            str(kits),
            f"it must hold one server kit and the kit of admin {admin!r} (found servers {kinds['server']}, "
            f"admins {kinds['admin']})",
            "pass the kits/ folder of a `hospital-fl provision` run and one of its admins",
        )
    chosen = tuple(kinds["client"]) if clients is None else tuple(clients)
    unknown = sorted(set(chosen) - set(kinds["client"]))
    if unknown:
        raise InputError("clients", unknown, f"no hospital kit in {kits} has this name", f"use {kinds['client']}")
    return PocSystem(workspace=kits, prod_dir=kits, server=kinds["server"][0], clients=chosen, admin=admin)


# ---------------------------------------------------------------- steps


def _prepare(workspace: Path, project: dict) -> PocSystem:
    """``nvflare poc prepare`` for ``project`` into ``workspace`` (replacing it)."""
    project_file = workspace.parent / f"{workspace.name}_project.yml"  # outside: prepare wipes workspace
    project_file.write_text(yaml.safe_dump(project, sort_keys=False))
    env = dict(
        os.environ,
        NVFLARE_POC_WORKSPACE=str(workspace),
        # prepare registers the admin kits as the user's active FLARE startup kit in
        # ~/.nvflare; keep that registry inside the run so the user's own stays untouched.
        HOME=str(workspace.parent / ".nvflare_home"),
    )
    cmd = [sys.executable, "-m", "nvflare.cli", "poc", "prepare", "-i", str(project_file), "--force"]
    done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"`nvflare poc prepare` failed (exit {done.returncode}) for {workspace}:\n{done.stdout}{done.stderr}"
        )
    project_config, service_config = setup_service_config(str(workspace))
    return PocSystem(
        workspace=workspace,
        prod_dir=Path(get_prod_dir(str(workspace), project_config["name"])),
        server=service_config[SC.FLARE_SERVER],
        clients=tuple(service_config[SC.FLARE_CLIENTS]),
        admin=service_config[SC.FLARE_PROJ_ADMIN],
    )


def kit_env() -> dict:
    """The environment a kit's start script runs in: `python3` is this interpreter, which
    has hospital_fl installed (as the site image has)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _start(system: PocSystem, procs: dict[str, subprocess.Popen], names: tuple[str, ...]) -> None:
    """Start each named participant from its kit's startup script, as `nvflare poc start`
    does; each process enters ``procs`` as soon as it exists, for the cleanup."""
    env = kit_env()
    for name in names:
        kit = system.kit(name)
        with open(kit / CONSOLE_LOG, "a", buffering=1) as console:
            procs[name] = subprocess.Popen(
                ["bash", str(kit / "startup" / "sub_start.sh")],
                cwd=kit,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                # A session of its own: a terminal Ctrl-C reaches only us, and our cleanup then
                # shuts the system down in order instead of each process dying on its own.
                start_new_session=True,
            )


def _check_alive(system: PocSystem, procs: dict[str, subprocess.Popen]) -> None:
    """Fail fast when a participant's start script has exited (it restarts a crashed process
    itself, so an exit means it gave up)."""
    for name, proc in procs.items():
        if proc.poll() is not None:
            raise RuntimeError(
                f"POC participant {name} exited with code {proc.returncode}; read {system.kit(name) / CONSOLE_LOG}"
            )


def connected_clients(session: Session) -> set[str]:
    """The clients registered with the server right now."""
    return {client.name for client in session.get_system_info().client_info}


def _connect(
    system: PocSystem, procs: dict[str, subprocess.Popen], timeout_s: float, clients: tuple[str, ...] | None = None
) -> Session:
    """Log in as the admin once the server answers and every client has registered."""
    deadline, last = time.monotonic() + timeout_s, "server not reachable yet"
    while time.monotonic() < deadline:
        _check_alive(system, procs)
        session = None
        try:
            with _quiet_admin_client():
                session = new_secure_session(system.admin, str(system.kit(system.admin)), timeout=5.0)
            missing = sorted(set(system.clients if clients is None else clients) - connected_clients(session))
            if not missing:
                return session
            last = f"clients not connected yet: {', '.join(missing)}"
        except Exception as err:  # the server is still starting: NoConnection and the like
            last = f"{type(err).__name__}: {err}"
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()
        time.sleep(POLL_S)
    raise TimeoutError(
        f"the POC system was not ready within {timeout_s:.0f}s ({last}); read the console logs "
        f"{system.kit(system.server) / CONSOLE_LOG} and <site>/{CONSOLE_LOG} under {system.prod_dir}"
    )


def _download(session: Session, job_id: str, result_root: Path) -> Path | None:
    try:
        return Path(session.download_job_result(job_id, str(result_root)))
    except Exception as err:
        log.warning("could not download the result of job %s: %s", job_id, err)
        return None


def _job_server_log(system: PocSystem, job_id: str, downloaded: Path | None) -> Path:
    """The most specific server log there is for ``job_id``."""
    for candidate in (
        downloaded / "workspace" / "log.txt" if downloaded else None,
        system.kit(system.server) / job_id / "log.txt",
    ):
        if candidate is not None and candidate.exists():
            return candidate
    return system.server_log


def _wait_until(done: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True


def _describe(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        module = next((a for a in proc.cmdline() if a.startswith("nvflare.")), proc.name())
        return f"{proc.pid} ({module})"
    return str(proc.pid)


def _stop(system: PocSystem, procs_by_name: dict[str, subprocess.Popen]) -> list[int]:
    """Shut the POC system down; returns the pids that survived every attempt (normally none).

    First FLARE's own graceful shutdown (what `nvflare poc stop` does: abort running
    jobs, stop clients and server), then signals to whatever is left.
    """
    started = time.monotonic()
    procs = list(procs_by_name.values())
    if any(proc.poll() is None for proc in procs):
        try:
            with _quiet_admin_client():
                shutdown_system(
                    str(system.prod_dir), username=system.admin, timeout_in_sec=int(STOP_TIMEOUT_S), verbose=False
                )
        except Exception as err:
            log.warning("graceful POC shutdown failed (%s); terminating its processes", err)
    # The start scripts notice the shutdown within a few seconds and exit with their child.
    _wait_until(lambda: all(proc.poll() is not None for proc in procs), STOP_TIMEOUT_S)
    # Job processes run in sessions of their own; an aborted one can outlive its parent.
    _wait_until(lambda: not poc_processes(system.workspace), ORPHAN_GRACE_S)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        leftovers = poc_processes(system.workspace)
        live_groups = [proc.pid for proc in procs if proc.poll() is None]
        if not leftovers and not live_groups:
            break
        log.warning(
            "sending %s to leftover POC processes: %s",
            sig.name,
            ", ".join([_describe(p) for p in leftovers] + [f"group {g}" for g in live_groups]),
        )
        for pgid in live_groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        psutil.wait_procs(leftovers, timeout=5)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5 if proc.poll() is None else 0)
    log.info("POC system stopped in %.1fs", time.monotonic() - started)
    return [p.pid for p in poc_processes(system.workspace)] + [p.pid for p in procs if p.poll() is None]


@contextlib.contextmanager
def _quiet_admin_client() -> Iterator[None]:
    """Hide the admin client's per-login banner and its retry warnings while the server is
    still starting; failures still surface as exceptions."""
    cell_logger = logging.getLogger("nvflare.fuel.f3")
    level = cell_logger.level
    cell_logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        cell_logger.setLevel(level)


# ---------------------------------------------------------------- orchestration


@dataclass
class LiveSystem:
    """A started system: its admin session and the start-script process of each participant."""

    system: PocSystem
    session: Session
    procs: dict[str, subprocess.Popen]

    def start_clients(self, names: tuple[str, ...], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Start more hospitals from their kits (in the same kits folder) and wait until they registered."""
        _start(self.system, self.procs, names)
        deadline = time.monotonic() + timeout_s
        while not set(names) <= connected_clients(self.session):
            _check_alive(self.system, self.procs)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{', '.join(names)} did not register within {timeout_s:.0f}s; read their {CONSOLE_LOG}"
                )
            time.sleep(POLL_S)

    def check_alive(self) -> None:
        _check_alive(self.system, self.procs)


@contextlib.contextmanager
def running_system(system: PocSystem, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> Iterator[LiveSystem]:
    """Start the server and clients from their kits, log in as the admin, and always shut
    the system down on leaving (also on Ctrl-C or SIGTERM, and also when the start failed).

    Raises:
        TimeoutError: the system did not come up in time.
        RuntimeError: processes survived the shutdown (their pids are named).
    """
    procs: dict[str, subprocess.Popen] = {}
    session: Session | None = None
    with sigterm_as_interrupt():
        try:
            tick = time.monotonic()
            _start(system, procs, system.participants)
            session = _connect(system, procs, connect_timeout_s)
            log.info("FLARE server and %d clients up in %.1fs", len(system.clients), time.monotonic() - tick)
            yield LiveSystem(system, session, procs)
        finally:
            if session is not None:
                with contextlib.suppress(Exception):
                    session.close()
            # A second Ctrl-C or SIGTERM must not cut the shutdown short.
            previous = (
                {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread()
                else {}
            )
            try:
                survivors = _stop(system, procs)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            if survivors:
                raise RuntimeError(
                    f"FLARE processes {survivors} survived shutdown and SIGKILL; end them with `kill -9 {survivors[0]}`"
                )


def submit_folder(session: Session, job_dir: str | Path) -> str:
    """Submit a job folder through the admin API; returns the job id.

    The admin client signs a job by writing files into the folder it submits: a copy is
    submitted, so the user's folder (e.g. a checked-in jobs/) stays as it was.
    """
    with tempfile.TemporaryDirectory() as jobs_dir:
        folder = Path(shutil.copytree(job_dir, Path(jobs_dir) / Path(job_dir).name))
        return session.submit_job(str(folder.resolve()))


def wait_for_job(
    live: LiveSystem, job_id: str, timeout_s: float, on_round: Callable[[int], None] | None = None
) -> dict:
    """Follow ``job_id`` to its end; returns its meta. A job past ``timeout_s`` is aborted.

    Raises:
        TimeoutError: the job did not end in time.
        RuntimeError: a participant's process died meanwhile.
    """
    system, session = live.system, live.session

    def still_running(*_) -> bool:  # monitor callback: raises if a participant's process died
        live.check_alive()
        return True

    with RoundWatcher(system.kit(system.server) / job_id, on_round or (lambda rounds: None)):
        code, meta = session.monitor_job_and_return_job_meta(
            job_id, timeout=timeout_s, poll_interval=POLL_S, cb=still_running
        )
    if code == MonitorReturnCode.TIMEOUT:
        with contextlib.suppress(Exception):
            session.abort_job(job_id)
        raise TimeoutError(
            f"job {job_id} did not finish within timeout_s={timeout_s:g}s and was aborted; "
            f"read {_job_server_log(system, job_id, None)}, or raise timeout_s"
        )
    return meta


def run_job(
    live: LiveSystem,
    job_dir: str | Path,
    result_root: str | Path,
    timeout_s: float = 900,
    on_round: Callable[[int], None] | None = None,
) -> FederatedRun:
    """Submit ``job_dir`` to a running system, follow it, download and read its result.

    Raises:
        TimeoutError: the job did not finish in time (it was aborted).
        RuntimeError: the job ended in a failed state (the message names the server log).
    """
    reported = 0

    def report(rounds: int) -> None:
        nonlocal reported
        reported = max(reported, rounds)
        if on_round is not None:
            on_round(rounds)

    start = time.perf_counter()
    job_id = submit_folder(live.session, job_dir)
    log.info("submitted job %s", job_id)
    meta = wait_for_job(live, job_id, timeout_s, report)
    wall = time.perf_counter() - start
    status = meta["status"]
    log.info("job %s ended %s after %.1fs", job_id, status, wall)
    downloaded = _download(live.session, job_id, Path(result_root))
    if status != RunStatus.FINISHED_COMPLETED.value or downloaded is None:
        raise RuntimeError(
            f"job {job_id} ended with status {status}"
            f"{'' if downloaded else ' and its result could not be downloaded'}; "
            f"read the server log {_job_server_log(live.system, job_id, downloaded)}"
        )
    run = read_job_result(downloaded, wall)
    if reported < len(run.history):
        report(len(run.history))  # the server may remove its job folder before the last log line is read
    return run


def run_in_poc(
    spec: JobSpec,
    workspace_root: str | Path,
    on_round: Callable[[int], None] | None = None,
    timeout_s: float = 900,
    port: int = DEFAULT_PORT,
    job_dir: str | Path | None = None,
    site_setup: Callable[[str, Path], None] | None = None,
) -> FederatedRun:
    """Run ``spec`` on a FLARE POC system on this machine; returns its result.

    The POC workspace goes to ``workspace_root/poc`` (replaced) and the downloaded job
    result to ``workspace_root/result/<job id>``. The system is always shut down before
    this returns or raises, also on Ctrl-C or SIGTERM.

    Args:
        spec: the job; the POC gets one client per site, named site-1..site-N.
        workspace_root: folder for the POC workspace and the result.
        on_round: called with the number of finished rounds as the job progresses.
        timeout_s: longest the job may run once submitted; it is aborted after that.
        port: the server's port for clients and admins.
        job_dir: submit this job folder (e.g. jobs/cxr_fedavg) as it is; by default
            ``spec`` is exported to a temporary folder and that is submitted.
        site_setup: called with each client site's name and freshly prepared kit folder
            before anything starts, e.g. to write a site's local/privacy.json.

    Raises:
        InputError: the server port is taken, or ``port``/``timeout_s`` is out of range.
        TimeoutError: the system did not come up, or the job did not finish, in time.
        RuntimeError: the job ended in a failed state (the message names the server log).
    """
    if not timeout_s > 0:
        raise InputError("timeout_s", timeout_s, "it must be > 0", "use e.g. 900")
    root = Path(workspace_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    project = poc_project(spec.num_sites, port)
    if spec.he is not None:  # what PocEnv(use_he=True) does, with the job's CKKS parameters
        project = with_he_builder(project, spec.he.builder_args())
    # Before prepare: `prepare --force` wipes the workspace, and with it the kits an
    # earlier POC system on this port would need for `nvflare poc stop`.
    check_ports_free([port])
    tick = time.monotonic()
    system = _prepare(root / "poc", project)
    for name in system.participants:
        allow_bundle_components(system.kit(name) / "local")
    privacy = getattr(spec, "privacy", None)  # a segmentation job has no DP settings
    if privacy is not None and privacy.enabled:  # a fresh POC site starts with an empty ledger in its kit
        for site in site_names(spec.num_sites):
            init_site_privacy(system.kit(site), site)
    if site_setup is not None:
        for site in site_names(spec.num_sites):
            site_setup(site, system.kit(site))
    log.info("POC prepared in %.1fs at %s", time.monotonic() - tick, system.workspace)

    with running_system(system) as live, tempfile.TemporaryDirectory() as jobs_dir:
        folder = export_job(spec, jobs_dir) if job_dir is None else Path(job_dir)
        return run_job(live, folder, root / "result", timeout_s, on_round)
