"""`hospital-fl kit verify`: is an unpacked startup kit what the operator provisioned, and will FLARE start with it?

``verify_kit`` runs one check per table row: layout, certificate chain, validity, project,
signatures, secret file modes, local policies, classes and (server and client kits) signed jobs. Where FLARE
has its own check, it is the one used (verify_folder_signature, FLAuthorizer, the class
allow-list validation of ComponentPathAuthorizer, ModuleScanner for classes named by
"name"), so what FLARE would refuse at start is found before a hospital's IT staff start
the site.

The chain and the signatures are checked against the kit's own rootCA.pem: a kit whose
root CA was replaced and which was re-signed as a whole passes them. ``project`` (and the
root CA fingerprint in the project row, to compare with provision.json) pins the consortium.

One module (~680 lines): one check per row of the report a site's IT staff read; each check is
a short function.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from nvflare.apis.fl_exception import UnsafeComponentError
from nvflare.app_common.widgets.component_path_authorizer import (
    ALLOW_ALL,
    CLASS_ALLOW_LIST,
    CLASS_LIST_ENFORCEMENT_MODE,
    ComponentPathAuthorizer,
)
from nvflare.lighter.constants import ProvFileName
from nvflare.lighter.tool_consts import NVFLARE_SUBMITTER_CRT_FILE
from nvflare.lighter.utils import verify_content, verify_folder_signature
from nvflare.security.security import FLAuthorizer

from hospital_fl.errors import InputError
from hospital_fl.flare.kits.site_policy import BUNDLE_ALLOW_LIST, is_allowed, wider_entries
from hospital_fl.provisioning.certificates import (
    ROOT_CA,
    Credentials,
    as_utc,
    common_name,
    issuer_problems,
    key_problems,
    load_credentials,
    mode_problems,
    self_signed_problems,
    utc_text,
    validity_problems,
)

__all__ = ["KitCheck", "KitVerification", "KINDS", "WARN_DAYS", "verify_kit"]

# kind -> (startup config, certificate/key base name), as FLARE's provisioner names them
KINDS = {
    "server": ("fed_server.json", "server"),
    "client": ("fed_client.json", "client"),
    "admin": ("fed_admin.json", "client"),
}
WARN_DAYS = 30  # a certificate closer than this to expiry is reported as a warning
SIGNATURE = ProvFileName.SIGNATURE_JSON
_HE_CONTEXTS = (ProvFileName.SERVER_CONTEXT_TENSEAL, ProvFileName.CLIENT_CONTEXT_TENSEAL)
_KIT_EXAMPLE = "workspace/consortium/kits/hospital-a"
# hospital_fl.privacy.policy's names; that module is imported only when needed, as it loads torch
SITE_POLICY_FILE = "hospital_fl_privacy.json"
SCOPE_PROPERTY = "hospital_fl_privacy"
_CLASS_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")
_NAMED_LISTS = ("components", "task_data_filters", "task_result_filters")  # entries FLARE builds, "name" allowed
# FLARE's site config falls back to these when the site has not written its own file.
_FALLBACKS = {"authorization.json": "authorization.json.default", "resources.json": "resources.json.default"}
_FROM_ARCHIVE = "unpack the kit archive the consortium operator sent for this participant again"
_RESIGN = (
    "restore the file from the kit archive; a deliberate change to a signed kit must be made in the site "
    "configs and re-provisioned (hospital-fl provision), which signs it again"
)


@dataclass(frozen=True)
class KitCheck:
    """One row of the verification.

    Attributes:
        name: what was checked.
        ok: whether it passed (a warning passes).
        detail: what was found, or what is wrong.
        fix: what to do about a failure or a warning ("" when there is nothing to do).
        warn: passed, but needs attention soon (e.g. a certificate close to expiry).
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False


@dataclass(frozen=True)
class KitVerification:
    """Every check of one kit.

    Attributes:
        kit: the kit folder.
        kind: "server", "client" or "admin" (from its startup/fed_*.json).
        name: the participant, as its startup config names it (the folder name when it is unreadable).
        checks: the checks in table order.
    """

    kit: Path
    kind: str
    name: str
    checks: tuple[KitCheck, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "kit": str(self.kit),
            "kind": self.kind,
            "name": self.name,
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
        }


