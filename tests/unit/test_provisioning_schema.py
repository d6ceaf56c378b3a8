"""Site configs: validation errors name the file, the field, the value and the fix; the FLARE
project and the local policies rendered from them."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hospital_fl.errors import InputError
from hospital_fl.privacy.policy import policy_from_dict
from hospital_fl.provisioning.job_types import job_type_refusal, job_types_of
from hospital_fl.provisioning.project import (
    GPU_RESOURCE_MANAGER,
    JOB_TYPE_VALIDATOR,
    KIT_BUILDER,
    authorization_policy,
    privacy_scopes,
    render_project,
    site_policies,
    site_privacy_policy,
    with_gpu_resources,
    with_job_type_gate,
)
from hospital_fl.provisioning.schema import (
    AdminConfig,
    ConsortiumConfig,
    load_hospital,
    load_site_configs,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "site_configs"


@pytest.fixture
def configs(tmp_path) -> Path:
    """A copy of the example consortium to break."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "site_configs"))


def _edit(path: Path, **changes) -> None:
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del data[key]
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


_DELETE = object()


def _error(directory: Path) -> str:
    with pytest.raises(InputError) as caught:
        load_site_configs(directory)
    return str(caught.value)


# -- the example --------------------------------------------------------------------------


def test_the_example_consortium_loads():
    configs = load_site_configs(EXAMPLE)

    assert configs.consortium.server_host == "localhost"
    assert configs.consortium.fl_port != configs.consortium.admin_port
    assert [h.name for h in configs.hospitals] == ["hospital-a", "hospital-b", "hospital-c"]
    assert configs.hospitals[0].privacy.delta == 1e-5


# -- errors name file, field, value and fix -----------------------------------------------


def test_a_duplicate_site_name_names_both_files(configs):
    hospitals = configs / "hospitals"
    shutil.copy(hospitals / "hospital-a.yaml", hospitals / "hospital-a-copy.yaml")

    message = _error(configs)

    assert message == (
        f"{hospitals / 'hospital-a.yaml'}: name: got 'hospital-a'; {hospitals / 'hospital-a-copy.yaml'} already "
        "uses this name; FLARE participant names must be unique. Fix: give each hospital its own name"
    )


def test_a_hospital_named_as_the_server_is_refused(configs):
    _edit(configs / "hospitals" / "hospital-c.yaml", name="localhost")

    assert _error(configs) == (
        f"{configs / 'hospitals' / 'hospital-c.yaml'}: name: got 'localhost'; it is the server's name "
        f"({configs / 'consortium.yaml'}: server_host); FLARE participant names must be unique. Fix: rename the hospital"
    )


def test_a_port_clash_is_refused(configs):
    _edit(configs / "consortium.yaml", fl_port=8002, admin_port=8002)

    assert _error(configs) == (
        f"{configs / 'consortium.yaml'}: admin_port: got 8002; it equals fl_port (8002); the server listens for "
        "admins on its own port. Fix: use another port, e.g. 8003"
    )


def test_a_port_out_of_range_is_refused(configs):
    _edit(configs / "consortium.yaml", fl_port=70000)

    assert _error(configs) == (
        f"{configs / 'consortium.yaml'}: fl_port: got 70000; a port must be an integer in 1..65535. Fix: use e.g. 8002"
    )


def test_a_bad_role_names_the_admin_entry(configs):
    data = yaml.safe_load((configs / "consortium.yaml").read_text())
    data["admins"][1]["role"] = "owner"
    (configs / "consortium.yaml").write_text(yaml.safe_dump(data))

    assert _error(configs) == (
        f"{configs / 'consortium.yaml'}: admins[1].role: got 'owner'; it must be one of FLARE's admin roles "
        "project_admin, org_admin, lead, member. Fix: use lead for a user who submits jobs, org_admin for a "
        "hospital's IT admin"
    )


def test_a_consortium_without_a_project_admin_is_refused():
    with pytest.raises(InputError, match="no admin has the role project_admin"):
        ConsortiumConfig("p", "localhost", "consortium", 8002, 8003, False, [AdminConfig("a@b.org", "b", "lead")])


def test_a_missing_field_is_named(configs):
    _edit(configs / "hospitals" / "hospital-b.yaml", gpus=_DELETE)

    assert _error(configs) == (
        f"{configs / 'hospitals' / 'hospital-b.yaml'}: gpus: got nothing; the field is required. Fix: add gpus: <value>"
    )


def test_a_missing_field_inside_a_block_is_named(configs):
    path = configs / "hospitals" / "hospital-b.yaml"
    data = yaml.safe_load(path.read_text())
    del data["privacy"]["delta"]
    path.write_text(yaml.safe_dump(data))

    assert _error(configs) == f"{path}: privacy.delta: got nothing; the field is required. Fix: add delta: <value>"


def test_an_unknown_field_is_named(configs):
    path = configs / "hospitals" / "hospital-b.yaml"
    _edit(path, gpu=1)

    assert _error(configs) == (
        f"{path}: gpu: got 1; unknown field; allowed: name, org, gpus, gpu_memory_gb, data_root, image, resources, "
        "privacy, allowed_job_types, declared_images. Fix: remove it or correct its spelling"
    )


