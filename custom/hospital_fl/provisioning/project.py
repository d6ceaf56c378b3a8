"""Site configs -> FLARE project.yml, and the local policies each hospital kit carries.

``render_project`` returns the dict of a FLARE 2.9 ``project.yml`` (api_version 3): the
server, one client per hospital (with its GPU capacity), the admin users, and FLARE's
builders in the order they must run::

    WorkspaceBuilder -> StaticFileBuilder (grpc) -> CertBuilder -> [HEBuilder]
        -> HospitalKitBuilder -> SignatureBuilder

HospitalKitBuilder (hospital_fl.flare.provision) writes each hospital's local/ policies,
which this module renders as plain dicts and passes as the builder's arguments, so the
project.yml shows exactly what every kit will hold and ``nvflare provision -p project.yml``
reproduces the kits. It runs before SignatureBuilder, which with HE signs local/ too.
"""

from __future__ import annotations

import copy

from hospital_fl.aggregation.weights import DECLARED_IMAGES_FILE
from hospital_fl.privacy.he_params import CKKSParams
from hospital_fl.provisioning.schema import ConsortiumConfig, HospitalConfig, SiteConfigs

__all__ = [
    "API_VERSION",
    "SCHEME",
    "KIT_BUILDER",
    "GPU_RESOURCE_MANAGER",
    "HE_ARGS",
    "SITE_POLICY_FILES",
    "render_project",
    "authorization_policy",
    "privacy_scopes",
    "site_privacy_policy",
    "site_policies",
    "with_gpu_resources",
    "with_job_type_gate",
    "with_job_auditor",
    "JOB_AUDITOR",
    "JOB_TYPE_VALIDATOR",
]

API_VERSION = 3
SCHEME = "grpc"
KIT_BUILDER = "hospital_fl.flare.provision.HospitalKitBuilder"
GPU_RESOURCE_MANAGER = "nvflare.app_common.resource_managers.gpu_resource_manager.GPUResourceManager"
JOB_AUDITOR = "hospital_fl.flare.job_audit.JobAuditor"
JOB_TYPE_VALIDATOR = "hospital_fl.flare.job_type_gate.JobTypeValidator"
GPU_RESOURCE_CONSUMER = "nvflare.app_common.resource_consumers.gpu_resource_consumer.GPUResourceConsumer"
# The CKKS parameters the bundle's HE jobs pack updates for (hospital_fl.privacy.he_params),
# written out so project.yml states them; FLARE's HEBuilder makes the contexts.
HE_ARGS = CKKSParams().builder_args() | {"scheme": "CKKS"}
# The files HospitalKitBuilder writes into each hospital kit's local/ (resources.json apart).
SITE_POLICY_FILES = ("authorization.json", "privacy.json", "hospital_fl_privacy.json")
LEDGER = "privacy/ledger.json"  # relative to the site's workspace (the kit root)

# FLARE 2.9's default site authorization (master_template.yml: default_authz), except that
# leads and org admins may not run BYOC code at the site: this bundle's jobs ship none (sites
# run the installed package). The project admin keeps every right, as in FLARE's default.
_PERMISSIONS = {
    "project_admin": "any",
    "org_admin": {
        "submit_job": "none",
        "clone_job": "none",
        "manage_job": "o:submitter",
        "download_job": "o:submitter",
        "view": "any",
        "operate": "o:site",
        "shell_commands": "o:site",
        "byoc": "none",
        "server-predeployed-flwr": "none",
    },
    "lead": {
        "submit_job": "any",
        "clone_job": "n:submitter",
        "manage_job": "n:submitter",
        "download_job": "n:submitter",
        "view": "any",
        "operate": "o:site",
        "shell_commands": "o:site",
        "byoc": "none",
        "server-predeployed-flwr": "none",
    },
    "member": {"view": "any"},
}