@dataclass(frozen=True)
class _Kit:
    """What every check needs, read once."""

    path: Path
    kind: str
    config_file: str  # "startup/fed_client.json"
    config: dict | None  # None when it does not parse
    config_error: str
    participant: str | None  # the name the startup config gives the participant
    project: str | None  # the project the startup config names
    crt: str
    key: str
    creds: Credentials


def verify_kit(kit_dir: str | Path, project: str | None = None, now: dt.datetime | None = None) -> KitVerification:
    """Check an unpacked FLARE startup kit.

    Args:
        kit_dir: the kit folder (holds startup/ and local/), e.g. workspace/consortium/kits/hospital-a.
        project: the consortium's FLARE project name; when given, the kit's root CA must be its.
        now: the time certificates are checked at; the current time when None (naive is UTC).

    Raises:
        InputError: ``kit_dir`` does not exist or is not a FLARE startup kit.
    """
    kit = _read_kit(kit_dir)
    now = as_utc(now)
    checks: list[tuple[str, Callable[[], KitCheck]]] = [
        ("layout", lambda: _check_layout(kit)),
        ("certificate chain", lambda: _check_chain(kit)),
        ("validity", lambda: _check_validity(kit, now)),
        ("project", lambda: _check_project(kit, project)),
        ("signatures", lambda: _check_signatures(kit)),
        ("secret file modes", lambda: _check_secret_modes(kit)),
        ("local policies", lambda: _check_local_policies(kit)),
        ("classes", lambda: _check_classes(kit)),
    ]
    if kit.kind != "admin":
        checks.append(("signed jobs", lambda: _check_signed_jobs(kit)))
    return KitVerification(
        kit=kit.path,
        kind=kit.kind,
        name=kit.participant or kit.path.name,
        checks=tuple(_guarded(name, check) for name, check in checks),
    )


def _guarded(name: str, check: Callable[[], KitCheck]) -> KitCheck:
    try:
        return check()
    except Exception as err:  # one broken check must not hide the others
        return KitCheck(name, False, f"the check itself failed: {type(err).__name__}: {err}", _FROM_ARCHIVE)


# -- reading the kit -----------------------------------------------------------------------
def _read_kit(kit_dir: str | Path) -> _Kit:
    path = Path(kit_dir).expanduser()
    fix = f"pass the unpacked kit folder, e.g. {_KIT_EXAMPLE}"
    if not path.exists():
        raise InputError("kit folder", str(path), "it does not exist", fix)
    if not path.is_dir():
        raise InputError(
            "kit folder",
            str(path),
            "it is a file, not a folder",
            f"unzip it and pass the folder it holds, e.g. {_KIT_EXAMPLE}",
        )
    path = path.resolve()
    kind = next((k for k, (config, _) in KINDS.items() if (path / "startup" / config).is_file()), None)
    if kind is None:
        configs = ", ".join(f"startup/{config}" for config, _ in KINDS.values())
        if path.name == "startup" and any((path / config).is_file() for config, _ in KINDS.values()):
            fix = f"pass the kit folder that holds this startup/ folder: {path.parent}"
        raise InputError("kit folder", str(path), f"it holds none of {configs}, so it is not a FLARE startup kit", fix)
    config_name, base = KINDS[kind]
    config_file = f"startup/{config_name}"
    config, error = _read_json(path / config_file, config_file)
    if config is not None and not isinstance(config, dict):
        config, error = None, f"{config_file} is not a JSON object"
    participant, project = _names(kind, config or {})
    crt, key = f"startup/{base}.crt", f"startup/{base}.key"
    return _Kit(
        path,
        kind,
        config_file,
        config,
        error,
        participant,
        project,
        crt,
        key,
        load_credentials(path, crt, key, ROOT_CA),
    )


def _read_json(path: Path, label: str) -> tuple[object, str]:
    """(data, "") or (None, what is wrong)."""
    try:
        return json.loads(path.read_text()), ""
    except FileNotFoundError:
        return None, f"{label} is missing"
    except OSError as err:
        return None, f"{label} cannot be read ({type(err).__name__}: {err})"
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{label} is not valid JSON ({err})"


