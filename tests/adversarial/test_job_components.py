"""A lead who can submit jobs: a hospital builds only the component classes the bundle's jobs use.

Three functions of the package did harm when a job named them: ``provision.write`` (a file
anywhere, mode 755), ``jobs.export_recipe`` (deleted the site's privacy/ folder) and
``privacy.setup.init_site_privacy`` (a fresh ledger). Each is put where FLARE would build it (a
component, the executor, a filter, a nested argument, the server config, by ``class_path``, in a
.conf config) and deployed through FLARE's own deploy code (AppDeployer with the site's app
validators, as a provisioned site runs them): each is refused, and nothing is written or deleted.
Every shipped job still deploys. A provisioned kit's class allow list refuses them at build too,
where the old ``hospital_fl.`` prefix let FLARE build and run them (shown for real).
One real deploy refusal from provisioned kits is in tests/integration/test_kits_e2e.py.
"""

import json
import shutil
from pathlib import Path

import pytest
from hospital_fl.flare.job_type_gate import JobTypeValidator
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.privacy.setup import init_site_privacy
from hospital_fl.provisioning.schema import JOB_TYPES
from nvflare.apis.fl_constant import SiteType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeComponentError
from nvflare.apis.workspace import Workspace
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer
from nvflare.fuel.utils.class_utils import ModuleScanner
from nvflare.fuel.utils.component_builder import ComponentBuilder
from nvflare.fuel.utils.zip_utils import zip_directory_to_bytes
from nvflare.private.fed.app.fl_app_validator import FLAppValidator
from nvflare.private.fed.utils.app_authz import AppAuthzService
from nvflare.private.fed.utils.app_deployer import AppDeployer

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SITE = "site-1"
FUNCTIONS = {
    "write": "hospital_fl.flare.provision.write",
    "export_recipe": "hospital_fl.flare.recipes.cxr.export_recipe",
    "init_site_privacy": "hospital_fl.privacy.setup.init_site_privacy",
}


class Site:
    """A hospital workspace with a privacy ledger, FLARE's deployer and the site's app validators."""

    def __init__(self, root: Path):
        self.root = root
        (root / "local").mkdir(parents=True)
        (root / "startup").mkdir()
        init_site_privacy(root, SITE)
        self.ledger = {p.name: p.read_bytes() for p in (root / "privacy").iterdir()}
        self.target = root.parent / "written_by_a_job.sh"
        self.fresh = root.parent / "fresh_site"
        self.workspace = Workspace(root_dir=str(root), site_name=SITE)

    def attack(self, name: str) -> dict:
        """The component config that does ``name``'s harm at this site when FLARE builds it."""
        args = {
            "write": {"file_full_path": str(self.target), "content": "#!/bin/sh\n", "mode": "t", "exe": True},
            "export_recipe": {"recipe": "any", "name": "privacy", "jobs_dir": str(self.root)},
            "init_site_privacy": {"workspace_root": str(self.fresh), "site": SITE},
        }[name]
        return {"path": FUNCTIONS[name], "args": args}

    def deploy(self, job_dir: Path, job_id: str = "job-1") -> str | None:
        """FLARE's client-side deploy of the job's app: its error, or None when deployed."""
        meta = json.loads((job_dir / "meta.json").read_text())
        (app,) = meta["deploy_map"]
        data = zip_directory_to_bytes(str(job_dir / app), "")
        return AppDeployer().deploy(self.workspace, job_id, meta, app, data, FLContext())

    def untouched(self) -> bool:
        privacy = self.root / "privacy"
        ledger = {p.name: p.read_bytes() for p in privacy.iterdir()} if privacy.is_dir() else None
        return ledger == self.ledger and not self.target.exists() and not self.fresh.exists()


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = Site(tmp_path / SITE)
    # what FLARE's client start does with the app_validator of a provisioned resources.json
    validator = FLAppValidator(SiteType.CLIENT, custom_validators=[JobTypeValidator(list(JOB_TYPES), SITE)])
    monkeypatch.setattr(AppAuthzService, "app_validator", validator)
    return site


def _job(tmp_path: Path, name: str = "cxr_fedavg") -> Path:
    return Path(shutil.copytree(JOBS / name, tmp_path / "job" / name))


def _edit(job: Path, which: str, change) -> None:
    path = job / "app" / "config" / f"config_fed_{which}.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _as_component(config, comp):
    config["components"].append({"id": "extra", **comp})


def _as_executor(config, comp):
    config["executors"][0]["executor"] = comp


def _as_result_filter(config, comp):
    config["task_result_filters"] = [{"tasks": ["train"], "filters": [comp]}]


def _nested_in_executor_args(config, comp):
    config["executors"][0]["executor"]["args"]["model"] = comp


