"""Run a CXR job on a real FLARE POC system: one server and one client process per site.

This is what a consortium admin does on one machine before going to production:
``nvflare poc prepare`` provisions startup kits for a server, the sites and the admins;
each site's local policy is widened to this bundle's classes; the server and clients
are started from their kits' startup scripts; the job is submitted and followed through
the FLARE admin API; the result is downloaded; the system is shut down. Everything
talks over loopback with the mutual-TLS certificates the provisioning created.

A consortium that runs for weeks also loses processes: ``LiveSystem.kill`` and
``LiveSystem.start_from_kit`` rehearse a hospital (or the server) dying and its operator
starting it again from the kit, ``Liveness`` makes a rehearsal server declare a silent
hospital dead in seconds instead of FLARE's ten minutes, and ``wait_for_job`` fails clearly
when the server that ran a job restarted (FLARE 2.9 does not resume such a job).

One module (~900 lines): starting, watching, losing and always stopping a POC system are one
lifecycle; splitting it would scatter the cleanup that guarantees no process outlives a command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
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
from hospital_fl.flare.aggregator import HISTORY_FILE
from hospital_fl.flare.interrupts import sigterm_as_interrupt
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.flare.progress import RoundWatcher, rounds_finished
from hospital_fl.flare.recipes.cxr import export_job
from hospital_fl.flare.recipes.resume import ResumePoint
from hospital_fl.flare.runners.simulator import GLOBAL_MODEL_FILE, FederatedRun, read_job_result
from hospital_fl.jobspec import JobSpec
from hospital_fl.privacy.setup import init_site_privacy

__all__ = [
    "DEFAULT_PORT",
    "PocSystem",
    "Liveness",
    "LiveSystem",
    "ServerRestartedError",
    "prepare_system",
    "participant_processes",
    "InterruptedJob",
    "interrupted_job",
    "interrupted_run",
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
    # Environment variables every participant starts with (e.g. Liveness.env()), also when
    # started again from its kit.
    env: tuple[tuple[str, str], ...] = ()

    def kit(self, name: str) -> Path:
        return self.prod_dir / name

    @property
    def participants(self) -> tuple[str, ...]:
        """The processes a POC runs: the server and every client (admin consoles excluded)."""
        return (self.server, *self.clients)

    @property
    def server_log(self) -> Path:
        return self.kit(self.server) / "log.txt"


@dataclass(frozen=True)
class Liveness:
    """How fast a rehearsal server gives up on a silent hospital.

    FLARE's defaults, which production kits keep: the server removes a client it has not
    heard from for 600 s (``heart_beat_timeout`` in the server kit's fed_server.json), and a
    job then gives the reported-dead client 60 s of grace before it counts as disconnected
    (``dead_client_grace_period``). Only then does FLARE apply the job's ``min_clients``:
    fewer live sites than that aborts the job. A POC rehearsal shortens both so a drop-out
    plays out in seconds.

    Attributes:
        heart_beat_timeout_s: seconds without a heartbeat before the server removes a client.
            Clients heartbeat every 10 s and the age of the last one was seen reaching 12 s, so
            anything under 15 would remove live hospitals.
        dead_client_grace_s: seconds a job waits after a dead-client report before it counts
            the client as disconnected.
    """

    heart_beat_timeout_s: int = 15
    dead_client_grace_s: int = 2

    def __post_init__(self):
        if not (isinstance(self.heart_beat_timeout_s, int) and self.heart_beat_timeout_s >= 15):
            raise InputError(
                "heart_beat_timeout_s",
                self.heart_beat_timeout_s,
                "it must be a whole number >= 15: clients heartbeat every 10 s, so a shorter timeout removes live ones",
                "use 15 or more (FLARE's default is 600)",
            )
        if not (isinstance(self.dead_client_grace_s, int) and self.dead_client_grace_s >= 0):
            raise InputError(
                "dead_client_grace_s", self.dead_client_grace_s, "it must be a whole number >= 0", "use e.g. 2"
            )

    def env(self) -> tuple[tuple[str, str], ...]:
        # FLARE reads job settings from the job's config or from NVFLARE_<NAME> variables of the
        # process; the server's job processes inherit the server's environment.
        return (("NVFLARE_DEAD_CLIENT_GRACE_PERIOD", str(self.dead_client_grace_s)),)

    def apply(self, server_kit: Path) -> None:
        """Write the heartbeat timeout into the server kit's startup/fed_server.json (POC kits
        are not signed; a provisioned kit would refuse to start after this edit)."""
        config_file = server_kit / "startup" / "fed_server.json"
        config = json.loads(config_file.read_text())
        for server in config["servers"]:
            server["heart_beat_timeout"] = self.heart_beat_timeout_s
        config_file.write_text(json.dumps(config, indent=2))


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


def participant_processes(system: PocSystem, name: str) -> list[psutil.Process]:
    """Live FLARE processes of one participant: its start script's supervisor loop, its
    FLARE process and the job processes it spawned (matched by its kit folder)."""
    kit = str(system.kit(name).resolve())
    return [
        proc
        for proc in poc_processes(system.workspace)
        if any(arg == kit or arg.startswith(kit + os.sep) for arg in _cmdline(proc))
    ]


def _cmdline(proc: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return proc.cmdline()
    return []


_SERVER_MODULE = "nvflare.private.fed.app.server.server_train"


def _server_process(system: PocSystem) -> psutil.Process | None:
    """The server's FLARE process (not its supervisor, not its job processes), if it runs here."""
    found = [p for p in participant_processes(system, system.server) if _SERVER_MODULE in _cmdline(p)]
    return found[0] if found else None


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