def _get(data, *keys):
    """data[k1][k2]..., or None where a level is missing or of the wrong type."""
    for key in keys:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _names(kind: str, config: dict) -> tuple[str | None, str | None]:
    """(participant, project) as the startup config names them; FLARE's certificate CN is the participant."""
    if kind == "admin":
        return _get(config, "admin", "username"), _get(config, "admin", "project_name")
    project = _get(config, "servers", 0, "name")
    if kind == "server":
        target = _get(config, "servers", 0, "service", "target")
        host = target.rpartition(":")[0] if isinstance(target, str) else None
        return _get(config, "servers", 0, "admin_server") or host, project
    fqsn = _get(config, "client", "fqsn")  # "parent.child" for a client under a relay
    return (fqsn.rsplit(".", 1)[-1] if isinstance(fqsn, str) else None), project


def _organisation(kit: _Kit) -> str:
    if kit.creds.cert is None:
        return ""
    attrs = kit.creds.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(attrs[0].value) if attrs else ""


# -- the checks ----------------------------------------------------------------------------
def _check_layout(kit: _Kit) -> KitCheck:
    """The files FLARE opens at start for this kind of kit are there and readable."""
    required = [kit.crt, kit.key, ROOT_CA, kit.config_file]
    missing = [f for f in required if not (kit.path / f).is_file()]
    unreadable = [f for f in required if f not in missing and not os.access(kit.path / f, os.R_OK)]
    problems = []
    if missing:
        problems.append(f"{', '.join(missing)} missing")
    if unreadable:
        problems.append(f"{', '.join(unreadable)} not readable by this user")
    if kit.config_error and kit.config_file not in missing:
        problems.append(kit.config_error)
    if problems:
        fix = _FROM_ARCHIVE if not unreadable else f"{_FROM_ARCHIVE}, or let this user read the files"
        return KitCheck("layout", False, f"{kit.kind} kit: " + "; ".join(problems), fix)
    local = "local/ present" if (kit.path / "local").is_dir() else "no local/ (FLARE then uses its defaults)"
    return KitCheck("layout", True, f"{kit.kind} kit: {', '.join(required)} present; {local}")


def _check_chain(kit: _Kit) -> KitCheck:
    """The certificate was signed by the kit's root CA, the root signs itself, the key is the certificate's,
    and the certificate names the participant the startup config says this kit is."""
    cert, key, ca = kit.creds.cert, kit.creds.key, kit.creds.ca
    problems = list(kit.creds.problems)
    if cert is not None and ca is not None:
        problems += issuer_problems(cert, ca, kit.crt, ROOT_CA)
    if ca is not None:
        problems += self_signed_problems(ca, ROOT_CA)
    if cert is not None and key is not None:
        problems += key_problems(cert, key, kit.crt, kit.key)
    cn = common_name(cert.subject) if cert is not None else ""
    if cert is not None and kit.participant is not None and cn != kit.participant:
        problems.append(f"{kit.crt} is for {cn!r} but {kit.config_file} names the participant {kit.participant!r}")
    if problems:
        return KitCheck("certificate chain", False, "; ".join(problems), _FROM_ARCHIVE)
    org = _organisation(kit)
    return KitCheck(
        "certificate chain",
        True,
        f"CN={cn}{f' (O={org})' if org else ''} issued by the root CA CN={common_name(ca.subject)}, "
        f"which is self-signed; {kit.key} matches",
    )


def _check_validity(kit: _Kit, now: dt.datetime) -> KitCheck:
    """Root and leaf are valid at ``now``; fewer than WARN_DAYS left is a warning."""
    certs = [(ROOT_CA, kit.creds.ca), (kit.crt, kit.creds.cert)]
    if any(cert is None for _, cert in certs):
        unloaded = ", ".join(label for label, cert in certs if cert is None)
        return KitCheck("validity", False, f"{unloaded} does not load (see certificate chain)", _FROM_ARCHIVE)
    problems, soon, found = [], [], []
    for label, cert in certs:
        wrong = validity_problems(label, cert, now)
        problems += wrong
        left = cert.not_valid_after_utc - now
        found.append(f"{label} until {utc_text(cert.not_valid_after_utc)}")
        if not wrong and left < dt.timedelta(days=WARN_DAYS):
            soon.append(f"{label} expires in {left.days} days (on {utc_text(cert.not_valid_after_utc)})")
    if problems:
        expired = any(now > cert.not_valid_after_utc for _, cert in certs)
        fix = "ask the consortium operator for a newly provisioned kit" if expired else "check this machine's clock"
        return KitCheck("validity", False, "; ".join(problems), fix)
    if soon:
        return KitCheck(
            "validity", True, "; ".join(soon), "ask the consortium operator for a renewed kit before then", warn=True
        )
    return KitCheck("validity", True, f"at {utc_text(now)}: " + ", ".join(found))


