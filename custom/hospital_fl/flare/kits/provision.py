"""Provision the consortium's startup kits with FLARE's own provisioner, in-process.

``provision(site_configs, out_dir)`` reads and validates ``site_configs/``, renders the
FLARE project (hospital_fl.provisioning.project), and runs exactly what ``nvflare
provision -p project.yml`` runs (nvflare.lighter.provision.prepare_project,
prov_utils.prepare_builders, provisioner.Provisioner). The result::

    out_dir/
      project.yml        the rendered FLARE project; `nvflare provision -p` reproduces the kits
      provision.json     what was made (kits, archives, root CA fingerprint); written last
      state/             FLARE's provisioning state: the root CA's private key. Keep it with
                         the operator, back it up, never ship it; a later run reuses it
      kits/<name>/       one startup kit per participant (server, hospitals, admins)
      kits/<name>.zip    the same kit as one archive, to hand to its participant
      audit.jsonl        hash-chained record of every run and kit issued (hospital_fl.audit)

Everything is built in a temporary sibling of ``out_dir`` and renamed into place only
once complete: a failed run leaves ``out_dir`` as it was.

The builders project.yml names live in hospital_fl.flare.provision (their class path is the
wire format of project.yml).

One module (~580 lines): provisioning and adding a site share the staging, swap-into-place and
audit steps that keep a failed run from touching issued kits.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from nvflare.lighter.constants import CtxKey, ParticipantType, ProvFileName
from nvflare.lighter.prov_utils import prepare_builders, prepare_packager
from nvflare.lighter.provision import prepare_project
from nvflare.lighter.provisioner import Provisioner

import hospital_fl
from hospital_fl.audit import AUDIT_FILE, append_event
from hospital_fl.errors import InputError
from hospital_fl.flare.provision import IssuedHEContextBuilder
from hospital_fl.provisioning.certificates import SECRET_MODE, restrict_secrets
from hospital_fl.provisioning.project import (
    KIT_BUILDER,
    render_project,
    site_policies,
)
from hospital_fl.provisioning.schema import (
    CONSORTIUM_FILE,
    SiteConfigs,
    load_consortium,
    load_hospital,
    load_site_configs,
)

__all__ = [
    "Kit",
    "ProvisionResult",
    "AddedSite",
    "provision",
    "add_site",
    "MANIFEST",
    "KITS_DIR",
    "STATE_DIR",
]

log = logging.getLogger(__name__)

MANIFEST = "provision.json"
PROJECT_FILE = "project.yml"
KITS_DIR = "kits"
STATE_DIR = "state"


@dataclass(frozen=True)
class Kit:
    """One participant's startup kit.

    Attributes:
        name: the participant (server host, hospital name or admin email).
        type: "server", "client" or "admin".
        org: the participant's organisation.
        path: the kit folder.
        archive: the kit as one zip archive (the kit folder at its top level).
    """

    name: str
    type: str
    org: str
    path: Path
    archive: Path


@dataclass(frozen=True)
class ProvisionResult:
    """What one provisioning run made.

    Attributes:
        out_dir: the folder holding the kits, project.yml, provision.json and state/.
        project: the FLARE project name.
        project_file: the rendered project.yml.
        kits: every participant's kit, server first, then hospitals, then admins.
        seconds: wall seconds the run took (reading configs to the final rename).
        he: whether the kits carry TenSEAL HE contexts (and are signed).
        root_ca_reused: whether an earlier run's root CA (out_dir/state) signed these kits.
        root_ca_sha256: SHA-256 fingerprint of the root CA certificate (hex).
    """

    out_dir: Path
    project: str
    project_file: Path
    kits: tuple[Kit, ...]
    seconds: float
    he: bool
    root_ca_reused: bool
    root_ca_sha256: str


def _check_out_dir(out: Path, project_name: str) -> Path | None:
    """The earlier run's state folder to reuse, if ``out`` holds one; refuses a foreign folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise InputError("output folder", str(out), "it is a file, not a folder", "choose a new folder for the kits")
    manifest = out / MANIFEST
    if not manifest.is_file():
        if any(out.iterdir()):
            raise InputError(
                "output folder",
                str(out),
                f"it holds files but no {MANIFEST}, so it is not an earlier provisioning result and would be replaced",
                "choose an empty or new folder",
            )
        return None
    try:
        previous = json.loads(manifest.read_text()).get("project")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as err:
        raise InputError(
            str(manifest),
            "unreadable",
            "it is not the manifest of an earlier provisioning run, so the folder is not replaced",
            "choose another output folder",
        ) from err
    if previous != project_name:
        raise InputError(
            "output folder",
            str(out),
            f"it holds the kits of project {previous!r}; provisioning {project_name!r} there would replace its root CA",
            "choose another folder, or delete this one to start a new consortium",
        )
    state = out / STATE_DIR
    return state if state.is_dir() else None