def kit_env(system: PocSystem | None = None) -> dict:
    """The environment a kit's start script runs in: `python3` is this interpreter, which
    has hospital_fl installed (as the site image has), plus ``system.env``."""
    env = dict(os.environ, **dict(system.env if system is not None else ()))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _start(system: PocSystem, procs: dict[str, subprocess.Popen], names: tuple[str, ...]) -> None:
    """Start each named participant from its kit's startup script, as `nvflare poc start`
    does; each process enters ``procs`` as soon as it exists, for the cleanup."""
    env = kit_env(system)
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
    for name, proc in list(procs.items()):  # a copy: LiveSystem.kill may remove one meanwhile
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
    graceful = False
    if any(proc.poll() is None for proc in procs):
        try:
            with _quiet_admin_client():
                shutdown_system(
                    str(system.prod_dir), username=system.admin, timeout_in_sec=int(STOP_TIMEOUT_S), verbose=False
                )
            graceful = True
        except Exception as err:
            # e.g. after a server restart: FLARE first aborts every job its store lists as
            # RUNNING, and the job the restart orphaned can no longer be aborted.
            log.warning("graceful POC shutdown failed (%s); terminating its processes", err)
    if graceful:  # the start scripts notice the shutdown within a few seconds and exit with their child
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
        self.wait_connected(names, timeout_s)

    def wait_connected(self, names: tuple[str, ...], timeout_s: float = CONNECT_TIMEOUT_S) -> float:
        """Wait until every named client is registered with the server; returns the seconds waited."""
        start = time.monotonic()
        deadline = start + timeout_s
        while not set(names) <= connected_clients(self.session):
            _check_alive(self.system, self.procs)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{', '.join(names)} did not register within {timeout_s:.0f}s; read their {CONSOLE_LOG}"
                )
            time.sleep(POLL_S)
        return time.monotonic() - start

    def check_alive(self) -> None:
        _check_alive(self.system, self.procs)

    def reconnect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """A new admin session once the server answers again (after a restart) and every client
        has registered with it; the old session is closed."""
        with contextlib.suppress(Exception):
            self.session.close()
        self.session = _connect(self.system, self.procs, timeout_s)

    def kill(self, name: str) -> list[int]:
        """SIGKILL a participant's start-script supervisor, FLARE process and job processes at
        once, as a crashed machine leaves them (its supervisor would otherwise restart it);
        the system stops counting it as started. Returns the pids killed."""
        started = self.procs.pop(name, None)  # first: its death is intended, not a failure to report
        procs = participant_processes(self.system, name)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        if started is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                started.wait(timeout=10)
        return [p.pid for p in procs]

    def start_from_kit(self, name: str) -> None:
        """Start a participant as its operator does after a crash: ``bash startup/start.sh``
        in its kit, which puts the kit's supervisor loop in the background and returns. The
        shutdown finds it by its kit folder like every other process of the system."""
        kit = self.system.kit(name)
        with open(kit / CONSOLE_LOG, "a", buffering=1) as console:
            subprocess.run(
                ["bash", str(kit / "startup" / "start.sh")],
                cwd=kit,
                env=kit_env(self.system),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                check=True,
                timeout=30,
            )


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