def authorization_policy(hospital: HospitalConfig) -> dict:
    """The hospital's local/authorization.json: FLARE's default role rights, BYOC off for leads.

    FLARE's rights have no notion of a job type: the site's allowed job types are enforced
    by the app validator in its resources.json (with_job_type_gate).
    """
    return {"format_version": "1.0", "permissions": copy.deepcopy(_PERMISSIONS)}


def _scope(name: str) -> dict:
    # hospital_fl.privacy.policy.SCOPE_PROPERTY: a scope can only tighten the site policy.
    return {"name": name, "properties": {"hospital_fl_privacy": {"require_dp": name == "dp_required"}}}


def privacy_scopes(hospital: HospitalConfig) -> dict:
    """The hospital's local/privacy.json: FLARE privacy scopes, the site's own scope the default.

    A "dp_required" site defines only that scope, so FLARE refuses a job naming any other;
    a "public" site also accepts jobs submitted with the stricter "dp_required" scope. The
    scopes list no filters: the bundle's differential privacy runs inside its executor
    under the site's budget check (hospital_fl.flare.privacy_gate), and its only FLARE
    filters (hospital_fl.flare.filters) compress updates, which is no privacy measure.
    """
    names = ["dp_required"] if hospital.privacy.require_dp else ["public", "dp_required"]
    return {"scopes": [_scope(n) for n in names], "default_scope": hospital.privacy.scope}


def site_privacy_policy(hospital: HospitalConfig) -> dict:
    """The hospital's local/hospital_fl_privacy.json (hospital_fl.privacy.policy's format).

    PrivacyConfig already enforces policy_from_dict's rules, so rendering needs neither
    Opacus nor torch.
    """
    privacy = hospital.privacy
    return {
        "require_dp": privacy.require_dp,
        "max_job_epsilon": privacy.max_job_epsilon,
        "lifetime_epsilon": privacy.lifetime_epsilon,
        "delta": privacy.delta,
        "accountant": privacy.accountant,
        "ledger": LEDGER,
    }


def site_policies(hospital: HospitalConfig) -> dict:
    """What HospitalKitBuilder writes for one hospital (its ``sites`` argument entry)."""
    return {
        "local_files": {
            "authorization.json": authorization_policy(hospital),
            "privacy.json": privacy_scopes(hospital),
            "hospital_fl_privacy.json": site_privacy_policy(hospital),
            **({DECLARED_IMAGES_FILE: {hospital.name: hospital.declared_images}} if hospital.declared_images else {}),
        },
        "resources": {
            "num_of_gpus": hospital.resources.num_of_gpus,
            "mem_per_gpu_in_GiB": hospital.resources.mem_per_gpu_in_GiB,
        },
        "allowed_job_types": list(hospital.allowed_job_types),
        "min_aggregate_sites": hospital.privacy.min_aggregate_sites,  # startup/hospital_fl_he.json under HE
        "docker_image": hospital.image,
        "data_root": hospital.data_root,
    }


def with_job_auditor(resources: dict) -> dict:
    """A copy of the server's resources.json with the component that records each job
    (who submitted it, where it ran, how it ended) in the server's audit trail."""
    out = copy.deepcopy(resources)
    components = [c for c in out.get("components", []) if c.get("id") != "hospital_fl_job_auditor"]
    out["components"] = [*components, {"id": "hospital_fl_job_auditor", "path": JOB_AUDITOR, "args": {}}]
    return out


def with_job_type_gate(resources: dict, allowed_job_types: list[str], site: str) -> dict:
    """A copy of a site's resources.json whose app validator refuses jobs of other types.

    FLARE runs a site's ``app_validator`` on every app deployed there, before the job starts.
    """
    out = copy.deepcopy(resources)
    out["app_validator"] = {
        "path": JOB_TYPE_VALIDATOR,
        "args": {"allowed_job_types": list(allowed_job_types), "site": site},
    }
    return out


