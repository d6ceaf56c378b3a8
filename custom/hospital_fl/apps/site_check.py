"""`hospital-fl site check`: the preflight a hospital runs on its FL server before joining.

Each check is a small function returning a ``CheckResult``; ``run_site_check`` runs the
ones whose inputs were given and lists the others as not checked, so the table shows what
was not verified. ``exit_code`` is 1 when a required check failed.

Only hospital_fl.flare imports nvflare: the package check reads versions from the
installed distributions' metadata instead.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from hospital_fl.errors import InputError
from hospital_fl.provisioning.certificates import CLIENT_CRT, CLIENT_KEY, ROOT_CA, as_utc, certificate_problems

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "CheckResult",
    "SiteCheckConfig",
    "MIN_PYTHON",
    "PINNED",
    "MIN_VERSIONS",
    "NOT_CHECKED",
    "parse_server",
    "check_python",
    "check_packages",
    "check_gpu",
    "check_disk",
    "check_manifest",
    "check_startup_kit",
    "check_server_reachable",
    "check_privacy_policy",
    "run_site_check",
    "render_table",
    "exit_code",
]

MIN_PYTHON = (3, 10)
# Exact versions the bundle is built and tested against (pyproject.toml pins them).
PINNED: Mapping[str, str] = {"nvflare": "2.9.0", "monai": "1.6.1", "opacus": "1.6.0", "pydicom": "3.0.2"}
MIN_VERSIONS: Mapping[str, str] = {"torch": "2.4"}
NOT_CHECKED = "not checked"
KIT_FILES = ("startup/fed_client.json", CLIENT_CRT, CLIENT_KEY, ROOT_CA)


@dataclass(frozen=True)
class CheckResult:
    """One line of the site check.

    Attributes:
        name: what was checked.
        ok: whether it passed (a skipped check is ok and not required).
        detail: what was found, or what is wrong and how to fix it.
        required: a failed required check makes the site not ready.
    """

    name: str
    ok: bool
    detail: str
    required: bool = True


def _skipped(name: str, option: str) -> CheckResult:
    return CheckResult(name, True, f"{NOT_CHECKED}: pass {option}", required=False)


def parse_server(text: str) -> tuple[str, int]:
    """Split "host:port" (or "[ipv6]:port") into host and port.

    Raises:
        InputError: no port, an empty host, or a port outside 1..65535.
    """
    rule = 'it must read "host:port" with a port in 1..65535'
    fix = "use e.g. --server fl.consortium.org:8002"
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InputError("server", text, rule, fix)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InputError("server", text, "an IPv6 address must be in brackets", "use e.g. [2001:db8::1]:8002")
    if not host:
        raise InputError("server", text, rule, fix)
    return host, int(port)


@dataclass(frozen=True)
class SiteCheckConfig:
    """What the site check looks at; checks whose input is None are listed as not checked.

    Attributes:
        manifest: the site's ingested dataset folder (holds manifest.json).
        kit_dir: the site's FLARE startup kit (holds startup/ and local/).
        server: the FL server as "host:port".
        policy: the site's privacy policy file (local/hospital_fl_privacy.json) or its
            local/ folder.
        min_free_gb: free disk the workdir needs, in GB (10^9 bytes).
        require_gpu: fail when no CUDA device is usable (a hospital training server needs one).
        workdir: where FLARE and the site dataset write; its disk is checked.
        connect_timeout: seconds to wait for the server's TCP connect.
    """

    manifest: str | None = None
    kit_dir: str | None = None
    server: str | None = None
    policy: str | None = None
    min_free_gb: float = 20.0
    require_gpu: bool = True
    workdir: str = "."
    connect_timeout: float = 5.0

    def __post_init__(self):
        if self.server is not None:
            parse_server(self.server)
        if isinstance(self.min_free_gb, bool) or not isinstance(self.min_free_gb, (int, float)) or self.min_free_gb < 0:
            raise InputError("min_free_gb", self.min_free_gb, "it must be a number >= 0", "use e.g. --min-free-gb 20")
        if not isinstance(self.connect_timeout, (int, float)) or not self.connect_timeout > 0:
            raise InputError("connect_timeout", self.connect_timeout, "it must be > 0 seconds", "use e.g. 5")

    @property
    def server_address(self) -> tuple[str, int] | None:
        return None if self.server is None else parse_server(self.server)


# -- environment ---------------------------------------------------------------------------
def _release(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: "2.13.0+cpu" -> (2, 13, 0)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def check_python(version_info: Sequence[int] = sys.version_info) -> CheckResult:
    """Python must be at least MIN_PYTHON."""
    have = ".".join(str(v) for v in tuple(version_info)[:3])
    need = ".".join(str(v) for v in MIN_PYTHON)
    if tuple(version_info)[:2] >= MIN_PYTHON:
        return CheckResult("python", True, f"Python {have}")
    return CheckResult(
        "python", False, f"Python {have}; {need} or newer is required (install it and recreate the venv)"
    )


def _installed_versions(names: Sequence[str]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_packages(versions: Mapping[str, str | None] | None = None) -> CheckResult:
    """torch, nvflare, monai, opacus and pydicom are installed at the versions the bundle needs.

    Args:
        versions: {package: installed version or None}; read from the environment when None.
    """
    names = (*MIN_VERSIONS, *PINNED)
    versions = _installed_versions(names) if versions is None else dict(versions)
    found, problems = [], []
    for name in names:
        have = versions.get(name)
        if have is None:
            want = f"=={PINNED[name]}" if name in PINNED else f">={MIN_VERSIONS[name]}"
            problems.append(f"{name} is not installed (pip install '{name}{want}')")
        elif name in PINNED and have != PINNED[name]:
            problems.append(f"{name} {have} installed, {PINNED[name]} required (pip install '{name}=={PINNED[name]}')")
        elif name in MIN_VERSIONS and _release(have) < _release(MIN_VERSIONS[name]):
            problems.append(
                f"{name} {have} installed, {MIN_VERSIONS[name]} or newer required "
                f"(pip install '{name}>={MIN_VERSIONS[name]}')"
            )
        else:
            found.append(f"{name} {have}")
    if problems:
        return CheckResult("packages", False, "; ".join(problems))
    return CheckResult("packages", True, ", ".join(found))


def check_gpu(require_gpu: bool) -> CheckResult:
    """A CUDA device is usable by torch; only a failure when ``require_gpu``."""
    import torch

    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {props.name} {props.total_memory / 2**30:.0f} GiB")
        return CheckResult("gpu", True, "; ".join(devices), required=require_gpu)
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    detail = f"no CUDA device (torch {torch.__version__} is {build})"
    if not require_gpu:
        return CheckResult("gpu", True, f"{detail}; not required, training runs on the CPU", required=False)
    return CheckResult(
        "gpu",
        False,
        f"{detail}; install the NVIDIA driver and a CUDA build of torch, or check without requiring a GPU",
    )


def check_disk(path: str | Path, min_free_gb: float) -> CheckResult:
    """The file system holding ``path`` (or its nearest existing parent) has ``min_free_gb`` free."""
    target = Path(path).expanduser().absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    where = str(target) if probe == target else f"{target} (not created yet; measured at {probe})"
    if free_gb >= min_free_gb:
        return CheckResult("disk", True, f"{free_gb:.1f} GB free at {where}")
    return CheckResult(
        "disk",
        False,
        f"{free_gb:.1f} GB free at {where}; {min_free_gb:g} GB needed (free space or use another workdir)",
    )


# -- site inputs ---------------------------------------------------------------------------
def _read_json(path: Path) -> tuple[object, str | None]:
    """(data, None) or (None, what is wrong)."""
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, f"{path} is missing"
    except PermissionError:
        return None, f"{path} is not readable by this user"
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path} is not valid JSON ({err})"


def check_startup_kit(kit_dir: str | Path, now: dt.datetime | None = None) -> CheckResult:
    """The site's FLARE startup kit is complete, and its certificate is valid and issued by its root CA.

    Args:
        kit_dir: the kit folder (holds startup/ and, optionally, local/).
        now: the time the certificates are checked at; the current time when None (a naive
            time is taken as UTC).
    """
    name = "startup kit"
    kit = Path(kit_dir)
    if not kit.is_dir():
        return CheckResult(name, False, f"{kit} is not a folder (pass the site's unpacked startup kit)")
    missing = [f for f in KIT_FILES if not (kit / f).is_file()]
    unreadable = [f for f in KIT_FILES if f not in missing and not os.access(kit / f, os.R_OK)]
    problems = []
    if missing:
        problems.append(f"{kit} lacks {', '.join(missing)} (unpack the complete kit)")
    if unreadable:
        problems.append(f"{', '.join(unreadable)} in {kit} not readable by this user (fix the file permissions)")
    if problems:
        return CheckResult(name, False, "; ".join(problems))

    _, json_problem = _read_json(kit / "startup" / "fed_client.json")
    if json_problem:
        problems.append(f"{json_problem}; unpack the kit again")
    cert_problems, summary = certificate_problems(kit, as_utc(now))
    problems += cert_problems
    if problems:
        return CheckResult(name, False, "; ".join(problems))
    local = "local/ present" if (kit / "local").is_dir() else "no local/ (optional; holds the site's own config)"
    return CheckResult(name, True, f"{summary}; {local}")


def check_server_reachable(host: str, port: int, timeout: float = 5.0) -> CheckResult:
    """A TCP connection to the FL server opens within ``timeout`` seconds."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    start = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            elapsed = time.perf_counter() - start
    except (OSError, OverflowError, ValueError) as err:
        return CheckResult(
            "server",
            False,
            f"cannot connect to {address} ({type(err).__name__}: {err}); check the address, that the server "
            "is running, and that the firewall lets this machine reach it",
        )
    return CheckResult("server", True, f"connected to {address} in {elapsed * 1000:.0f} ms")


