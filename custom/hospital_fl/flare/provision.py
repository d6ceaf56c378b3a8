"""The FLARE provisioning builders project.yml names (their class path is its wire format).

``HospitalKitBuilder`` is the FLARE builder project.yml names to write each hospital's
local/ policies (authorization.json, privacy.json, hospital_fl_privacy.json, resources.json
with FLARE's GPUResourceManager and the bundle's class allow list) and a docker.sh running
the hospital's image on its data. It runs before SignatureBuilder, so with HE these files
are signed like the rest of the kit.

``IssuedHEContextBuilder`` gives a hospital added later the consortium's existing TenSEAL contexts.
The provisioning run itself is hospital_fl.flare.kits.provision.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nvflare.lighter.constants import ParticipantType, ProvFileName, TemplateSectionKey
from nvflare.lighter.spec import Builder, Project, ProvisionContext
from nvflare.lighter.utils import write

from hospital_fl.aggregation.weights import DECLARED_IMAGES_FILE
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.privacy.he_kit import DEFAULT_MIN_AGGREGATE_SITES, provision_kit_facts
from hospital_fl.provisioning.project import (
    with_gpu_resources,
    with_job_auditor,
    with_job_type_gate,
)

__all__ = ["HospitalKitBuilder", "IssuedHEContextBuilder"]

# FLARE's docker_cln_sh template mounts $MY_DATA_DIR (this default) read-only at /data.
_TEMPLATE_DATA_DIR = "/home/flclient/data"
_TEMPLATE_GPUS = "GPU2USE='--gpus=all'"  # commented out in the template
class HospitalKitBuilder(Builder):
    """FLARE provisioning builder that writes the hospitals' local/ policies into their kits.

    Args:
        sites: per hospital name: ``local_files`` ({file name: JSON content} for local/),
            ``resources`` (GPUResourceManager's num_of_gpus and mem_per_gpu_in_GiB),
            ``docker_image`` and ``data_root`` (for startup/docker.sh). Rendered by
            hospital_fl.provisioning.project.site_policies.
        bundle_participants: participants whose local/resources.json class allow list is
            exactly the bundle's classes (hospital_fl.flare.kits.site_policy), so they run its jobs
            and nothing else.
        hospitals: hospitals in the consortium, written into HE kits (default: this
            project's clients; more when a hospital is added to issued kits).
        declared_images: {hospital: declared image count}, written to the server kit's
            local/ (hospital_fl.aggregation.weights.DECLARED_IMAGES_FILE) for its aggregator.
    """

    def __init__(
        self,
        sites: dict,
        bundle_participants: list | None = None,
        hospitals: int | None = None,
        declared_images: dict | None = None,
    ):
        self.sites = sites
        self.declared_images = dict(declared_images or {})
        self.bundle_participants = list(bundle_participants or [])
        self.hospitals = hospitals

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
                allow_bundle_components(local, exact=True)  # the bundle's classes, nothing else
            if participant.type == ParticipantType.SERVER:
                _edit_json(local / "resources.json", with_job_auditor)
                if self.declared_images:
                    (local / DECLARED_IMAGES_FILE).write_text(json.dumps(self.declared_images, indent=2) + "\n")
            site = self.sites.get(participant.name)
            if site is None:
                continue
            for name, content in site["local_files"].items():
                (local / name).write_text(json.dumps(content, indent=2) + "\n")
            resources_file = local / "resources.json"
            source = resources_file if resources_file.exists() else local / ProvFileName.RESOURCES_JSON_DEFAULT
            resources = with_gpu_resources(json.loads(source.read_text()), **site["resources"])
            resources = with_job_type_gate(resources, site["allowed_job_types"], participant.name)
            resources_file.write_text(json.dumps(resources, indent=2) + "\n")
            self._write_docker_sh(participant, site, ctx)
        # HE: the hospitals' key id for the server, the aggregate minimum for each hospital (before signing)
        server, clients = project.get_server(), project.get_clients()
        default = DEFAULT_MIN_AGGREGATE_SITES
        minimum = {c.name: self.sites.get(c.name, {}).get("min_aggregate_sites", default) for c in clients}
        provision_kit_facts(
            Path(ctx.get_kit_dir(server)) if server else None,
            {c.name: (Path(ctx.get_kit_dir(c)), minimum[c.name]) for c in clients},
            self.hospitals or len(clients),
        )

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


class IssuedHEContextBuilder(Builder):
    """FLARE provisioning builder that gives new kits the consortium's existing TenSEAL contexts.

    Used instead of FLARE's HEBuilder when a hospital joins later: HEBuilder makes a fresh
    key pair on every run, and a hospital holding another secret key could neither decrypt
    the global model nor add to the others' ciphertexts.

    Args:
        server_context: the server kit's server_context.tenseal (no secret key).
        client_context: a hospital kit's client_context.tenseal (the hospitals' shared key).
    """

    def __init__(self, server_context: str, client_context: str):
        self.server_context = server_context
        self.client_context = client_context

    def build(self, project: Project, ctx: ProvisionContext):
        server = project.get_server()
        if server:
            shutil.copyfile(
                self.server_context, os.path.join(ctx.get_kit_dir(server), ProvFileName.SERVER_CONTEXT_TENSEAL)
            )
        for client in project.get_clients():
            shutil.copyfile(
                self.client_context, os.path.join(ctx.get_kit_dir(client), ProvFileName.CLIENT_CONTEXT_TENSEAL)
            )


def _edit_json(path: Path, edit) -> None:
    source = path if path.exists() else path.with_name(ProvFileName.RESOURCES_JSON_DEFAULT)
    path.write_text(json.dumps(edit(json.loads(source.read_text())), indent=2) + "\n")


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(f"FLARE's {TemplateSectionKey.DOCKER_CLIENT_SH} template changed: expected {old!r} once")
    return text.replace(old, new)