def _check_project(kit: _Kit, project: str | None) -> KitCheck:
    """FLARE names the root CA after the project (CertBuilder: CN = project name)."""
    ca = kit.creds.ca
    if ca is None:
        return KitCheck("project", False, f"{ROOT_CA} does not load (see certificate chain)", _FROM_ARCHIVE)
    root = common_name(ca.subject)
    fingerprint = ca.fingerprint(hashes.SHA256()).hex()
    problems = []
    if project is not None and root != project:
        problems.append(f"the kit's root CA is project {root!r}, not {project!r}")
    if kit.project is not None and kit.project != root:
        problems.append(f"{kit.config_file} names project {kit.project!r} but {ROOT_CA} is project {root!r}")
    if problems:
        want = project or kit.project
        return KitCheck(
            "project",
            False,
            "; ".join(problems),
            f"use a kit provisioned for project {want!r} (its {ROOT_CA} has CN={want})",
        )
    tail = "" if project is not None else "; pass --project to require it"
    return KitCheck("project", True, f"project {root!r}, root CA SHA-256 {fingerprint}{tail}")


def _check_signatures(kit: _Kit) -> KitCheck:
    """FLARE's verify_folder_signature on each signed folder, with the kit's root CA.

    FLARE signs startup/ and local/ of HE kits, and the whole kit with CC; plain kits carry
    no signature.json. A signed HE kit whose signature.json went missing is a failure.
    """
    startup, local = kit.path / "startup", kit.path / "local"
    signed = [d for d in (kit.path, startup, local) if (d / SIGNATURE).is_file()]
    he = [f"startup/{n}" for n in _HE_CONTEXTS if (startup / n).is_file()]
    problems = []
    if he:
        for folder in (startup, local):
            if folder.is_dir() and folder not in signed and kit.path not in signed:
                problems.append(
                    f"{folder.name}/{SIGNATURE} is missing, but FLARE signs startup/ and local/ of every HE kit "
                    f"(this one holds {he[0]})"
                )
    if not signed and not problems:
        return KitCheck("signatures", True, "unsigned (FLARE signs kits only with HE or CC)")
    if kit.creds.ca is None:
        detail = f"{ROOT_CA} does not load, so no signature can be verified (see certificate chain)"
        return KitCheck("signatures", False, detail, _FROM_ARCHIVE)
    root_ca, public_key = kit.path / ROOT_CA, kit.creds.ca.public_key()
    for folder in signed:
        ok = verify_folder_signature(str(folder), str(root_ca), single_signer=True, signature_file=SIGNATURE)
        found = _unsigned_files(folder, kit.path, public_key)
        if not ok and not found:
            found = [f"FLARE's verify_folder_signature rejects {_rel(folder, kit.path)}/ (a symbolic link?)"]
        problems += found
    if problems:
        return KitCheck("signatures", False, "; ".join(problems), _RESIGN)
    names = ", ".join(f"{_rel(d, kit.path)}/" for d in signed)
    return KitCheck("signatures", True, f"{names} signed by the kit's root CA; every file verifies")


def _check_secret_modes(kit: _Kit) -> KitCheck:
    """Private keys and the HE secret context are readable by their owner only (0600)."""
    name = "secret file modes"
    if os.name != "posix":
        return KitCheck(name, True, "not checked: file modes are POSIX", "", warn=True)
    loose = mode_problems(kit.path)
    if loose:
        found = "; ".join(f"{path} has mode {mode}" for path, mode in loose)
        return KitCheck(
            name,
            False,
            f"{found}: a secret (private key or HE secret context) must be readable by its owner only (mode 0600)",
            "; ".join(f"chmod 600 {kit.path / path}" for path, _ in loose),
        )
    return KitCheck(name, True, "private keys and HE secret context readable by their owner only (0600)")