def check_privacy_policy(path: str | Path) -> CheckResult:
    """The site's privacy policy (local/hospital_fl_privacy.json, or its local/ folder) passes the bundle's validator."""
    from hospital_fl.privacy.policy import SITE_POLICY_FILE, policy_from_dict

    name = "privacy policy"
    path = Path(path)
    if path.is_dir():
        path = path / SITE_POLICY_FILE
    if path.name != SITE_POLICY_FILE:
        return CheckResult(
            name,
            False,
            f"{path}: jobs read the policy only from local/{SITE_POLICY_FILE} in the site's startup kit "
            f"(name the file {SITE_POLICY_FILE} and put it there)",
        )
    if not path.exists():
        return CheckResult(name, False, f"{path} does not exist (create it with hospital-fl privacy init)")
    data, problem = _read_json(path)
    if problem:
        return CheckResult(name, False, problem)
    try:
        policy = policy_from_dict(data, str(path))
    except InputError as err:
        return CheckResult(name, False, str(err))
    parts = [f"require_dp {json.dumps(policy.require_dp)}"]
    for field in ("max_job_epsilon", "lifetime_epsilon"):
        value = getattr(policy, field)
        if value is not None:
            parts.append(f"{field} {value:g}")
    parts.append(f"delta {policy.delta:g}")
    if policy.accountant != "rdp":
        parts.append(f"accountant {policy.accountant}")
    return CheckResult(name, True, ", ".join(parts))