@dataclass(frozen=True)
class InterruptedJob:
    """How far a job got before the server that ran it went away, from its server run folder.

    Attributes:
        job_id / name: the job (name None when the server never reported it).
        rounds_completed: rounds aggregated and saved (None: nothing on disk says).
        total_rounds: the rounds the job was submitted with (None: unknown).
        source: the file ``rounds_completed`` was read from.
        global_model: the persistor's last saved global model (None: none saved yet).
    """

    job_id: str
    name: str | None
    rounds_completed: int | None
    total_rounds: int | None
    source: Path | None
    global_model: Path | None

    def resume_point(self) -> ResumePoint:
        """Where a continuation job (hospital_fl.flare.recipes.resume) starts.

        Raises:
            InputError: nothing on the server's disk to continue from.
        """
        if self.global_model is None or self.rounds_completed is None or self.total_rounds is None:
            raise InputError(
                "interrupted job",
                self.job_id,
                "its server run folder holds no saved global model and round count to continue from",
                "resubmit the job from round 0",
            )
        history = self.source if self.source is not None and self.source.name == HISTORY_FILE else None
        return ResumePoint(
            self.job_id, self.rounds_completed, self.total_rounds, str(self.global_model), history and str(history)
        )


def interrupted_job(system: PocSystem, job_id: str, name: str | None = None) -> InterruptedJob:
    """Read from the server's run folder of ``job_id`` how far the job got: the aggregator's
    round history if it was written, else the rounds the controller logged as started."""
    return interrupted_run(system.kit(system.server) / job_id, name)


def interrupted_run(run_dir: str | Path, name: str | None = None) -> InterruptedJob:
    """How far the job whose server run folder is ``run_dir`` (<server workspace>/<job id>) got."""
    run_dir = Path(run_dir).absolute()  # the continuation's server loads the model by this path
    job_id = run_dir.name
    rounds, source = None, None
    history = run_dir / HISTORY_FILE
    if history.is_file():
        with contextlib.suppress(ValueError, OSError, TypeError, KeyError):
            entries = json.loads(history.read_text())
            rounds, source = max((int(e["round"]) + 1 for e in entries), default=0), history
    if rounds is None and (run_dir / "log.txt").is_file():
        rounds, source = rounds_finished((run_dir / "log.txt").read_text(errors="replace")), run_dir / "log.txt"
    total = None
    with contextlib.suppress(ValueError, OSError, KeyError, IndexError, TypeError):
        server_config = json.loads((run_dir / "app_server" / "config" / "config_fed_server.json").read_text())
        total = int(server_config["workflows"][0]["args"]["num_rounds"])
    model = run_dir / "app_server" / GLOBAL_MODEL_FILE
    return InterruptedJob(job_id, name, rounds, total, source, model if model.is_file() else None)


class ServerRestartedError(RuntimeError):
    """The server process that ran a job ended or was replaced while the job ran.

    FLARE 2.9 does not resume a job after a server restart (it no longer snapshots a job, and
    nothing restores one): the restarted server tells the sites to abort their part, and the
    job's record stays RUNNING. The message names the job, how far it got and what to do.
    """

    def __init__(self, job: InterruptedJob, old_pid: int, new_pid: int | None):
        self.job, self.old_pid, self.new_pid = job, old_pid, new_pid
        done = job.rounds_completed
        progress = (
            "unknown (no round history or server log in its run folder)"
            if done is None
            else f"{done}{f' of {job.total_rounds}' if job.total_rounds else ''} (read from {job.source})"
        )
        if job.global_model is not None:
            model = (
                f"the persistor's last global model{f' (after round {done - 1})' if done else ''} is {job.global_model}"
            )
        else:
            model = "no global model was saved (no round finished), so it starts over"
        what = f"was replaced by pid {new_pid}" if new_pid else "is gone"
        try:  # the continuation's own rule decides whether there is one
            fix = f"submit its continuation, which starts at round {job.resume_point().rounds_completed} "
            fix += "(`hospital-fl resume-job`)"
        except InputError:
            fix = "resubmit the job"
        super().__init__(
            f"job {job.job_id}{f' ({job.name})' if job.name else ''} cannot finish: the FLARE server process that "
            f"ran it (pid {old_pid}) {what} while the job ran. FLARE 2.9 does not resume a job after a server "
            "restart: the sites abort their part and the job stays RUNNING in `list_jobs` (the admin API can "
            f"neither abort nor delete it; new jobs run beside it). Rounds completed: {progress}. "
            f"Fix: {fix}; {model}."
        )