def _rel(path: Path, kit: Path) -> str:
    rel = path.relative_to(kit).as_posix()
    return "." if rel in ("", ".") else rel


def _unsigned_files(folder: Path, kit: Path, public_key) -> list[str]:
    """Which files fail FLARE's per-file signature rule (and which signed ones were removed, which FLARE misses)."""
    problems = []
    for root, dirs, files in os.walk(folder):
        root = Path(root)
        where = _rel(root, kit)
        prefix = "" if where == "." else f"{where}/"
        signatures, error = _read_json(root / SIGNATURE, f"{prefix}{SIGNATURE}")
        if not isinstance(signatures, dict):
            problems.append(error or f"{prefix}{SIGNATURE} is not a JSON object")
            continue
        for name in sorted(files + dirs):
            if name in (SIGNATURE, NVFLARE_SUBMITTER_CRT_FILE):
                continue
            signature = signatures.get(name)
            if not signature:
                problems.append(f"{prefix}{name} is not signed (added after signing)")
                continue
            content = name if name in dirs else (root / name).read_bytes()
            try:
                verify_content(content=content, signature=signature, public_key=public_key)
            except Exception:
                problems.append(f"{prefix}{name} was changed after signing (its signature does not verify)")
        for name in sorted(set(signatures) - set(files) - set(dirs)):
            problems.append(f"{prefix}{name} was signed but is missing")
    return problems


def _site_files(kit: _Kit) -> dict[str, Path]:
    """The local/ JSON files FLARE reads: every *.json but signature.json, plus the .default it falls back to."""
    local = kit.path / "local"
    if not local.is_dir():
        return {}
    files = {p.name: p for p in sorted(local.glob("*.json")) if p.name != SIGNATURE}
    for name, fallback in _FALLBACKS.items():
        if name not in files and (local / fallback).is_file():
            files[fallback] = local / fallback
    return files


def _check_local_policies(kit: _Kit) -> KitCheck:
    """Every local/*.json parses, and each policy passes the validator of whatever reads it."""
    files = _site_files(kit)
    if not files:
        return KitCheck("local policies", True, "no local/ policies (FLARE uses its defaults)")
    problems, found = [], []
    signature, error = _read_json(kit.path / "local" / SIGNATURE, f"local/{SIGNATURE}")
    if (kit.path / "local" / SIGNATURE).is_file() and error:
        problems.append(error)
    for name, path in files.items():
        label = f"local/{name}"
        data, error = _read_json(path, label)
        if error:
            problems.append(error)
            continue
        if name.startswith("authorization.json"):
            try:
                FLAuthorizer(_organisation(kit), data)
                found.append(f"{name} (FLARE's authorization policy)")
            except (SyntaxError, AssertionError, TypeError, ValueError) as err:
                problems.append(f"{label} is not a valid FLARE authorization policy ({err})")
        elif name == "privacy.json":
            scope_problems, summary = _privacy_problems(data, label)
            problems += scope_problems
            found.append(f"{name} ({summary})")
        elif name == SITE_POLICY_FILE:
            from hospital_fl.privacy.policy import policy_from_dict

            try:
                policy = policy_from_dict(data, label)
                found.append(f"{name} (require_dp {json.dumps(policy.require_dp)})")
            except InputError as err:
                problems.append(str(err))
        elif name.startswith("resources.json") and not isinstance(data, dict):
            problems.append(f"{label} is not a JSON object")
        else:
            found.append(name)
    if problems:
        return KitCheck(
            "local policies",
            False,
            "; ".join(problems),
            "fix the named file, or restore it from the kit archive (a signed kit must be re-provisioned to change)",
        )
    return KitCheck("local policies", True, ", ".join(found))