def _check_he_available(configs: SiteConfigs) -> None:
    if configs.consortium.he and importlib.util.find_spec("tenseal") is None:
        raise InputError(
            f"{configs.consortium.source}: he",
            True,
            "homomorphic encryption needs TenSEAL, which is not installed here",
            "pip install 'hospital-fl[he]', or set he: false",
        )


def _run_flare(project: dict, workspace: Path, state: Path | None) -> Path:
    """FLARE's provisioning (as `nvflare provision -p`) into ``workspace``; returns its prod folder."""
    if state is not None:
        shutil.copytree(state, workspace / project["name"] / STATE_DIR)
    project_dict = copy.deepcopy(project)  # FLARE adds keys to the dict it is given
    flare_project = prepare_project(project_dict)
    provisioner = Provisioner(str(workspace), prepare_builders(project_dict), prepare_packager(project_dict))
    ctx = provisioner.provision(flare_project, logger=log)
    if ctx.get(CtxKey.BUILD_ERROR) or not ctx.get(CtxKey.CURRENT_PROD_DIR):
        errors = "; ".join(ctx.get_errors()) or "no prod folder was made"
        raise RuntimeError(f"FLARE provisioning failed: {errors}")
    return Path(ctx[CtxKey.CURRENT_PROD_DIR])