def _check_server(system: PocSystem, job_id: str, server: psutil.Process | None, meta: dict) -> None:
    """Raise ServerRestartedError when ``server`` (the server process seen when the job was
    followed) no longer runs; nothing to check for a server on another machine (None)."""
    if server is None:
        return
    now = _server_process(system)
    if now == server:  # psutil compares pid and start time, so a reused pid is a new process
        return
    raise ServerRestartedError(interrupted_job(system, job_id, meta.get("name")), server.pid, now and now.pid)


def wait_for_job(
    live: LiveSystem, job_id: str, timeout_s: float, on_round: Callable[[int], None] | None = None
) -> dict:
    """Follow ``job_id`` to its end; returns its meta. A job past ``timeout_s`` is aborted.

    Raises:
        TimeoutError: the job did not end in time.
        ServerRestartedError: the server process running the job ended or was restarted.
        RuntimeError: a participant's process died meanwhile.
    """
    system, session = live.system, live.session
    server = _server_process(system)  # None: the server runs on another machine
    seen: dict = {}

    def still_running(_session, _job_id, meta, *_) -> bool:  # monitor callback: raises if a process died
        seen.update(meta or {})
        _check_server(system, job_id, server, seen)
        live.check_alive()
        return True

    with RoundWatcher(system.kit(system.server) / job_id, on_round or (lambda rounds: None)):
        try:
            code, meta = session.monitor_job_and_return_job_meta(
                job_id, timeout=timeout_s, poll_interval=POLL_S, cb=still_running
            )
        except ServerRestartedError:
            raise
        except Exception:
            _check_server(system, job_id, server, seen)  # the connection dropped: did the server go?
            raise
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


def prepare_system(
    workspace_root: str | Path,
    num_sites: int,
    port: int = DEFAULT_PORT,
    *,
    he_args: dict | None = None,
    privacy: bool = False,
    liveness: Liveness | None = None,
    site_setup: Callable[[str, Path], None] | None = None,
) -> PocSystem:
    """Kits of a POC system (server, site-1..N, admins) in ``workspace_root/poc`` (replaced), ready to start.

    Args:
        workspace_root: folder that receives the POC workspace.
        num_sites: hospitals, named site-1..site-N.
        port: the server's port for clients and admins.
        he_args: FLARE HEBuilder arguments: every kit gets a TenSEAL context (None: no HE).
        privacy: give every site an empty privacy ledger in its kit (for DP jobs).
        liveness: shorter dead-client detection for rehearsing drop-outs (None: FLARE's defaults).
        site_setup: called with each site's name and kit folder, e.g. to write its local/privacy.json.

    Raises:
        InputError: the port is taken or out of range.
    """
    root = Path(workspace_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    project = poc_project(num_sites, port)
    if he_args is not None:  # what PocEnv(use_he=True) does, with the job's CKKS parameters
        project = with_he_builder(project, he_args)
    # Before prepare: `prepare --force` wipes the workspace, and with it the kits an
    # earlier POC system on this port would need for `nvflare poc stop`.
    check_ports_free([port])
    tick = time.monotonic()
    system = _prepare(root / "poc", project)
    for name in system.participants:
        allow_bundle_components(system.kit(name) / "local")
    sites = site_names(num_sites)
    if privacy:  # a fresh POC site starts with an empty ledger in its kit
        for site in sites:
            init_site_privacy(system.kit(site), site)
    if site_setup is not None:
        for site in sites:
            site_setup(site, system.kit(site))
    if liveness is not None:
        liveness.apply(system.kit(system.server))
        system = dataclasses.replace(system, env=liveness.env())
    log.info("POC prepared in %.1fs at %s", time.monotonic() - tick, system.workspace)
    return system


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
    privacy = getattr(spec, "privacy", None)  # a segmentation job has no DP settings
    system = prepare_system(
        root,
        spec.num_sites,
        port,
        he_args=spec.he.builder_args() if spec.he is not None else None,
        privacy=privacy is not None and privacy.enabled,
        site_setup=site_setup,
    )

    with running_system(system) as live, tempfile.TemporaryDirectory() as jobs_dir:
        folder = export_job(spec, jobs_dir) if job_dir is None else Path(job_dir)
        return run_job(live, folder, root / "result", timeout_s, on_round)