def _privacy_problems(data, label: str) -> tuple[list[str], str]:
    """FLARE's privacy.json rules (named, unique scopes; default_scope among them) plus the bundle's
    scope property, which must pass the site policy validator."""
    if not isinstance(data, dict):
        return [f"{label} is not a JSON object"], ""
    scopes = data.get("scopes")
    if not isinstance(scopes, list) or not scopes:
        return [f'{label} defines no scopes ("scopes": a list of {{"name": ...}} objects)'], ""
    problems, names = [], []
    for i, scope in enumerate(scopes):
        name = scope.get("name") if isinstance(scope, dict) else None
        if not isinstance(name, str) or not name:
            problems.append(f"{label}: scopes[{i}] has no name")
            continue
        if name in names:
            problems.append(f"{label}: scope {name!r} is defined twice")
        names.append(name)
        properties = scope.get("properties") or {}
        if isinstance(properties, dict) and SCOPE_PROPERTY in properties:
            from hospital_fl.privacy.policy import policy_from_dict

            try:
                policy_from_dict(properties[SCOPE_PROPERTY], f"{label}: scope {name} property {SCOPE_PROPERTY}")
            except InputError as err:
                problems.append(str(err))
    default = data.get("default_scope")
    if default is not None and default not in names:
        problems.append(f"{label}: default_scope {default!r} is not one of its scopes {names}")
    summary = f"scopes {', '.join(names)}; " + (
        f"default {default}" if default is not None else "no default_scope: jobs naming no scope get none"
    )
    return problems, summary


def _check_classes(kit: _Kit) -> KitCheck:
    """Every class the site's config names imports, and the kit's class allow list lets the bundle's jobs run.

    FLARE applies class_allow_list to job components only (server/client app runners), not to
    the site's own config, so the site's classes are checked for importing, and the allow list
    for FLARE's validity and for admitting BUNDLE_ALLOW_LIST.
    """
    sources = {f"local/{name}": path for name, path in _site_files(kit).items()}
    if kit.config is not None:
        sources[kit.config_file] = kit.path / kit.config_file
    problems, fixes, count, resources = [], {}, 0, None
    for label, path in sources.items():
        data, error = _read_json(path, label)
        if error:
            problems.append(f"{error}, so its classes are not checked")
            fixes["parse"] = "fix the file first (see local policies)"
            continue
        if label.startswith("local/resources.json"):
            resources = data
        for where, spec, by_name in _class_refs(data):
            count += 1
            problem = _name_problem(spec) if by_name else _import_problem(spec)
            if problem:
                problems.append(f"{label} {where} = {spec!r}: {problem}")
                fixes["import"] = "correct the class path (module.Class) or install the package that provides it"
    allow = _allow_list_state(resources) if kit.kind != "admin" and isinstance(resources, dict) else None
    if allow is not None and not allow.ok:
        problems.append(allow.detail)
        fixes["allow"] = allow.fix
    if problems:
        return KitCheck("classes", False, "; ".join(problems), "; ".join(fixes.values()))
    detail = f"{count} component classes import" + (f"; {allow.detail}" if allow is not None else "")
    return KitCheck("classes", True, detail, allow.fix if allow else "", warn=bool(allow and allow.warn))


def _class_refs(data, where: str = "", in_list: str = "") -> Iterator[tuple[str, str, bool]]:
    """(location, class spec, named-by-"name") of each component config, in FLARE's precedence path ->
    class_path -> name; "name" only for entries of the lists FLARE builds (elsewhere it names other things)."""
    if isinstance(data, dict):
        key = next((k for k in ("path", "class_path") if k in data), None)
        if key is not None:
            value = data[key]
            if isinstance(value, str) and _CLASS_PATH.match(value):
                yield f"{where}.{key}".lstrip("."), value, False
            elif in_list:  # a component entry whose path FLARE cannot build
                yield f"{where}.{key}".lstrip("."), str(value), False
        elif in_list and isinstance(data.get("name"), str):
            yield f"{where}.name".lstrip("."), data["name"], True
        for k, v in data.items():
            yield from _class_refs(v, f"{where}.{k}", k if k in _NAMED_LISTS and isinstance(v, list) else "")
    elif isinstance(data, list):
        for i, item in enumerate(data):
            yield from _class_refs(item, f"{where}[{i}]", in_list if isinstance(item, dict) else "")


@functools.lru_cache(maxsize=None)
def _import_problem(class_path: str) -> str:
    """ "" when module.Class imports, else why not."""
    if not _CLASS_PATH.match(class_path):
        return "not a dotted class path (module.Class)"
    module_name, _, attr = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # anything the module raises on import stops FLARE too
        return f"module {module_name} does not import ({type(err).__name__}: {err})"
    return "" if hasattr(module, attr) else f"module {module_name} has no {attr}"


