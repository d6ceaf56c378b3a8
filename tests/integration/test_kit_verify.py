"""`hospital-fl kit verify` on real kits from FLARE's provisioner (the example consortium: HE on, so signed)."""

import argparse
import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
import yaml
from hospital_fl.cli import kit as cli_kit
from hospital_fl.errors import InputError
from hospital_fl.flare.kits import verify as kit_verify
from hospital_fl.flare.kits.provision import provision
from hospital_fl.flare.kits.verify import KitVerification, verify_kit
from hospital_fl.privacy import policy

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "site_configs"
PROJECT = "chest_xray_consortium"
UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    pytest.importorskip("tenseal")  # the example consortium turns HE on (pip install 'hospital-fl[he]')
    return provision(EXAMPLE, tmp_path_factory.mktemp("kits") / "out")


@pytest.fixture(scope="module")
def other_project(tmp_path_factory, kits):
    """A second consortium: the same sites under another project name, so another root CA."""
    tmp = tmp_path_factory.mktemp("other")
    configs = Path(shutil.copytree(EXAMPLE, tmp / "site_configs"))
    path = configs / "consortium.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "name": "other_consortium"}))
    return provision(configs, tmp / "out")


def _copy(kits, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(kits.out_dir / "kits" / name, tmp_path / name))


def _check(result: KitVerification, name: str):
    return next(c for c in result.checks if c.name == name)


def _failed(result: KitVerification) -> list[str]:
    return [c.name for c in result.checks if not c.ok]


def test_every_provisioned_kit_verifies(kits):
    for kit in kits.kits:
        result = verify_kit(kit.path, project=PROJECT)

        assert result.ok, [(c.name, c.detail) for c in result.checks if not c.ok]
        assert (result.kind, result.name) == ({"server": "server", "client": "client"}.get(kit.type, "admin"), kit.name)
        signed = _check(result, "signatures").detail
        if kit.type == "admin":
            assert signed == "unsigned (FLARE signs kits only with HE or CC)"
            assert "signed jobs" not in [c.name for c in result.checks]
        else:
            assert signed.startswith("startup/, local/ signed by the kit's root CA")
            assert _check(result, "signed jobs").ok
    hospital = verify_kit(kits.out_dir / "kits" / "hospital-a")
    assert "admits the bundle's job classes" in _check(hospital, "classes").detail
    assert kits.root_ca_sha256 in _check(hospital, "project").detail


def test_root_ca_of_another_project_fails_the_chain(kits, other_project, tmp_path):
    kit = _copy(kits, "hospital-a", tmp_path)
    shutil.copy(
        other_project.out_dir / "kits" / "hospital-a" / "startup" / "rootCA.pem", kit / "startup" / "rootCA.pem"
    )

    result = verify_kit(kit)

    chain = _check(result, "certificate chain")
    assert not chain.ok and "startup/client.crt was not issued by startup/rootCA.pem" in chain.detail
    assert "other_consortium" in _check(result, "project").detail  # fed_client.json still names the real one
    assert not _check(result, "signatures").ok  # signed by a key this root does not hold


def test_wrong_project_names_both(kits):
    result = verify_kit(kits.out_dir / "kits" / "hospital-b", project="other_consortium")

    project = _check(result, "project")
    assert _failed(result) == ["project"]
    assert f"the kit's root CA is project '{PROJECT}', not 'other_consortium'" in project.detail


def test_tampered_startup_config_fails_signatures(kits, tmp_path):
    kit = _copy(kits, "hospital-a", tmp_path)
    config_file = kit / "startup" / "fed_client.json"
    config = json.loads(config_file.read_text())
    config["servers"][0]["service"]["target"] = "attacker.example.org:8002"
    config_file.write_text(json.dumps(config, indent=2))

    result = verify_kit(kit)

    assert _failed(result) == ["signatures"]
    assert "startup/fed_client.json was changed after signing" in _check(result, "signatures").detail


def test_tampered_authorization_fails_signatures_only(kits, tmp_path):
    kit = _copy(kits, "hospital-b", tmp_path)
    path = kit / "local" / "authorization.json"
    authz = json.loads(path.read_text())
    authz["permissions"]["lead"]["byoc"] = "any"  # still a valid FLARE policy
    path.write_text(json.dumps(authz))

    result = verify_kit(kit)

    assert _failed(result) == ["signatures"]
    signatures = _check(result, "signatures")
    assert "local/authorization.json was changed after signing" in signatures.detail
    assert "startup/" not in signatures.detail and "re-provisioned" in signatures.fix


def test_removed_signed_file_is_named(kits, tmp_path):
    kit = _copy(kits, "hospital-c", tmp_path)
    (kit / "local" / "privacy.json").unlink()  # FLARE's folder check does not notice a removed file

    detail = _check(verify_kit(kit), "signatures").detail

    assert "local/privacy.json was signed but is missing" in detail


def test_invalid_privacy_json_fails_the_parse(kits, tmp_path):
    kit = _copy(kits, "hospital-a", tmp_path)
    (kit / "local" / "privacy.json").write_text('{"scopes": [')

    result = verify_kit(kit)

    local = _check(result, "local policies")
    assert not local.ok and "local/privacy.json is not valid JSON" in local.detail
    assert set(_failed(result)) == {"local policies", "signatures", "classes"}
    assert "so its classes are not checked" in _check(result, "classes").detail


def test_privacy_default_scope_must_be_a_scope(kits, tmp_path):
    kit = _copy(kits, "hospital-c", tmp_path)
    path = kit / "local" / "privacy.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "default_scope": "nowhere"}))

    detail = _check(verify_kit(kit), "local policies").detail

    assert "default_scope 'nowhere' is not one of its scopes ['public', 'dp_required']" in detail