@pytest.mark.parametrize("field", ["max_job_epsilon", "lifetime_epsilon"])
@pytest.mark.parametrize("value", [0, -1.5])
def test_a_non_positive_epsilon_is_refused(configs, field, value):
    path = configs / "hospitals" / "hospital-a.yaml"
    data = yaml.safe_load(path.read_text())
    data["privacy"][field] = value
    path.write_text(yaml.safe_dump(data))

    assert _error(configs) == (
        f"{path}: privacy.{field}: got {value!r}; epsilon must be a number > 0. Fix: use e.g. 8.0"
    )


def test_a_job_budget_above_the_lifetime_budget_is_refused(configs):
    path = configs / "hospitals" / "hospital-a.yaml"
    data = yaml.safe_load(path.read_text())
    data["privacy"]["max_job_epsilon"] = 25.0
    path.write_text(yaml.safe_dump(data))

    assert _error(configs) == (
        f"{path}: privacy.max_job_epsilon: got 25.0; it exceeds lifetime_epsilon (20.0); one job cannot spend more "
        "than the site's whole budget. Fix: lower max_job_epsilon or raise lifetime_epsilon"
    )


def test_a_delta_yaml_reads_as_text_says_how_to_write_it(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text((EXAMPLE / "hospitals" / "hospital-a.yaml").read_text().replace("delta: 1.0e-5", "delta: 1e-5"))

    with pytest.raises(InputError) as caught:
        load_hospital(path)

    assert str(caught.value) == (
        f"{path}: privacy.delta: got '1e-5'; delta must lie in (0, 1); YAML read it as text, not a number. "
        "Fix: write it as 1.0e-5"
    )


def test_a_field_given_twice_is_refused(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text((EXAMPLE / "hospitals" / "hospital-b.yaml").read_text() + "gpus: 4\n")

    with pytest.raises(InputError) as caught:
        load_hospital(path)

    assert str(caught.value).startswith(f"{path}: gpus: got 'line ")
    assert str(caught.value).endswith("; the field is given twice in one block. Fix: keep one")


@pytest.mark.parametrize(
    "name, rule",
    [
        ("hospital a", "a site name may hold only letters, digits, - and _ (FLARE's client-name rule)"),
        ("hôpital-a", "a site name may hold only letters, digits, - and _ (FLARE's client-name rule)"),
    ],
)
def test_an_invalid_site_name_is_refused(configs, name, rule):
    path = configs / "hospitals" / "hospital-a.yaml"
    _edit(path, name=name)

    assert _error(configs) == f"{path}: name: got {name!r}; {rule}. Fix: use e.g. hospital-a"


def test_resources_above_the_hardware_are_refused(configs):
    path = configs / "hospitals" / "hospital-b.yaml"
    data = yaml.safe_load(path.read_text())
    data["resources"]["num_of_gpus"] = 2
    path.write_text(yaml.safe_dump(data))

    assert (
        _error(configs) == f"{path}: resources.num_of_gpus: got 2; it exceeds the site's gpus (1). Fix: use at most 1"
    )


def test_an_unknown_job_type_is_refused(configs):
    path = configs / "hospitals" / "hospital-b.yaml"
    _edit(path, allowed_job_types=["cxr", "genomics"])

    assert _error(configs) == (
        f"{path}: allowed_job_types[1]: got 'genomics'; it must be one of cxr, segmentation, profile. "
        "Fix: remove it or correct its spelling"
    )


def test_a_missing_consortium_file_is_named(tmp_path):
    (tmp_path / "hospitals").mkdir()

    with pytest.raises(InputError, match="consortium.yaml: got 'no such file'; the site config is missing"):
        load_site_configs(tmp_path)


# -- the rendered project -----------------------------------------------------------------


def test_the_project_is_flare_api_3_with_every_participant():
    configs = load_site_configs(EXAMPLE)

    project = render_project(configs.consortium, configs.hospitals)

    assert project["api_version"] == 3
    assert project["name"] == "chest_xray_consortium"
    server, *clients = [p for p in project["participants"] if p["type"] != "admin"]
    assert server == {
        "name": "localhost",
        "type": "server",
        "org": "consortium",
        "fed_learn_port": 8002,
        "admin_port": 8003,
    }
    assert [c["name"] for c in clients] == ["hospital-a", "hospital-b", "hospital-c"]
    assert clients[0]["capacity"] == {"num_of_gpus": 2, "mem_per_gpu_in_GiB": 72}
    admins = [(p["name"], p["role"]) for p in project["participants"] if p["type"] == "admin"]
    assert ("admin@consortium.org", "project_admin") in admins


def test_builders_run_in_flare_order_with_he_before_the_kits_are_signed():
    configs = load_site_configs(EXAMPLE)

    paths = [b["path"].rsplit(".", 1)[-1] for b in render_project(configs.consortium, configs.hospitals)["builders"]]

    assert paths == [
        "WorkspaceBuilder",
        "StaticFileBuilder",
        "CertBuilder",
        "HEBuilder",
        "HospitalKitBuilder",
        "SignatureBuilder",
    ]


def test_without_he_there_is_no_he_builder_and_grpc_is_the_scheme():
    configs = load_site_configs(EXAMPLE)
    consortium = replace(configs.consortium, he=False)

    builders = render_project(consortium, configs.hospitals)["builders"]

    assert "nvflare.lighter.impl.he.HEBuilder" not in [b["path"] for b in builders]
    static = next(b for b in builders if b["path"].endswith("StaticFileBuilder"))
    assert static["args"] == {"config_folder": "config", "scheme": "grpc"}
    kit = next(b for b in builders if b["path"] == KIT_BUILDER)
    assert sorted(kit["args"]["sites"]) == ["hospital-a", "hospital-b", "hospital-c"]
    assert kit["args"]["bundle_participants"] == ["localhost", "hospital-a", "hospital-b", "hospital-c"]


def test_each_site_privacy_policy_is_accepted_by_the_privacy_gate():
    for hospital in load_site_configs(EXAMPLE).hospitals:
        policy = policy_from_dict(site_privacy_policy(hospital), hospital.name)

        assert policy.require_dp == (hospital.privacy.scope == "dp_required")
        assert policy.max_job_epsilon == hospital.privacy.max_job_epsilon
        assert policy.lifetime_epsilon == hospital.privacy.lifetime_epsilon


def test_a_dp_required_site_defines_only_its_scope():
    a, _, c = load_site_configs(EXAMPLE).hospitals

    assert privacy_scopes(a) == {
        "scopes": [{"name": "dp_required", "properties": {"hospital_fl_privacy": {"require_dp": True}}}],
        "default_scope": "dp_required",
    }
    assert [s["name"] for s in privacy_scopes(c)["scopes"]] == ["public", "dp_required"]
    assert privacy_scopes(c)["default_scope"] == "public"


def test_authorization_turns_byoc_off():
    hospital = load_site_configs(EXAMPLE).hospitals[1]

    policy = authorization_policy(hospital)

    assert policy["format_version"] == "1.0"
    assert policy["permissions"]["lead"]["byoc"] == "none"
    assert policy["permissions"]["lead"]["submit_job"] == "any"
    assert set(policy) == {"format_version", "permissions"}


def _client_config(*executor_paths):
    return {"executors": [{"tasks": ["train"], "executor": {"path": p, "args": {}}} for p in executor_paths]}


def test_job_type_gate_refuses_types_the_site_does_not_allow():
    cxr = _client_config("hospital_fl.flare.executor.CXRTrainExecutor")
    profile = _client_config("hospital_fl.flare.profile_job.SiteProfileExecutor")
    stock = _client_config("nvflare.app_common.executors.client_api_launcher_executor.ClientAPILauncherExecutor")

    assert job_types_of(cxr) == ({"cxr"}, [])
    assert job_type_refusal(cxr, ["cxr", "profile"], "hospital-b") == ""
    assert job_type_refusal(profile, ["cxr"], "hospital-b") == (
        "hospital-b refuses the job: job type 'profile' is not among the site's allowed_job_types (cxr); "
        "submit it to other sites, or ask the site to add it to allowed_job_types in its site config and "
        "re-issue its kit"
    )
    assert "is not one of hospital_fl's job types" in job_type_refusal(stock, ["cxr", "profile", "segmentation"])
    assert "names no executor" in job_type_refusal({"executors": []}, ["cxr"])


def test_the_kit_resources_carry_the_job_type_gate():
    hospital = load_site_configs(EXAMPLE).hospitals[1]
    resources = {"format_version": 2, "components": []}

    gated = with_job_type_gate(resources, site_policies(hospital)["allowed_job_types"], hospital.name)

    assert resources == {"format_version": 2, "components": []}  # a copy
    assert gated["app_validator"] == {
        "path": JOB_TYPE_VALIDATOR,
        "args": {"allowed_job_types": ["cxr", "profile"], "site": "hospital-b"},
    }


def test_gpu_resources_replace_only_the_resource_manager_args():
    resources = {
        "format_version": 2,
        "components": [
            {
                "id": "resource_manager",
                "path": GPU_RESOURCE_MANAGER,
                "args": {"num_of_gpus": 0, "expiration_period": 300},
            },
            {"id": "process_launcher", "path": "x.Launcher", "args": {}},
        ],
    }

    out = with_gpu_resources(resources, 2, 40.0)

    assert out["components"][0]["args"] == {"num_of_gpus": 2, "mem_per_gpu_in_GiB": 40.0, "expiration_period": 300}
    assert out["components"][1] == {"id": "process_launcher", "path": "x.Launcher", "args": {}}
    assert resources["components"][0]["args"]["num_of_gpus"] == 0  # the input is left as it was


def test_the_provision_command_defaults_to_the_example_configs():
    import argparse

    from hospital_fl.cli.provision import add_provision_commands

    parser = argparse.ArgumentParser(prog="hospital-fl")
    add_provision_commands(parser.add_subparsers(dest="command"))

    args = parser.parse_args(["provision"])

    assert (args.command, args.site_configs, args.out) == ("provision", "site_configs", "workspace/consortium")