def _root_ca_fingerprint(kit: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate((kit / "startup" / "rootCA.pem").read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def provision(site_configs_dir: str | Path, out_dir: str | Path) -> ProvisionResult:
    """Provision a startup kit per participant of the consortium in ``site_configs_dir``.

    Args:
        site_configs_dir: folder with consortium.yaml and hospitals/*.yaml.
        out_dir: where the kits go (see the module docstring); created, or replaced when
            it holds an earlier run of the same project, whose root CA is then reused.

    Returns:
        What was made, with the seconds it took.

    Raises:
        InputError: a site config breaks a rule, HE is asked for without TenSEAL, or
            ``out_dir`` holds something other than this project's kits.
        RuntimeError: FLARE's provisioning failed (nothing is left at ``out_dir``).
    """
    start = time.perf_counter()
    configs = load_site_configs(site_configs_dir)
    consortium = configs.consortium
    project = render_project(consortium, configs.hospitals)
    _check_he_available(configs)
    out = Path(out_dir).resolve()
    state = _check_out_dir(out, consortium.name)
    out.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        prod = _run_flare(project, staging / "flare", state)
        kits_dir = staging / KITS_DIR
        kits_dir.mkdir()
        kits = []
        for p in project["participants"]:
            shutil.move(prod / p["name"], kits_dir / p["name"])
            restrict_secrets(kits_dir / p["name"])  # before zipping: the archive keeps the modes
            archive = shutil.make_archive(str(kits_dir / p["name"]), "zip", root_dir=kits_dir, base_dir=p["name"])
            os.chmod(archive, SECRET_MODE)  # it holds the participant's private key
            kits.append(
                Kit(p["name"], p["type"], p["org"], out / KITS_DIR / p["name"], out / KITS_DIR / Path(archive).name)
            )
        shutil.move(staging / "flare" / project["name"] / STATE_DIR, staging / STATE_DIR)
        restrict_secrets(staging / STATE_DIR)  # cert.json: the root CA's private key
        shutil.rmtree(staging / "flare")
        (staging / PROJECT_FILE).write_text(_project_text(project))
        server = next(k for k in kits if k.type == ParticipantType.SERVER)
        fingerprint = _root_ca_fingerprint(kits_dir / server.name)
        seconds = time.perf_counter() - start
        manifest = {
            "project": consortium.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 3),
            "he": consortium.he,
            "root_ca_sha256": fingerprint,
            "root_ca_reused": state is not None,
            "hospital_fl_version": hospital_fl.__version__,
            "nvflare_version": importlib.metadata.version("nvflare"),
            "kits": [_kit_entry(k, kits_dir / k.archive.name) for k in kits],
        }
        _audit_issue(staging / AUDIT_FILE, out / AUDIT_FILE, manifest, site_configs_dir)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks a complete run
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ProvisionResult(
        out_dir=out,
        project=consortium.name,
        project_file=out / PROJECT_FILE,
        kits=tuple(kits),
        seconds=time.perf_counter() - start,
        he=consortium.he,
        root_ca_reused=state is not None,
        root_ca_sha256=fingerprint,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _audit_issue(trail: Path, earlier: Path | None, manifest: dict, site_configs_dir) -> None:
    """Append this run and every kit it issued to the operator's audit trail (carried over from
    the earlier run in the folder, so the trail outlives the kits it replaces)."""
    if earlier is not None and earlier.is_file():
        shutil.copy2(earlier, trail)
    actor = _operator()
    append_event(
        trail,
        "provision.run",
        actor,
        {
            "project": manifest["project"],
            "site_configs": str(Path(site_configs_dir).resolve()),
            "he": manifest["he"],
            "root_ca_sha256": manifest["root_ca_sha256"],
            "root_ca_reused": manifest["root_ca_reused"],
            "kits": len(manifest["kits"]),
        },
    )
    for kit in manifest["kits"]:
        append_event(trail, "kit.issued", actor, {k: kit[k] for k in ("name", "type", "org", "archive_sha256")})


def _kit_entry(kit: Kit, archive: Path) -> dict:
    return {
        "name": kit.name,
        "type": kit.type,
        "org": kit.org,
        "folder": f"{KITS_DIR}/{kit.name}",
        "archive": f"{KITS_DIR}/{kit.archive.name}",
        "archive_sha256": _sha256(archive),
    }


def _project_text(project: dict) -> str:
    header = "# FLARE project rendered by `hospital-fl provision` from the site configs; edit those, not this.\n"
    return header + yaml.safe_dump(project, sort_keys=False)


def _atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


# ---------------------------------------------------------------- adding a hospital later


@dataclass(frozen=True)
class AddedSite:
    """A hospital provisioned into an existing consortium.

    Attributes:
        kit: the new hospital's kit (folder and archive under out_dir/kits).
        out_dir: the consortium's provisioning folder.
        project: the FLARE project name.
        seconds: wall seconds the run took.
        he: whether the new kit carries the consortium's TenSEAL context.
        root_ca_sha256: fingerprint of the (existing) root CA that signed the kit.
    """

    kit: Kit
    out_dir: Path
    project: str
    seconds: float
    he: bool
    root_ca_sha256: str


def _issued(out: Path, project_name: str) -> dict:
    """The manifest of the provisioning run in ``out``; refuses a folder without one."""
    manifest_file = out / MANIFEST
    if not manifest_file.is_file():
        raise InputError(
            "provisioning folder",
            str(out),
            f"it holds no {MANIFEST}, so no consortium was provisioned there and no root CA can sign a new kit",
            "pass the --out folder of the earlier `hospital-fl provision` run, or run that first",
        )
    try:
        manifest = json.loads(manifest_file.read_text())
        manifest["project"], manifest["kits"]  # noqa: B018 - required keys
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise InputError(
            str(manifest_file), "unreadable", "it is not the manifest of a provisioning run", "restore it from backup"
        ) from err
    if manifest["project"] != project_name:
        raise InputError(
            str(manifest_file),
            manifest["project"],
            f"the kits there belong to another project than consortium.yaml's {project_name!r}",
            "pass the site configs of that consortium, or its own provisioning folder",
        )
    if not (out / STATE_DIR / "cert.json").is_file():
        raise InputError(
            str(out / STATE_DIR),
            "missing",
            "the root CA's private key (cert.json) is not there, so no kit could join the consortium",
            f"restore {out / STATE_DIR} from the operator's backup",
        )
    return manifest


def _server_participant(project: dict) -> dict:
    return next(p for p in project["participants"] if p["type"] == ParticipantType.SERVER)


def _add_site_project(issued_project: dict, new_project: dict, hospital, he_files: tuple[Path, Path] | None) -> dict:
    """The FLARE project that provisions only the new hospital (with the server it connects to)."""
    server = _server_participant(issued_project)
    fresh_server = _server_participant(new_project)
    if fresh_server != server:
        changed = sorted(k for k in {*server, *fresh_server} if server.get(k) != fresh_server.get(k))
        raise InputError(
            CONSORTIUM_FILE,
            {k: fresh_server.get(k) for k in changed},
            f"the server changed since the kits were issued ({', '.join(f'{k}: {server.get(k)!r}' for k in changed)}),"
            " so the new hospital would look for another server than the others",
            "restore those consortium.yaml values, or re-issue every kit with `hospital-fl provision`",
        )
    client = next(p for p in new_project["participants"] if p["name"] == hospital.name)
    builders = []
    for builder in new_project["builders"]:
        if builder["path"] == "nvflare.lighter.impl.he.HEBuilder":
            server_context, client_context = he_files
            builder = {
                "path": f"{IssuedHEContextBuilder.__module__}.IssuedHEContextBuilder",
                "args": {"server_context": str(server_context), "client_context": str(client_context)},
            }
        elif builder["path"] == KIT_BUILDER:
            issued = sum(p["type"] == ParticipantType.CLIENT for p in issued_project["participants"])
            builder = {
                "path": KIT_BUILDER,
                "args": {
                    "sites": {hospital.name: site_policies(hospital)},
                    "bundle_participants": [hospital.name],
                    "hospitals": issued + 1,
                },
            }
        builders.append(builder)
    return {**new_project, "participants": [server, client], "builders": builders}


def _he_context_files(out: Path, manifest: dict) -> tuple[Path, Path]:
    """The server's and the hospitals' TenSEAL contexts from the kits already issued."""
    server = next(k for k in manifest["kits"] if k["type"] == ParticipantType.SERVER)
    hospital = next((k for k in manifest["kits"] if k["type"] == ParticipantType.CLIENT), None)
    files = [out / server["folder"] / "startup" / ProvFileName.SERVER_CONTEXT_TENSEAL]
    if hospital is not None:
        files.append(out / hospital["folder"] / "startup" / ProvFileName.CLIENT_CONTEXT_TENSEAL)
    missing = [str(f) for f in files if not f.is_file()]
    if hospital is None or missing:
        raise InputError(
            "HE contexts of the issued kits",
            missing or "no hospital kit",
            "a hospital joining an HE consortium needs the hospitals' existing TenSEAL context",
            "restore the issued kits in the provisioning folder, or re-issue every kit with `hospital-fl provision`",
        )
    return files[0], files[1]


def _with_new_hospital(issued_project: dict, hospital) -> dict:
    """project.yml after the addition: `nvflare provision -p` then reproduces every kit."""
    project = copy.deepcopy(issued_project)
    participants = project["participants"]
    last_client = max(i for i, p in enumerate(participants) if p["type"] in ("server", ParticipantType.CLIENT))
    new_client = {
        "name": hospital.name,
        "type": ParticipantType.CLIENT,
        "org": hospital.org,
        "capacity": dict(site_policies(hospital)["resources"]),
    }
    participants.insert(last_client + 1, new_client)
    for builder in project["builders"]:
        if builder["path"] == KIT_BUILDER:
            builder["args"]["sites"][hospital.name] = site_policies(hospital)
            builder["args"]["bundle_participants"].append(hospital.name)
    return project


def add_site(site_configs_dir: str | Path, hospital_file: str | Path, out_dir: str | Path) -> AddedSite:
    """Provision one more hospital into the consortium provisioned in ``out_dir``.

    FLARE's dynamic provisioning: the kit is signed by the existing root CA (from
    ``out_dir``/state), so the running server accepts the hospital without a restart; with
    HE it carries the hospitals' existing TenSEAL context. Every kit already issued stays
    byte for byte as it was; project.yml and provision.json gain the hospital.

    Args:
        site_configs_dir: the folder with the consortium's consortium.yaml (the server's
            host and ports must be those the issued kits name).
        hospital_file: the new hospital's config (the hospitals/*.yaml format). Keep it in
            site_configs/hospitals/ so that a later full `provision` keeps the site.
        out_dir: the folder of the earlier `hospital-fl provision` run.

    Raises:
        InputError: a config breaks a rule, a kit with that name was already issued, the
            server settings changed, or ``out_dir`` holds no provisioning run of this project.
        RuntimeError: FLARE's provisioning failed (nothing was added).
    """
    start = time.perf_counter()
    consortium = load_consortium(Path(site_configs_dir) / CONSORTIUM_FILE)
    hospital = load_hospital(hospital_file)
    out = Path(out_dir).resolve()
    manifest = _issued(out, consortium.name)
    if hospital.name in {k["name"] for k in manifest["kits"]}:
        raise InputError(
            f"{hospital_file}: name",
            hospital.name,
            "a kit with this name was already issued; adding it again would give the site a second identity",
            "choose another name, or re-issue every kit with `hospital-fl provision`",
        )
    if bool(manifest.get("he")) != consortium.he:
        raise InputError(
            f"{Path(site_configs_dir) / CONSORTIUM_FILE}: he",
            consortium.he,
            f"the issued kits were provisioned with he: {str(bool(manifest.get('he'))).lower()}",
            "restore the he setting, or re-issue every kit with `hospital-fl provision`",
        )
    _check_he_available(SiteConfigs(consortium, (hospital,)))
    issued_text = (out / PROJECT_FILE).read_text()
    issued_project = yaml.safe_load(issued_text)
    he_files = _he_context_files(out, manifest) if consortium.he else None
    project = _add_site_project(issued_project, render_project(consortium, [hospital]), hospital, he_files)
    staging = Path(tempfile.mkdtemp(prefix=f".add-{hospital.name}.", suffix=".partial", dir=out))
    kit_dir, archive = out / KITS_DIR / hospital.name, out / KITS_DIR / f"{hospital.name}.zip"
    old_state = staging / "state.old"
    try:
        prod = _run_flare(project, staging / "flare", out / STATE_DIR)
        built = staging / hospital.name
        shutil.move(prod / hospital.name, built)
        restrict_secrets(built)  # its key and the copied HE context, before zipping
        built_archive = shutil.make_archive(
            str(staging / hospital.name), "zip", root_dir=staging, base_dir=hospital.name
        )
        os.chmod(built_archive, SECRET_MODE)
        restrict_secrets(staging / "flare" / project["name"] / STATE_DIR)
        kit = Kit(hospital.name, ParticipantType.CLIENT, hospital.org, kit_dir, archive)
        updated = _with_new_hospital(issued_project, hospital)
        position = max(i for i, k in enumerate(manifest["kits"]) if k["type"] != "admin") + 1
        new_manifest = {
            **manifest,
            "kits": [*manifest["kits"][:position], _kit_entry(kit, Path(built_archive)), *manifest["kits"][position:]],
            "added": [
                *manifest.get("added", []),
                {"name": hospital.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": 0.0},
            ],
        }
        # Commit: the kit, the state with its certificate, then project.yml, provision.json last.
        os.rename(built, kit_dir)
        os.rename(built_archive, archive)
        os.rename(out / STATE_DIR, old_state)
        os.rename(staging / "flare" / project["name"] / STATE_DIR, out / STATE_DIR)
        _atomic_write_text(out / PROJECT_FILE, _project_text(updated))
        seconds = time.perf_counter() - start
        new_manifest["added"][-1]["seconds"] = round(seconds, 3)
        _atomic_write_text(out / MANIFEST, json.dumps(new_manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(kit_dir, ignore_errors=True)
        archive.unlink(missing_ok=True)
        if old_state.exists():
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
            os.rename(old_state, out / STATE_DIR)
        if (out / PROJECT_FILE).read_text() != issued_text:
            _atomic_write_text(out / PROJECT_FILE, issued_text)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    entry = next(k for k in new_manifest["kits"] if k["name"] == hospital.name)
    details = {k: entry[k] for k in ("name", "type", "org", "archive_sha256")}
    append_event(out / AUDIT_FILE, "kit.issued", _operator(), {**details, "added_to": consortium.name})
    return AddedSite(
        kit=kit,
        out_dir=out,
        project=consortium.name,
        seconds=time.perf_counter() - start,
        he=consortium.he,
        root_ca_sha256=manifest["root_ca_sha256"],
    )