def with_gpu_resources(resources: dict, num_of_gpus: int, mem_per_gpu_in_GiB: float) -> dict:
    """A copy of a site's resources.json whose resource manager is FLARE's GPUResourceManager
    with these GPUs; every other setting and component is kept."""
    out = copy.deepcopy(resources)
    components = out.setdefault("components", [])
    gpu_args = {"num_of_gpus": num_of_gpus, "mem_per_gpu_in_GiB": mem_per_gpu_in_GiB}
    for component in components:
        if component.get("id") == "resource_manager":
            if component.get("path") != GPU_RESOURCE_MANAGER:
                component["path"], component["args"] = GPU_RESOURCE_MANAGER, {}
            component["args"] = {**(component.get("args") or {}), **gpu_args}
            break
    else:
        components.append({"id": "resource_manager", "path": GPU_RESOURCE_MANAGER, "args": gpu_args})
    if not any(c.get("id") == "resource_consumer" for c in components):
        components.append({"id": "resource_consumer", "path": GPU_RESOURCE_CONSUMER, "args": {}})
    return out


def _participants(consortium: ConsortiumConfig, hospitals: tuple[HospitalConfig, ...]) -> list[dict]:
    server = {
        "name": consortium.server_host,
        "type": "server",
        "org": consortium.server_org,
        "fed_learn_port": consortium.fl_port,
        "admin_port": consortium.admin_port,
    }
    clients = [
        {
            "name": h.name,
            "type": "client",
            "org": h.org,
            # FLARE renders these into the kit's resources.json.default (GPUResourceManager)
            "capacity": {
                "num_of_gpus": h.resources.num_of_gpus,
                "mem_per_gpu_in_GiB": h.resources.mem_per_gpu_in_GiB,
            },
        }
        for h in hospitals
    ]
    admins = [{"name": a.email, "type": "admin", "org": a.org, "role": a.role} for a in consortium.admins]
    return [server, *clients, *admins]


def render_project(consortium: ConsortiumConfig, hospitals: tuple[HospitalConfig, ...] | list) -> dict:
    """The FLARE project.yml (as a dict) that provisions the consortium's startup kits.

    Args:
        consortium: the project, its server and admin users.
        hospitals: every hospital; names must be unique and differ from the server's.

    Returns:
        A dict ready for ``yaml.safe_dump`` or FLARE's provisioning (nvflare.lighter).

    Raises:
        InputError: the hospitals clash (duplicate names, or one named as the server).
    """
    hospitals = SiteConfigs(consortium, tuple(hospitals)).hospitals  # validates the set
    builders: list[dict] = [
        {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
        # grpc to one server; FLARE 2.9 has no overseer (HA) to configure
        {
            "path": "nvflare.lighter.impl.static_file.StaticFileBuilder",
            "args": {"config_folder": "config", "scheme": SCHEME},
        },
        {"path": "nvflare.lighter.impl.cert.CertBuilder"},
    ]
    if consortium.he:
        builders.append({"path": "nvflare.lighter.impl.he.HEBuilder", "args": copy.deepcopy(HE_ARGS)})
    builders.append(
        {
            "path": KIT_BUILDER,
            "args": {
                "sites": {h.name: site_policies(h) for h in hospitals},
                # the server builds the bundle's aggregator and controllers from job configs too
                "bundle_participants": [consortium.server_host, *(h.name for h in hospitals)],
                # the server's aggregator never weights a hospital above its declared count
                "declared_images": {h.name: h.declared_images for h in hospitals if h.declared_images},
            },
        }
    )
    # last: it signs what the builders above wrote (startup/ and, with HE, local/)
    builders.append({"path": "nvflare.lighter.impl.signature.SignatureBuilder"})
    return {
        "api_version": API_VERSION,
        "name": consortium.name,
        "description": consortium.description or f"{consortium.name}: {len(hospitals)} hospitals",
        "participants": _participants(consortium, hospitals),
        "builders": builders,
    }
