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

Everything is built in a temporary sibling of ``out_dir`` and renamed into place only
once complete: a failed run leaves ``out_dir`` as it was.

``HospitalKitBuilder`` is the FLARE builder project.yml names to write each hospital's
local/ policies (authorization.json, privacy.json, hospital_fl_privacy.json, resources.json
with FLARE's GPUResourceManager and the bundle's class allow list) and a docker.sh running
the hospital's image on its data. It runs before SignatureBuilder, so with HE these files
are signed like the rest of the kit.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from nvflare.lighter.constants import CtxKey, ParticipantType, ProvFileName, TemplateSectionKey
from nvflare.lighter.prov_utils import prepare_builders, prepare_packager
from nvflare.lighter.provision import prepare_project
from nvflare.lighter.provisioner import Provisioner
from nvflare.lighter.spec import Builder, Project, ProvisionContext
from nvflare.lighter.utils import write

import hospital_fl
from hospital_fl.errors import InputError
from hospital_fl.flare.site_policy import allow_bundle_components
from hospital_fl.provisioning.project import render_project, with_gpu_resources
from hospital_fl.provisioning.schema import SiteConfigs, load_site_configs

__all__ = ["Kit", "ProvisionResult", "HospitalKitBuilder", "provision", "MANIFEST", "KITS_DIR", "STATE_DIR"]

log = logging.getLogger(__name__)

MANIFEST = "provision.json"
PROJECT_FILE = "project.yml"
KITS_DIR = "kits"
STATE_DIR = "state"
# FLARE's docker_cln_sh template mounts $MY_DATA_DIR (this default) read-only at /data.
_TEMPLATE_DATA_DIR = "/home/flclient/data"
_TEMPLATE_GPUS = "GPU2USE='--gpus=all'"  # commented out in the template


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


class HospitalKitBuilder(Builder):
    """FLARE provisioning builder that writes the hospitals' local/ policies into their kits.

    Args:
        sites: per hospital name: ``local_files`` ({file name: JSON content} for local/),
            ``resources`` (GPUResourceManager's num_of_gpus and mem_per_gpu_in_GiB),
            ``docker_image`` and ``data_root`` (for startup/docker.sh). Rendered by
            hospital_fl.provisioning.project.site_policies.
        bundle_participants: participants whose local/resources.json gets the bundle's
            class allow list (hospital_fl.flare.site_policy), so they run its jobs.
    """

    def __init__(self, sites: dict, bundle_participants: list | None = None):
        self.sites = sites
        self.bundle_participants = list(bundle_participants or [])

    def initialize(self, project: Project, ctx: ProvisionContext):
        clients = {p.name for p in project.get_clients()}
        everyone = {p.name for p in project.get_all_participants()}
        unknown = sorted(set(self.sites) - clients) + sorted(set(self.bundle_participants) - everyone)
        if unknown:
            raise ValueError(f"{type(self).__name__}: {unknown} are not participants of the project")

    def build(self, project: Project, ctx: ProvisionContext):
        for participant in project.get_all_participants():
            local = Path(ctx.get_local_dir(participant))
            if participant.name in self.bundle_participants:
                allow_bundle_components(local)
            site = self.sites.get(participant.name)
            if site is None:
                continue
            for name, content in site["local_files"].items():
                (local / name).write_text(json.dumps(content, indent=2) + "\n")
            resources_file = local / "resources.json"
            source = resources_file if resources_file.exists() else local / ProvFileName.RESOURCES_JSON_DEFAULT
            resources = with_gpu_resources(json.loads(source.read_text()), **site["resources"])
            resources_file.write_text(json.dumps(resources, indent=2) + "\n")
            self._write_docker_sh(participant, site, ctx)

    @staticmethod
    def _write_docker_sh(participant, site: dict, ctx: ProvisionContext) -> None:
        """startup/docker.sh from FLARE's own client template: the site's image, its data at /data."""
        script = ctx.build_section_from_template(
            TemplateSectionKey.DOCKER_CLIENT_SH,
            {"docker_image": site["docker_image"], "client_name": participant.subject, "org_name": participant.org},
        )
        script = _replace_once(script, f'MY_DATA_DIR:="{_TEMPLATE_DATA_DIR}"', f'MY_DATA_DIR:="{site["data_root"]}"')
        if site["resources"]["num_of_gpus"] > 0:  # the container sees the GPUs FLARE's resource manager hands out
            script = _replace_once(script, f"#{_TEMPLATE_GPUS}", _TEMPLATE_GPUS)
        write(os.path.join(ctx.get_kit_dir(participant), ProvFileName.DOCKER_SH), script, "t", exe=True)


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(f"FLARE's {TemplateSectionKey.DOCKER_CLIENT_SH} template changed: expected {old!r} once")
    return text.replace(old, new)


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
            archive = shutil.make_archive(str(kits_dir / p["name"]), "zip", root_dir=kits_dir, base_dir=p["name"])
            kits.append(
                Kit(p["name"], p["type"], p["org"], out / KITS_DIR / p["name"], out / KITS_DIR / Path(archive).name)
            )
        shutil.move(staging / "flare" / project["name"] / STATE_DIR, staging / STATE_DIR)
        shutil.rmtree(staging / "flare")
        header = "# FLARE project rendered by `hospital-fl provision` from the site configs; edit those, not this.\n"
        (staging / PROJECT_FILE).write_text(header + yaml.safe_dump(project, sort_keys=False))
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
            "kits": [
                {
                    "name": k.name,
                    "type": k.type,
                    "org": k.org,
                    "folder": f"{KITS_DIR}/{k.name}",
                    "archive": f"{KITS_DIR}/{k.archive.name}",
                    "archive_sha256": _sha256(kits_dir / k.archive.name),
                }
                for k in kits
            ],
        }
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