def check_manifest(path: str | Path) -> CheckResult:
    """The site dataset at ``path`` (made by ingest) reads, matches its images, and has consented images today."""
    from hospital_fl.data.ingest.manifest import load_images
    from hospital_fl.data.ingest.site_dataset import consented_records
    from hospital_fl.errors import InputError

    path = Path(path)
    if not path.exists():
        return CheckResult("manifest", False, f"{path} does not exist (run hospital-fl ingest first)")
    site_dir = path.parent if path.is_file() else path
    try:
        manifest, keep, excluded = consented_records(site_dir)
        load_images(site_dir, manifest)
    except InputError as err:
        return CheckResult("manifest", False, str(err))
    return CheckResult(
        "manifest",
        True,
        f"{len(manifest.records)} images at {manifest.image_size}x{manifest.image_size} "
        f"({manifest.preprocessing_version}); {len(keep)} usable today, {len(excluded)} patients "
        f"excluded for consent",
    )


# -- the whole check -----------------------------------------------------------------------
def _guarded(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    try:
        return check()
    except Exception as err:  # a broken check must not hide the others' results
        return CheckResult(name, False, f"the check itself failed: {type(err).__name__}: {err}")


def run_site_check(cfg: SiteCheckConfig) -> list[CheckResult]:
    """Every check, in table order; those without input are listed as not checked."""
    results = [
        _guarded("python", check_python),
        _guarded("packages", check_packages),
        _guarded("gpu", lambda: check_gpu(cfg.require_gpu)),
        _guarded("disk", lambda: check_disk(cfg.workdir, cfg.min_free_gb)),
    ]
    optional: list[tuple[str, object, str, Callable[[], CheckResult]]] = [
        ("manifest", cfg.manifest, "--manifest <site dataset folder>", lambda: check_manifest(cfg.manifest)),
        ("startup kit", cfg.kit_dir, "--kit <startup kit folder>", lambda: check_startup_kit(cfg.kit_dir)),
        (
            "server",
            cfg.server,
            "--server <host:port>",
            lambda: check_server_reachable(*cfg.server_address, timeout=cfg.connect_timeout),
        ),
        (
            "privacy policy",
            cfg.policy,
            "--policy <local/hospital_fl_privacy.json>",
            lambda: check_privacy_policy(cfg.policy),
        ),
    ]
    for name, given, option, check in optional:
        results.append(_skipped(name, option) if given is None else _guarded(name, check))
    return results


def _status(result: CheckResult) -> str:
    if result.detail.startswith(NOT_CHECKED):
        return "[dim]skipped[/dim]"
    if result.ok:
        return "[green]ok[/green]"
    return "[red]FAIL[/red]" if result.required else "[yellow]warn[/yellow]"


def render_table(results: Sequence[CheckResult]) -> Table:
    """A rich table: check, status (ok / FAIL / warn / skipped) and detail."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="hospital-fl site check")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for r in results:
        table.add_row(r.name, _status(r), escape(r.detail))
    return table


def exit_code(results: Sequence[CheckResult]) -> int:
    """1 when any required check failed, else 0."""
    return int(any(r.required and not r.ok for r in results))