@functools.lru_cache(maxsize=None)
def _name_problem(class_name: str) -> str:
    """A class named by "name" only: FLARE looks it up in its own packages (ModuleScanner)."""
    from nvflare.fuel.utils.class_utils import ModuleScanner

    try:  # the packages FLARE's site configurators scan (server_json_config.FL_PACKAGES / FL_MODULES)
        module = ModuleScanner(["nvflare"], ["apis", "app_common", "widgets"]).get_module_name(class_name)
    except Exception as err:
        return f"FLARE does not find it ({err})"
    return _import_problem(f"{module}.{class_name}")


def _allow_list_state(resources: dict) -> KitCheck:
    """The kit's class allow list, by FLARE's own validation of it, and whether it admits the bundle's jobs."""
    name = "classes"
    reprovision = (
        "re-provision with hospital-fl provision (for an unsigned kit: hospital-fl allow-components KIT/local)"
    )
    if CLASS_ALLOW_LIST not in resources:
        detail = f"no {CLASS_ALLOW_LIST}: FLARE's default list, which refuses hospital_fl job components"
        return KitCheck(name, True, detail, reprovision, warn=True)
    try:
        # FLARE's parser of the policy (nvflare is pinned to 2.9.0): types, entry syntax, enforcement mode
        allow_list, mode, _ = ComponentPathAuthorizer()._get_policy_from_resources(resources)
    except UnsafeComponentError as err:
        return KitCheck(name, False, f"local/resources.json: {err}", f"correct {CLASS_ALLOW_LIST}, or {reprovision}")
    if ALLOW_ALL in allow_list:
        detail = f"{CLASS_ALLOW_LIST} is {ALLOW_ALL!r}: jobs may build any class"
        return KitCheck(name, True, detail, f"list the allowed classes instead, or {reprovision}", warn=True)
    refused = [entry for entry in BUNDLE_ALLOW_LIST if not is_allowed(entry, allow_list)]
    wide = wider_entries(allow_list)
    if not refused and wide:  # e.g. the "hospital_fl." prefix of older kits: jobs could call its functions
        detail = f"{CLASS_ALLOW_LIST} admits more than the bundle's classes: {wide} (FLARE builds what they cover)"
        return KitCheck(name, True, detail, f"list exact classes instead; {reprovision}", warn=True)
    if not refused:
        detail = f"{CLASS_ALLOW_LIST} ({len(allow_list)} entries, {mode.value}) admits the bundle's job classes"
        return KitCheck(name, True, detail)
    if mode.value == "warn":
        detail = f"{CLASS_ALLOW_LIST} lacks {refused}; {CLASS_LIST_ENFORCEMENT_MODE} warn lets them through, logged"
        return KitCheck(name, True, detail, reprovision, warn=True)
    detail = f"local/resources.json {CLASS_ALLOW_LIST} refuses {refused}, so hospital_fl jobs cannot run here"
    return KitCheck(name, False, detail, reprovision)


def _check_signed_jobs(kit: _Kit) -> KitCheck:
    """FLARE accepts unsigned job folders only when the startup config sets require_signed_jobs to false."""
    if kit.config is None:
        return KitCheck("signed jobs", False, f"{kit.config_error} (see layout)", _FROM_ARCHIVE)
    value = kit.config.get("require_signed_jobs")
    if value is False:
        return KitCheck(
            "signed jobs",
            False,
            f"{kit.config_file} sets require_signed_jobs to false: this site accepts job folders nobody signed",
            f'remove "require_signed_jobs": false from {kit.config_file} (with rootCA.pem present FLARE then '
            "requires signed jobs)",
        )
    if value is True:
        return KitCheck("signed jobs", True, "required (require_signed_jobs: true)")
    if value is not None:
        return KitCheck(
            "signed jobs",
            True,
            f"require_signed_jobs is {value!r}, not a boolean; FLARE fails closed and requires signed jobs",
            "set it to true or remove it",
            warn=True,
        )
    return KitCheck("signed jobs", True, "required (FLARE's default for a kit with rootCA.pem)")
