"""The consortium's site configs: typed, frozen and validated when built.

An operator describes the consortium once in ``site_configs/``::

    site_configs/
      consortium.yaml          the project: server host and ports, HE, admin users
      hospitals/<name>.yaml    one file per hospital: GPUs, data, privacy, allowed jobs

``load_site_configs`` reads them into ``SiteConfigs``; every rule a FLARE provisioning
run or a hospital's policy would trip over later is checked here first, and each error
names the file, the field, the value and the fix. Names follow FLARE's participant-name
rules (nvflare.apis.utils.format_check), repeated here so this module stays FLARE-free.

One module (~640 lines): one typed, validated schema for every site_configs file, each field
with its own error text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hospital_fl.errors import InputError
from hospital_fl.privacy.config import ACCOUNTANTS

__all__ = [
    "ADMIN_ROLES",
    "JOB_TYPES",
    "PRIVACY_SCOPES",
    "CONSORTIUM_FILE",
    "HOSPITALS_DIR",
    "AdminConfig",
    "ConsortiumConfig",
    "ResourceConfig",
    "PrivacyConfig",
    "HospitalConfig",
    "SiteConfigs",
    "consortium_from_dict",
    "hospital_from_dict",
    "load_consortium",
    "load_hospital",
    "load_site_configs",
]

ADMIN_ROLES = ("project_admin", "org_admin", "lead", "member")  # FLARE's roles (nvflare.lighter.constants)
JOB_TYPES = ("cxr", "segmentation", "profile")
# A hospital's default FLARE privacy scope: "dp_required" refuses any job without site-side DP;
# "public" also runs non-DP jobs (still recorded against the budget when they are DP).
PRIVACY_SCOPES = ("dp_required", "public")
CONSORTIUM_FILE = "consortium.yaml"
HOSPITALS_DIR = "hospitals"

# FLARE's name rules (nvflare.apis.utils.format_check.type_pattern_mapping)
_HOST = r"^(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])$"
_CLIENT = r"^[A-Za-z0-9-_]+$"
_ORG = r"^[A-Za-z0-9_]+$"
_EMAIL = r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Z|a-z]{2,}$"
# The project name names FLARE's workspace folder and its root CA (a certificate CN: <= 63 chars).
_PROJECT = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
# A Docker image reference: [registry[:port]/]path[:tag][@sha256:digest]
_COMPONENT = r"[a-z0-9]([a-z0-9._-]*[a-z0-9])?"
_IMAGE = rf"^{_COMPONENT}(:[0-9]+)?(/{_COMPONENT})*(:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?(@sha256:[0-9a-f]{{64}})?$"
# data_root is written into the kit's docker.sh: an absolute path without shell metacharacters.
_DATA_ROOT = r"^/[A-Za-z0-9._/+@=,-]*$"


class _Missing:
    def __repr__(self) -> str:
        return "nothing"


_MISSING = _Missing()


def _at(source: str, name: str) -> str:
    """``file: field`` at the top of a file, ``file: block.field`` inside a block."""
    return f"{source}.{name}" if ": " in source else f"{source}: {name}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _number_error(where: str, value: object, rule: str, example: str) -> InputError:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:  # PyYAML reads 1e-5 (no dot) as text
            return InputError(where, value, f"{rule}; YAML read it as text, not a number", f"write it as {example}")
    return InputError(where, value, rule, f"use e.g. {example}")


def _check_name(where: str, value: object, pattern: str, rule: str, fix: str) -> None:
    if not isinstance(value, str) or not re.match(pattern, value):
        raise InputError(where, value, rule, fix)


def _check_port(where: str, value: object, example: str) -> None:
    if not _is_int(value) or not 1 <= value <= 65535:
        raise _number_error(where, value, "a port must be an integer in 1..65535", example)


def _check_epsilon(where: str, value: object) -> None:
    if not _is_number(value) or value <= 0:
        raise _number_error(where, value, "epsilon must be a number > 0", "8.0")


def _as_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class AdminConfig:
    """One admin user of the consortium (a FLARE admin participant and its kit).

    Attributes:
        email: the user's login name in FLARE.
        org: the user's organisation (FLARE org name: letters, digits, ``_``).
        role: one of ADMIN_ROLES.
    """

    email: str
    org: str
    role: str
    source: str = field(default="admin", compare=False, repr=False)

    def __post_init__(self):
        _check_name(
            _at(self.source, "email"),
            self.email,
            _EMAIL,
            "an admin is named by an email address (FLARE's admin-name rule)",
            "use e.g. admin@hospital-a.org",
        )
        _check_name(
            _at(self.source, "org"),
            self.org,
            _ORG,
            "an org name may hold only letters, digits and _ (FLARE's org-name rule)",
            "use e.g. hospital_a",
        )
        if self.role not in ADMIN_ROLES:
            raise InputError(
                _at(self.source, "role"),
                self.role,
                f"it must be one of FLARE's admin roles {', '.join(ADMIN_ROLES)}",
                "use lead for a user who submits jobs, org_admin for a hospital's IT admin",
            )


@dataclass(frozen=True)
class ConsortiumConfig:
    """The FLARE project: its server, its transport and its admin users.

    Attributes:
        name: the project name (names the root CA and FLARE's workspace folder).
        server_host: the host name clients and admins reach the server at; it is also the
            server's participant name and certificate CN.
        server_org: the organisation running the server.
        fl_port: the server's port for clients.
        admin_port: the server's port for admin consoles; differs from fl_port.
        he: give every hospital a TenSEAL CKKS context (secret key at the sites only) and
            sign the kits, for aggregation on encrypted updates.
        admins: the admin users; at least one project_admin.
        description: free text kept in project.yml.
    """

    name: str
    server_host: str
    server_org: str
    fl_port: int
    admin_port: int
    he: bool
    admins: tuple[AdminConfig, ...]
    description: str = ""
    source: str = field(default=CONSORTIUM_FILE, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "admins", _as_tuple(self.admins))
        src = self.source
        _check_name(
            _at(src, "name"),
            self.name,
            _PROJECT,
            "a project name is 1-63 letters, digits, _ or - starting with a letter or digit",
            "use e.g. chest_xray_consortium",
        )
        _check_name(
            _at(src, "server_host"),
            self.server_host,
            _HOST,
            "it must be a host name (letters, digits, - and dots) that clients can resolve",
            "use the server's fully qualified domain name, e.g. fl.consortium.org, or localhost",
        )
        if len(self.server_host) > 63:
            raise InputError(
                _at(src, "server_host"),
                self.server_host,
                "it names the server's certificate (CN) and must be at most 63 characters",
                "use a shorter host name or alias",
            )
        _check_name(
            _at(src, "server_org"),
            self.server_org,
            _ORG,
            "an org name may hold only letters, digits and _ (FLARE's org-name rule)",
            "use e.g. consortium",
        )
        _check_port(_at(src, "fl_port"), self.fl_port, "8002")
        _check_port(_at(src, "admin_port"), self.admin_port, "8003")
        if self.admin_port == self.fl_port:
            raise InputError(
                _at(src, "admin_port"),
                self.admin_port,
                f"it equals fl_port ({self.fl_port}); the server listens for admins on its own port",
                f"use another port, e.g. {self.fl_port + 1 if self.fl_port < 65535 else self.fl_port - 1}",
            )
        if not isinstance(self.he, bool):
            raise InputError(_at(src, "he"), self.he, "it must be true or false", "use true to provision HE contexts")
        if not isinstance(self.description, str):
            raise InputError(_at(src, "description"), self.description, "it must be text", "quote it")
        if not isinstance(self.admins, tuple) or not self.admins:
            raise InputError(
                _at(src, "admins"),
                self.admins,
                "the consortium needs a list of admin users",
                "add admins: [{email: admin@consortium.org, org: consortium, role: project_admin}]",
            )
        seen: dict[str, int] = {}
        for i, admin in enumerate(self.admins):
            if not isinstance(admin, AdminConfig):
                raise InputError(f"{_at(src, 'admins')}[{i}]", admin, "it must be an admin entry", "see the example")
            if admin.email in seen:
                raise InputError(
                    f"{_at(src, 'admins')}[{i}].email",
                    admin.email,
                    f"admins[{seen[admin.email]}] has the same email; each admin gets one kit",
                    "remove the duplicate or correct the address",
                )
            seen[admin.email] = i
        if not any(a.role == "project_admin" for a in self.admins):
            raise InputError(
                _at(src, "admins"),
                [a.email for a in self.admins],
                "no admin has the role project_admin, so nobody could operate the consortium",
                "give the consortium operator role: project_admin",
            )


@dataclass(frozen=True)
class ResourceConfig:
    """What a hospital offers FLARE jobs (FLARE's GPUResourceManager arguments).

    Attributes:
        num_of_gpus: GPUs jobs may reserve (0 for a CPU-only site).
        mem_per_gpu_in_GiB: memory jobs may reserve on each GPU.
    """

    num_of_gpus: int
    mem_per_gpu_in_GiB: float
    source: str = field(default="resources", compare=False, repr=False)

    def __post_init__(self):
        if not _is_int(self.num_of_gpus) or self.num_of_gpus < 0:
            raise _number_error(_at(self.source, "num_of_gpus"), self.num_of_gpus, "it must be an integer >= 0", "1")
        if not _is_number(self.mem_per_gpu_in_GiB) or self.mem_per_gpu_in_GiB < 0:
            raise _number_error(
                _at(self.source, "mem_per_gpu_in_GiB"), self.mem_per_gpu_in_GiB, "it must be a number >= 0", "16"
            )


@dataclass(frozen=True)
class PrivacyConfig:
    """A hospital's privacy policy, written into its kit by provisioning.

    Attributes:
        scope: the site's default FLARE privacy scope, one of PRIVACY_SCOPES.
        lifetime_epsilon: the most all jobs together may ever spend at this site.
        max_job_epsilon: the most one job may spend (<= lifetime_epsilon).
        delta: the delta at which budgets are reported, in (0, 1).
        accountant: "rdp" or "prv".
        min_aggregate_sites: under HE, the site decrypts an aggregate only when it sums at
            least this many hospitals (or every hospital of a smaller consortium); >= 2.
    """

    scope: str
    lifetime_epsilon: float
    max_job_epsilon: float
    delta: float
    accountant: str = "rdp"
    min_aggregate_sites: int = 3
    source: str = field(default="privacy", compare=False, repr=False)

    @property
    def require_dp(self) -> bool:
        return self.scope == "dp_required"

    def __post_init__(self):
        src = self.source
        if self.scope not in PRIVACY_SCOPES:
            raise InputError(
                _at(src, "scope"),
                self.scope,
                f"it must be one of {', '.join(PRIVACY_SCOPES)}",
                "use dp_required to refuse jobs without differential privacy",
            )
        _check_epsilon(_at(src, "lifetime_epsilon"), self.lifetime_epsilon)
        _check_epsilon(_at(src, "max_job_epsilon"), self.max_job_epsilon)
        if self.max_job_epsilon > self.lifetime_epsilon:
            raise InputError(
                _at(src, "max_job_epsilon"),
                self.max_job_epsilon,
                f"it exceeds lifetime_epsilon ({self.lifetime_epsilon}); one job cannot spend more than the site's "
                "whole budget",
                "lower max_job_epsilon or raise lifetime_epsilon",
            )
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            raise _number_error(_at(src, "delta"), self.delta, "delta must lie in (0, 1)", "1.0e-5")
        if self.accountant not in ACCOUNTANTS:
            raise InputError(_at(src, "accountant"), self.accountant, f"it must be one of {ACCOUNTANTS}", "use rdp")
        if not _is_int(self.min_aggregate_sites) or self.min_aggregate_sites < 2:
            raise _number_error(
                _at(src, "min_aggregate_sites"),
                self.min_aggregate_sites,
                "it must be an integer >= 2 (an aggregate of one hospital is that hospital's update)",
                "3",
            )


@dataclass(frozen=True)
class HospitalConfig:
    """One hospital: a FLARE client with its GPUs, data, privacy and allowed jobs.

    Attributes:
        name: the FLARE client name (letters, digits, - and _), unique in the consortium.
        org: the hospital's organisation (letters, digits and _).
        gpus: GPUs in the hospital's FL server.
        gpu_memory_gb: memory of each of those GPUs.
        data_root: absolute host folder with the site's data, mounted read-only at /data
            by the kit's startup/docker.sh.
        image: the Docker image the site runs (docker/), e.g. hospital-fl-site:0.1.0.
        resources: what FLARE jobs may reserve (at most the hardware above).
        privacy: the site's privacy policy.
        allowed_job_types: the kinds of job the site accepts, among JOB_TYPES.
        declared_images: the training images the consortium agrees this hospital holds
            (optional); the server never weights the site's updates above it.
    """

    name: str
    org: str
    gpus: int
    gpu_memory_gb: float
    data_root: str
    image: str
    resources: ResourceConfig
    privacy: PrivacyConfig
    allowed_job_types: tuple[str, ...]
    declared_images: int | None = None
    source: str = field(default="hospital", compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "allowed_job_types", _as_tuple(self.allowed_job_types))
        src = self.source
        _check_name(
            _at(src, "name"),
            self.name,
            _CLIENT,
            "a site name may hold only letters, digits, - and _ (FLARE's client-name rule)",
            "use e.g. hospital-a",
        )
        _check_name(
            _at(src, "org"),
            self.org,
            _ORG,
            "an org name may hold only letters, digits and _ (FLARE's org-name rule)",
            "use e.g. hospital_a",
        )
        if not _is_int(self.gpus) or self.gpus < 0:
            raise _number_error(_at(src, "gpus"), self.gpus, "it must be an integer >= 0", "1")
        if self.declared_images is not None and (not _is_int(self.declared_images) or self.declared_images < 1):
            raise _number_error(
                _at(src, "declared_images"),
                self.declared_images,
                "it must be a positive integer (the training images the consortium agreed on)",
                "1200",
            )
        if not _is_number(self.gpu_memory_gb) or self.gpu_memory_gb < 0:
            raise _number_error(_at(src, "gpu_memory_gb"), self.gpu_memory_gb, "it must be a number >= 0", "24")
        if not isinstance(self.data_root, str) or not re.match(_DATA_ROOT, self.data_root):
            raise InputError(
                _at(src, "data_root"),
                self.data_root,
                "it must be an absolute path of letters, digits and ._/+@=,- (it goes into the kit's docker.sh)",
                "use e.g. /data/hospital-a",
            )
        if not isinstance(self.image, str) or not re.match(_IMAGE, self.image):
            raise InputError(
                _at(src, "image"),
                self.image,
                "it must be a Docker image reference in lower case, [registry/]name[:tag]",
                "use e.g. registry.hospital-a.org/hospital-fl-site:0.1.0",
            )
        if not isinstance(self.resources, ResourceConfig):
            raise InputError(_at(src, "resources"), self.resources, "it must be a resources block", "see the example")
        if not isinstance(self.privacy, PrivacyConfig):
            raise InputError(_at(src, "privacy"), self.privacy, "it must be a privacy block", "see the example")
        if self.resources.num_of_gpus > self.gpus:
            raise InputError(
                _at(src, "resources.num_of_gpus"),
                self.resources.num_of_gpus,
                f"it exceeds the site's gpus ({self.gpus})",
                f"use at most {self.gpus}",
            )
        if self.resources.mem_per_gpu_in_GiB > self.gpu_memory_gb:
            raise InputError(
                _at(src, "resources.mem_per_gpu_in_GiB"),
                self.resources.mem_per_gpu_in_GiB,
                f"it exceeds the site's gpu_memory_gb ({self.gpu_memory_gb})",
                f"use at most {self.gpu_memory_gb}",
            )
        types = self.allowed_job_types
        if not isinstance(types, tuple) or not types:
            raise InputError(
                _at(src, "allowed_job_types"),
                types,
                f"it must be a non-empty list among {', '.join(JOB_TYPES)}",
                "use e.g. [cxr, profile]",
            )
        for i, job_type in enumerate(types):
            if job_type not in JOB_TYPES:
                raise InputError(
                    f"{_at(src, 'allowed_job_types')}[{i}]",
                    job_type,
                    f"it must be one of {', '.join(JOB_TYPES)}",
                    "remove it or correct its spelling",
                )
            if job_type in types[:i]:
                raise InputError(
                    f"{_at(src, 'allowed_job_types')}[{i}]", job_type, "it is listed twice", "remove the duplicate"
                )


@dataclass(frozen=True)
class SiteConfigs:
    """The whole consortium: the project and its hospitals (names unique, none named as the server)."""

    consortium: ConsortiumConfig
    hospitals: tuple[HospitalConfig, ...]

    def __post_init__(self):
        object.__setattr__(self, "hospitals", _as_tuple(self.hospitals))
        if not self.hospitals:
            raise InputError(
                HOSPITALS_DIR,
                [],
                "the consortium has no hospital",
                f"add one {HOSPITALS_DIR}/<name>.yaml per hospital",
            )
        seen: dict[str, HospitalConfig] = {}
        for hospital in self.hospitals:
            where = _at(hospital.source, "name")
            if hospital.name in seen:
                raise InputError(
                    where,
                    hospital.name,
                    f"{seen[hospital.name].source} already uses this name; FLARE participant names must be unique",
                    "give each hospital its own name",
                )
            if hospital.name == self.consortium.server_host:
                raise InputError(
                    where,
                    hospital.name,
                    f"it is the server's name ({self.consortium.source}: server_host); "
                    "FLARE participant names must be unique",
                    "rename the hospital",
                )
            seen[hospital.name] = hospital


# -- reading YAML -------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        keys.add(key)
    return loader.construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> object:
    try:
        text = path.read_text()
    except FileNotFoundError as err:
        raise InputError(str(path), "no such file", "the site config is missing", f"create {path}") from err
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as err:
        raise InputError(
            f"{path}: {err.key}", f"line {err.line}", "the field is given twice in one block", "keep one"
        ) from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark is not None else "the file"
        raise InputError(str(path), line, f"it is not valid YAML ({getattr(err, 'problem', err)})", "fix it") from err


def _fields(data: object, source: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    allowed = required + optional
    if not isinstance(data, dict):
        raise InputError(source, data, "it must be a mapping of field: value", f"use the fields {', '.join(allowed)}")
    unknown = sorted((k for k in data if k not in allowed), key=str)
    if unknown:
        raise InputError(
            _at(source, str(unknown[0])),
            data[unknown[0]],
            f"unknown field; allowed: {', '.join(allowed)}",
            "remove it or correct its spelling",
        )
    for name in required:
        if name not in data:
            raise InputError(_at(source, name), _MISSING, "the field is required", f"add {name}: <value>")
    return dict(data)


def consortium_from_dict(data: object, source: str = CONSORTIUM_FILE) -> ConsortiumConfig:
    """Build and validate a ConsortiumConfig from a parsed consortium.yaml."""
    values = _fields(
        data,
        source,
        ("name", "server_host", "server_org", "fl_port", "admin_port", "he", "admins"),
        ("description",),
    )
    admins = values["admins"]
    if isinstance(admins, list):
        blocks = [f"{_at(source, 'admins')}[{i}]" for i in range(len(admins))]
        values["admins"] = tuple(
            AdminConfig(**_fields(a, where, ("email", "org", "role")), source=where) for a, where in zip(admins, blocks)
        )
    return ConsortiumConfig(**values, source=source)


def hospital_from_dict(data: object, source: str = "hospital") -> HospitalConfig:
    """Build and validate a HospitalConfig from a parsed hospitals/<name>.yaml."""
    values = _fields(
        data,
        source,
        (
            "name",
            "org",
            "gpus",
            "gpu_memory_gb",
            "data_root",
            "image",
            "resources",
            "privacy",
            "allowed_job_types",
        ),
        ("declared_images",),
    )
    where = _at(source, "resources")
    values["resources"] = ResourceConfig(
        **_fields(values["resources"], where, ("num_of_gpus", "mem_per_gpu_in_GiB")), source=where
    )
    where = _at(source, "privacy")
    values["privacy"] = PrivacyConfig(
        **_fields(
            values["privacy"],
            where,
            ("scope", "lifetime_epsilon", "max_job_epsilon", "delta"),
            ("accountant", "min_aggregate_sites"),
        ),
        source=where,
    )
    return HospitalConfig(**values, source=source)


def load_consortium(path: str | Path) -> ConsortiumConfig:
    """Read and validate ``consortium.yaml``; errors name this file."""
    path = Path(path)
    return consortium_from_dict(_read_yaml(path), str(path))


def load_hospital(path: str | Path) -> HospitalConfig:
    """Read and validate one ``hospitals/<name>.yaml``; errors name this file."""
    path = Path(path)
    return hospital_from_dict(_read_yaml(path), str(path))


def load_site_configs(directory: str | Path) -> SiteConfigs:
    """Read ``directory``/consortium.yaml and every ``directory``/hospitals/*.yaml (sorted by file name).

    Raises:
        InputError: a file is missing or breaks a rule; the message names the file, the
            field, the value and the fix.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(
            "site configs folder",
            str(directory),
            "no such folder",
            f"pass the folder holding {CONSORTIUM_FILE} and {HOSPITALS_DIR}/ (e.g. site_configs)",
        )
    consortium = load_consortium(directory / CONSORTIUM_FILE)
    files = sorted([*(directory / HOSPITALS_DIR).glob("*.yaml"), *(directory / HOSPITALS_DIR).glob("*.yml")])
    if not files:
        raise InputError(
            str(directory / HOSPITALS_DIR),
            [],
            "the consortium has no hospital",
            f"add one {directory / HOSPITALS_DIR}/<name>.yaml per hospital",
        )
    return SiteConfigs(consortium, tuple(load_hospital(f) for f in files))