def _by_class_path(config, comp):
    config["components"].append({"id": "extra", "class_path": comp["path"], "args": comp["args"]})


PLACES = {
    "client component": ("client", _as_component),
    "executor": ("client", _as_executor),
    "result filter": ("client", _as_result_filter),
    "nested executor argument": ("client", _nested_in_executor_args),
    "client component by class_path": ("client", _by_class_path),
    "server component": ("server", _as_component),
}


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_a_job_naming_a_bundle_function_is_refused_at_deploy(site, tmp_path, function, place):
    which, put = PLACES[place]
    job = _job(tmp_path)
    _edit(job, which, lambda config: put(config, site.attack(function)))

    error = site.deploy(job)

    assert error and error.startswith(f"{SITE} refuses the job: component {FUNCTIONS[function]!r} at ")
    assert f"in config/config_fed_{which}.json is not an approved class; approved: " in error
    assert "hospital_fl.flare.executor.CXRTrainExecutor" in error  # the list names the approved classes
    assert error.endswith("ask the consortium to ship a job built by hospital-fl (docs/security/job-components.md)")
    assert not (site.root / "job-1").exists()  # FLARE removed the refused app
    assert site.untouched()


def test_a_config_in_another_format_flare_reads_is_checked_too(site, tmp_path):
    # FLARE's loader takes config_fed_client.conf (HOCON) when no .json is there
    job = _job(tmp_path)
    config_dir = job / "app" / "config"
    client = json.loads((config_dir / "config_fed_client.json").read_text())
    _as_component(client, site.attack("write"))
    (config_dir / "config_fed_client.json").unlink()
    (config_dir / "config_fed_client.conf").write_text(json.dumps(client))

    error = site.deploy(job)

    assert error and "provision.write' at components[1].path in config/config_fed_client.conf is not" in error
    assert site.untouched()


@pytest.mark.parametrize(
    "entry",
    [
        {"path": "hospital_fl.flare.executor.CXRTrainExecutor.execute", "args": {}},  # under an approved class
        {"name": "CXRTrainExecutor", "args": {}},  # a short name FLARE would look up
        {"path": "{EXECUTOR}", "args": {}},  # a variable FLARE would substitute
        {"path": ["hospital_fl.flare.executor.CXRTrainExecutor"], "args": {}},
    ],
)
def test_anything_but_an_exact_approved_class_path_is_refused(site, tmp_path, entry):
    job = _job(tmp_path)
    _edit(job, "client", lambda config: _as_executor(config, entry))

    error = site.deploy(job)

    assert error and "is not an approved class" in error and "at executors[0].executor." in error


def test_every_shipped_job_still_deploys(site, tmp_path):
    jobs = sorted(p.parent for p in JOBS.glob("*/meta.json"))
    assert len(jobs) >= 9

    for i, job in enumerate(jobs):
        assert site.deploy(job, f"job-{i}") is None, job.name
    assert site.untouched()


def test_the_job_type_is_still_enforced_after_the_classes_pass(site, tmp_path, monkeypatch):
    validator = FLAppValidator(SiteType.CLIENT, custom_validators=[JobTypeValidator(["segmentation"], SITE)])
    monkeypatch.setattr(AppAuthzService, "app_validator", validator)

    error = site.deploy(_job(tmp_path))

    assert error.startswith(f"{SITE} refuses the job: job type 'cxr' is not among the site's allowed_job_types")


class _Builder(ComponentBuilder):
    """FLARE's component builder, as its config processors subclass it."""

    def get_module_scanner(self):
        return ModuleScanner(["nvflare"], ["apis"], True)


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_a_provisioned_kit_refuses_the_functions_at_build_where_the_old_prefix_ran_them(site, tmp_path, function):
    # FLARE's second line at every participant (the server too): the class allow list, checked
    # by FLARE's authorizer before it builds each component, nested ones included
    authorizer = ComponentPathAuthorizer()
    component = site.attack(function)
    local = site.root / "local"

    (local / "resources.json").write_text(json.dumps({"format_version": 2, "class_allow_list": ["hospital_fl."]}))
    authorizer.authorize_component_config(component, workspace=site.workspace)  # the old policy admits it
    if function == "write":  # and FLARE then builds it: the function runs with the job's arguments
        _Builder().build_component(component)
        assert site.target.read_text() == "#!/bin/sh\n" and site.target.stat().st_mode & 0o111
        site.target.unlink()

    allow_bundle_components(local, exact=True)  # what provisioning now writes
    with pytest.raises(UnsafeComponentError, match=f"Component '{FUNCTIONS[function]}' .* is not in allow_list"):
        authorizer.authorize_component_config(component, workspace=site.workspace)
    assert site.untouched()
