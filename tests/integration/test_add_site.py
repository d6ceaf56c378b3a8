"""`hospital-fl provision add-site`: a hospital joins later, signed by the existing root CA."""

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from hospital_fl.audit import read_trail, verify_trail
from hospital_fl.cli.provision import add_provision_commands
from hospital_fl.errors import InputError
from hospital_fl.flare.kits import provision as provision_module
from hospital_fl.flare.kits.provision import add_site, provision
from hospital_fl.provisioning.project import render_project
from hospital_fl.provisioning.schema import load_site_configs
from nvflare.lighter.utils import verify_folder_signature

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "site_configs"


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _new_hospital(tmp_path: Path, name: str = "hospital-d", **changes) -> Path:
    config = yaml.safe_load((EXAMPLE / "hospitals" / "hospital-c.yaml").read_text())
    config.update(name=name, org=name.replace("-", "_"), **changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def consortium(tmp_path):
    pytest.importorskip("tenseal")  # the example consortium turns HE on
    configs = Path(shutil.copytree(EXAMPLE, tmp_path / "site_configs"))
    result = provision(configs, tmp_path / "out")
    return configs, result


def test_a_new_hospital_joins_with_the_existing_root_ca_and_he_context(tmp_path, consortium):
    configs, issued = consortium
    before = _tree_digest(issued.out_dir / "kits")
    state_before = json.loads((issued.out_dir / "state" / "cert.json").read_text())

    added = add_site(configs, _new_hospital(tmp_path), issued.out_dir)

    kits = issued.out_dir / "kits"
    after = _tree_digest(kits)
    assert {k: v for k, v in after.items() if not k.startswith("hospital-d")} == before  # issued kits untouched
    startup = kits / "hospital-d" / "startup"
    root = x509.load_pem_x509_certificate((startup / "rootCA.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((startup / "client.crt").read_bytes())
    cert.verify_directly_issued_by(root)
    assert (startup / "rootCA.pem").read_bytes() == (kits / "localhost" / "startup" / "rootCA.pem").read_bytes()
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "hospital-d"
    # the hospitals' one secret key: the newcomer decrypts what the others encrypt
    assert (startup / "client_context.tenseal").read_bytes() == (
        kits / "hospital-a" / "startup" / "client_context.tenseal"
    ).read_bytes()
    for folder in (startup, kits / "hospital-d" / "local"):
        assert verify_folder_signature(str(folder), str(startup / "rootCA.pem"), True, "signature.json")
    resources = json.loads((kits / "hospital-d" / "local" / "resources.json").read_text())
    assert resources["app_validator"]["args"] == {"allowed_job_types": ["cxr", "profile"], "site": "hospital-d"}
    assert added.kit.archive.is_file() and added.root_ca_sha256 == issued.root_ca_sha256

    manifest = json.loads((issued.out_dir / "provision.json").read_text())
    assert [k["name"] for k in manifest["kits"]][:5] == [
        "localhost",
        "hospital-a",
        "hospital-b",
        "hospital-c",
        "hospital-d",
    ]
    assert manifest["added"][0]["name"] == "hospital-d"
    state = json.loads((issued.out_dir / "state" / "cert.json").read_text())
    assert state["root_cert"] == state_before["root_cert"]
    # project.yml now renders the whole consortium, so `nvflare provision -p` reproduces every kit
    project = yaml.safe_load((issued.out_dir / "project.yml").read_text())
    everyone = load_site_configs(configs)
    expected = render_project(everyone.consortium, everyone.hospitals)
    assert [p["name"] for p in project["participants"]] == [
        "localhost",
        "hospital-a",
        "hospital-b",
        "hospital-c",
        "hospital-d",
        *[a.email for a in everyone.consortium.admins],
    ]
    assert [b["path"] for b in project["builders"]] == [b["path"] for b in expected["builders"]]
    assert not [p for p in issued.out_dir.iterdir() if p.name.startswith(".")]  # no staging left
    last = read_trail(issued.out_dir / "audit.jsonl")[-1]
    assert (last.event, last.details["name"], last.details["added_to"]) == (
        "kit.issued",
        "hospital-d",
        "chest_xray_consortium",
    )
    assert last.details["archive_sha256"] == manifest["kits"][4]["archive_sha256"]
    assert verify_trail(issued.out_dir / "audit.jsonl").ok


def test_a_later_full_provisioning_keeps_the_added_hospitals_certificate(tmp_path, consortium):
    configs, issued = consortium
    add_site(configs, _new_hospital(tmp_path), issued.out_dir)
    cert = (issued.out_dir / "kits" / "hospital-d" / "startup" / "client.crt").read_bytes()
    shutil.copy(tmp_path / "hospital-d.yaml", configs / "hospitals")

    again = provision(configs, issued.out_dir)

    assert "hospital-d" in [k.name for k in again.kits]
    assert (issued.out_dir / "kits" / "hospital-d" / "startup" / "client.crt").read_bytes() == cert


def test_a_name_already_issued_is_refused(tmp_path, consortium):
    configs, issued = consortium
    with pytest.raises(InputError, match="hospital-b.yaml: name: got 'hospital-b'; a kit with this name was already"):
        add_site(configs, _new_hospital(tmp_path, "hospital-b"), issued.out_dir)
    with pytest.raises(InputError, match="name: got 'localhost'"):
        add_site(configs, _new_hospital(tmp_path, "localhost"), issued.out_dir)


def test_a_changed_server_is_refused(tmp_path, consortium):
    configs, issued = consortium
    path = configs / "consortium.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "fl_port": 9002}))

    with pytest.raises(InputError) as err:
        add_site(configs, _new_hospital(tmp_path), issued.out_dir)
    assert "the server changed since the kits were issued (fed_learn_port: 8002)" in str(err.value)
    assert "re-issue every kit" in str(err.value)


def test_without_an_earlier_run_nothing_can_sign_the_kit(tmp_path):
    configs = Path(shutil.copytree(EXAMPLE, tmp_path / "site_configs"))
    with pytest.raises(InputError, match="it holds no provision.json"):
        add_site(configs, _new_hospital(tmp_path), tmp_path / "nowhere")


def test_a_failed_addition_leaves_everything_as_it_was(tmp_path, consortium, monkeypatch):
    configs, issued = consortium
    before = _tree_digest(issued.out_dir)
    names_before = sorted(p.name for p in issued.out_dir.iterdir())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(provision_module, "_atomic_write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        add_site(configs, _new_hospital(tmp_path), issued.out_dir)

    assert _tree_digest(issued.out_dir) == before
    assert sorted(p.name for p in issued.out_dir.iterdir()) == names_before


def test_the_command_names_the_new_kit(tmp_path, consortium, capsys):
    configs, issued = consortium
    parser = argparse.ArgumentParser(prog="hospital-fl")
    add_provision_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "provision",
            "add-site",
            str(_new_hospital(tmp_path)),
            "--site-configs",
            str(configs),
            "--out",
            str(issued.out_dir),
        ]
    )

    assert args.func(args) == 0

    printed = " ".join(capsys.readouterr().out.split())
    assert "added hospital-d (hospital_d)" in printed
    assert "Move" in printed and "so that a later full `hospital-fl provision` keeps this hospital" in printed
