"""`hospital-fl provision` with FLARE's real provisioner: signed kits with each hospital's policies."""

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from hospital_fl.errors import InputError
from hospital_fl.flare.kits import provision as provision_module
from hospital_fl.flare.kits.provision import provision
from hospital_fl.flare.kits.site_policy import BUNDLE_ALLOW_LIST
from hospital_fl.flare.provision import HospitalKitBuilder
from hospital_fl.privacy.policy import read_site_policy
from hospital_fl.provisioning.project import GPU_RESOURCE_MANAGER
from hospital_fl.provisioning.schema import load_site_configs
from nvflare.fuel.sec.authz import parse_policy_config
from nvflare.lighter.utils import verify_folder_signature

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "site_configs"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
ADMINS = ("admin@consortium.org", "lead@hospital-a.org", "it@hospital-b.org")


def _configs(tmp_path: Path, **consortium_changes) -> Path:
    configs = Path(shutil.copytree(EXAMPLE, tmp_path / "site_configs"))
    if consortium_changes:
        path = configs / "consortium.yaml"
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **consortium_changes}))
    return configs


def _verify_signed(folder: Path, root_ca: Path) -> bool:
    return verify_folder_signature(str(folder), str(root_ca), single_signer=True, signature_file="signature.json")


@pytest.fixture(scope="module")
def example_kits(tmp_path_factory):
    pytest.importorskip("tenseal")  # the example consortium turns HE on (pip install 'hospital-fl[he]')
    result = provision(EXAMPLE, tmp_path_factory.mktemp("provision") / "out")
    print(f"\nprovisioned {len(result.kits)} kits (3 hospitals, HE on) in {result.seconds:.2f} s")
    return result


def test_every_participant_gets_a_kit_and_an_archive(example_kits):
    kits = example_kits.out_dir / "kits"

    assert [k.name for k in example_kits.kits] == ["localhost", *HOSPITALS, *ADMINS]
    for kit in example_kits.kits:
        assert kit.path == kits / kit.name and (kit.path / "startup").is_dir()
        with zipfile.ZipFile(kit.archive) as archive:
            assert f"{kit.name}/startup/rootCA.pem" in archive.namelist()
    assert (kits / "localhost" / "startup" / "fed_server.json").is_file()
    assert (kits / "admin@consortium.org" / "startup" / "fed_admin.json").is_file()
    manifest = json.loads((example_kits.out_dir / "provision.json").read_text())
    assert manifest["root_ca_sha256"] == example_kits.root_ca_sha256
    assert [k["name"] for k in manifest["kits"]] == [k.name for k in example_kits.kits]
    assert yaml.safe_load(example_kits.project_file.read_text())["name"] == "chest_xray_consortium"
    assert not list(example_kits.out_dir.parent.glob(".out.*"))  # no staging folder left behind


def test_each_hospital_certificate_is_signed_by_the_kit_root_ca(example_kits):
    for name in HOSPITALS:
        startup = example_kits.out_dir / "kits" / name / "startup"
        root = x509.load_pem_x509_certificate((startup / "rootCA.pem").read_bytes())
        cert = x509.load_pem_x509_certificate((startup / "client.crt").read_bytes())

        cert.verify_directly_issued_by(root)  # raises if not
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == name
        assert (startup / "rootCA.pem").read_bytes() == (
            example_kits.out_dir / "kits" / "localhost" / "startup" / "rootCA.pem"
        ).read_bytes()


def test_startup_and_local_policies_carry_valid_signatures(example_kits):
    for name in ("localhost", *HOSPITALS):
        kit = example_kits.out_dir / "kits" / name
        root_ca = kit / "startup" / "rootCA.pem"

        assert (kit / "startup" / "signature.json").is_file()
        assert _verify_signed(kit / "startup", root_ca)
        assert _verify_signed(kit / "local", root_ca)  # our local/ policies were written before signing


def test_each_hospital_kit_carries_its_local_policies(example_kits):
    for hospital in load_site_configs(EXAMPLE).hospitals:
        local = example_kits.out_dir / "kits" / hospital.name / "local"

        resources = json.loads((local / "resources.json").read_text())
        manager = next(c for c in resources["components"] if c["id"] == "resource_manager")
        assert manager["path"] == GPU_RESOURCE_MANAGER
        assert manager["args"]["num_of_gpus"] == hospital.resources.num_of_gpus
        assert manager["args"]["mem_per_gpu_in_GiB"] == hospital.resources.mem_per_gpu_in_GiB
        assert {c["id"] for c in resources["components"]} >= {"resource_consumer", "process_launcher"}
        assert resources["class_allow_list"] == list(BUNDLE_ALLOW_LIST)  # exact classes, no package prefix

        privacy = json.loads((local / "privacy.json").read_text())
        assert privacy["default_scope"] == hospital.privacy.scope
        assert hospital.privacy.scope in [s["name"] for s in privacy["scopes"]]

        authorization = json.loads((local / "authorization.json").read_text())
        policy, error = parse_policy_config(authorization, {})
        assert policy is not None, error
        default = json.loads((local / "authorization.json.default").read_text())["permissions"]
        assert authorization["permissions"]["lead"] == {**default["lead"], "byoc": "none"}
        assert resources["app_validator"] == {
            "path": "hospital_fl.flare.job_type_gate.JobTypeValidator",
            "args": {"allowed_job_types": list(hospital.allowed_job_types), "site": hospital.name},
        }

        policy = read_site_policy(local)  # the privacy gate's own reader accepts it
        assert policy.require_dp == (hospital.privacy.scope == "dp_required")
        assert policy.max_job_epsilon == hospital.privacy.max_job_epsilon
        assert policy.lifetime_epsilon == hospital.privacy.lifetime_epsilon
        assert policy.delta == hospital.privacy.delta

        docker = (local.parent / "startup" / "docker.sh").read_text()
        assert f"DOCKER_IMAGE={hospital.image}" in docker
        assert f'MY_DATA_DIR:="{hospital.data_root}"' in docker