def test_unknown_class_in_resources_fails_the_import_check(kits, tmp_path):
    kit = _copy(kits, "hospital-a", tmp_path)
    path = kit / "local" / "resources.json"
    resources = json.loads(path.read_text())
    resources["components"][0]["path"] = "nvflare.app_common.resource_managers.no_such_module.GPUResourceManager"
    path.write_text(json.dumps(resources))

    result = verify_kit(kit)

    classes = _check(result, "classes")
    assert not classes.ok
    assert "local/resources.json components[0].path" in classes.detail
    assert "does not import (ModuleNotFoundError" in classes.detail


def test_allow_list_that_refuses_the_bundle_fails(kits, tmp_path):
    kit = _copy(kits, "localhost", tmp_path)
    path = kit / "local" / "resources.json"
    resources = json.loads(path.read_text())
    executor = "hospital_fl.flare.executor.CXRTrainExecutor"
    resources["class_allow_list"] = [e for e in resources["class_allow_list"] if e != executor]
    path.write_text(json.dumps(resources))

    classes = _check(verify_kit(kit), "classes")

    assert not classes.ok and f"refuses ['{executor}']" in classes.detail


def test_allow_list_with_a_package_prefix_warns(kits, tmp_path):
    # kits issued before exact classes allowed "hospital_fl.", and with it every function of the package
    kit = _copy(kits, "hospital-a", tmp_path)
    path = kit / "local" / "resources.json"
    resources = json.loads(path.read_text())
    resources["class_allow_list"] = ["hospital_fl.", *resources["class_allow_list"]]
    path.write_text(json.dumps(resources))

    classes = _check(verify_kit(kit), "classes")

    assert classes.ok and classes.warn
    assert "admits more than the bundle's classes: ['hospital_fl.']" in classes.detail
    assert "list exact classes instead" in classes.fix


def test_certificates_expired_in_2100(kits):
    result = verify_kit(kits.out_dir / "kits" / "hospital-a", now=dt.datetime(2100, 1, 1))

    validity = _check(result, "validity")
    assert _failed(result) == ["validity"]
    assert "startup/rootCA.pem expired on" in validity.detail and "startup/client.crt expired on" in validity.detail
    assert "newly provisioned kit" in validity.fix


def test_certificate_close_to_expiry_warns(kits):
    from cryptography import x509

    kit = kits.out_dir / "kits" / "hospital-a"
    cert = x509.load_pem_x509_certificate((kit / "startup" / "client.crt").read_bytes())

    validity = _check(verify_kit(kit, now=cert.not_valid_after_utc - dt.timedelta(days=10)), "validity")

    assert validity.ok and validity.warn
    assert "startup/client.crt expires in 9 days" in validity.detail or "expires in 10 days" in validity.detail


def test_missing_client_key_fails_layout(kits, tmp_path):
    kit = _copy(kits, "hospital-b", tmp_path)
    (kit / "startup" / "client.key").unlink()

    result = verify_kit(kit)

    assert _check(result, "layout").detail == "client kit: startup/client.key missing"
    assert {"layout", "certificate chain", "signatures"} <= set(_failed(result))


def test_require_signed_jobs_false_fails_on_a_server(kits, tmp_path):
    kit = _copy(kits, "localhost", tmp_path)
    path = kit / "startup" / "fed_server.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "require_signed_jobs": False}))

    result = verify_kit(kit)

    assert set(_failed(result)) == {"signed jobs", "signatures"}
    assert "require_signed_jobs to false" in _check(result, "signed jobs").detail


def test_a_folder_that_is_not_a_kit_is_an_input_error(kits, tmp_path):
    with pytest.raises(InputError) as err:
        verify_kit(tmp_path)
    assert err.value.name == "kit folder" and "not a FLARE startup kit" in err.value.rule
    assert "workspace/consortium/kits/hospital-a" in err.value.fix

    with pytest.raises(InputError, match="it does not exist"):
        verify_kit(tmp_path / "nowhere")
    with pytest.raises(InputError) as err:
        verify_kit(kits.out_dir / "kits" / "hospital-a" / "startup")
    assert err.value.fix.endswith(str(kits.out_dir / "kits" / "hospital-a"))
    with pytest.raises(InputError, match="it is a file, not a folder"):
        verify_kit(kits.out_dir / "kits" / "hospital-a.zip")


def test_policy_names_match_the_privacy_module():
    assert (kit_verify.SITE_POLICY_FILE, kit_verify.SCOPE_PROPERTY) == (policy.SITE_POLICY_FILE, policy.SCOPE_PROPERTY)


# -- the command ---------------------------------------------------------------------------
def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="hospital-fl")
    cli_kit.add_kit_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kit", "verify", *argv])
    return args.func(args)


def test_cli_exit_codes_and_json(kits, tmp_path, capsys):
    kit = str(kits.out_dir / "kits" / "hospital-a")

    assert _run(kit, "--project", PROJECT) == 0
    table = capsys.readouterr().out
    assert "kit verify: hospital-a (client)" in table and "certificate chain" in table

    assert _run(kit, "--now", "2100-01-01", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["kind"] == "client" and report["name"] == "hospital-a"
    assert [c["name"] for c in report["checks"] if not c["ok"]] == ["validity"]
    assert set(report["checks"][0]) == {"name", "ok", "detail", "fix", "warn"}

    assert _run(str(tmp_path)) == 2
    assert "not a FLARE startup kit" in capsys.readouterr().err
    assert _run(kit, "--now", "next tuesday", "--json") == 2
    assert json.loads(capsys.readouterr().out)["error"]["input"] == "--now"
    assert cli_kit.parse_time("2026-01-31T12:00:00Z") == dt.datetime(2026, 1, 31, 12, tzinfo=UTC)