def test_the_server_runs_the_bundle_but_holds_no_hospital_policy(example_kits):
    local = example_kits.out_dir / "kits" / "localhost" / "local"

    assert json.loads((local / "resources.json").read_text())["class_allow_list"] == list(BUNDLE_ALLOW_LIST)
    assert not (local / "privacy.json").exists() and not (local / "hospital_fl_privacy.json").exists()


def test_with_he_only_the_hospitals_hold_the_secret_key(example_kits):
    import tenseal as ts

    kits = example_kits.out_dir / "kits"
    server = kits / "localhost" / "startup"

    assert not (server / "client_context.tenseal").exists()
    assert not ts.context_from((server / "server_context.tenseal").read_bytes()).is_private()
    for name in HOSPITALS:
        context = ts.context_from((kits / name / "startup" / "client_context.tenseal").read_bytes())
        assert context.is_private()


def test_without_he_kits_have_no_he_context_and_flare_signs_nothing(tmp_path):
    result = provision(_configs(tmp_path, he=False), tmp_path / "out")
    print(f"\nprovisioned {len(result.kits)} kits (3 hospitals, HE off) in {result.seconds:.2f} s")

    for name in ("localhost", *HOSPITALS):
        startup = result.out_dir / "kits" / name / "startup"
        assert not list(startup.glob("*.tenseal"))
        # FLARE 2.9 signs only HE and confidential-computing kits; mTLS is the trust anchor otherwise
        assert not (startup / "signature.json").exists()
    assert (result.out_dir / "kits" / "hospital-a" / "local" / "hospital_fl_privacy.json").is_file()


def test_reprovisioning_keeps_the_root_ca_and_the_existing_certificates(tmp_path):
    configs = _configs(tmp_path, he=False)
    first = provision(configs, tmp_path / "out")
    cert = (first.out_dir / "kits" / "hospital-a" / "startup" / "client.crt").read_bytes()
    new = yaml.safe_load((configs / "hospitals" / "hospital-c.yaml").read_text())
    (configs / "hospitals" / "hospital-d.yaml").write_text(yaml.safe_dump({**new, "name": "hospital-d"}))

    second = provision(configs, tmp_path / "out")

    assert second.root_ca_reused and second.root_ca_sha256 == first.root_ca_sha256
    assert (second.out_dir / "kits" / "hospital-a" / "startup" / "client.crt").read_bytes() == cert
    assert "hospital-d" in [k.name for k in second.kits]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "site_configs"]


def test_the_operators_audit_trail_records_every_run_and_kit_across_runs(tmp_path):
    from hospital_fl.audit import read_trail, verify_trail

    configs = _configs(tmp_path, he=False)
    first = provision(configs, tmp_path / "out")
    provision(configs, tmp_path / "out")  # replaces the kits, keeps the trail

    trail = first.out_dir / "audit.jsonl"
    assert verify_trail(trail).ok
    events = [(r.event, r.details.get("name")) for r in read_trail(trail)]
    one_run = [("provision.run", None), *[("kit.issued", k.name) for k in first.kits]]
    assert events == one_run + one_run
    manifest = json.loads((first.out_dir / "provision.json").read_text())
    last_kits = {r.details["name"]: r.details["archive_sha256"] for r in read_trail(trail)[-len(first.kits) :]}
    assert last_kits == {k["name"]: k["archive_sha256"] for k in manifest["kits"]}


def test_a_failed_run_leaves_no_kits_and_keeps_the_earlier_ones(tmp_path, monkeypatch):
    configs = _configs(tmp_path, he=False)

    def broken(self, project, ctx):
        raise OSError("disk full")

    monkeypatch.setattr(HospitalKitBuilder, "build", broken)
    with pytest.raises(RuntimeError, match="FLARE provisioning failed: .*disk full"):
        provision(configs, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site_configs"]

    monkeypatch.undo()
    earlier = provision(configs, tmp_path / "out")
    monkeypatch.setattr(provision_module.shutil, "make_archive", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        provision(configs, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "site_configs"]
    assert json.loads((tmp_path / "out" / "provision.json").read_text())["root_ca_sha256"] == earlier.root_ca_sha256


def test_a_folder_that_is_not_a_provisioning_result_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(InputError, match="it holds files but no provision.json"):
        provision(_configs(tmp_path, he=False), out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_the_command_prints_the_kits_made_and_the_seconds(tmp_path, capsys):
    import argparse

    from hospital_fl.cli.provision import add_provision_commands

    parser = argparse.ArgumentParser(prog="hospital-fl")
    add_provision_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["provision", "--site-configs", str(_configs(tmp_path, he=False)), "--out", str(tmp_path / "o")]
    )

    assert args.func(args) == 0

    printed = capsys.readouterr().out
    assert "chest_xray_consortium: 7 startup kits in" in printed
    assert "kits/hospital-b.zip" in printed
