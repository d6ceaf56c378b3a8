"""Secrets are written 0600 (kits, zips, the root CA's state, add-site's copies), and `kit verify`
fails a kit where one is readable by group or others. Real FLARE provisioning under umask 022."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
import yaml
from hospital_fl.cli import kit as cli_kit
from hospital_fl.flare.kits.provision import add_site, provision

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "site_configs"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def issued(tmp_path_factory):
    pytest.importorskip("tenseal")  # the example consortium turns HE on
    tmp = tmp_path_factory.mktemp("secrets")
    configs = Path(shutil.copytree(EXAMPLE, tmp / "site_configs"))
    hospital = yaml.safe_load((EXAMPLE / "hospitals" / "hospital-c.yaml").read_text())
    (tmp / "hospital-d.yaml").write_text(yaml.safe_dump({**hospital, "name": "hospital-d", "org": "hospital_d"}))
    old = os.umask(0o022)  # the usual umask: without explicit modes files come out 0644
    try:
        result = provision(configs, tmp / "out")
        add_site(configs, tmp / "hospital-d.yaml", result.out_dir)
    finally:
        os.umask(old)
    return result.out_dir


def test_every_secret_of_the_provisioning_and_of_an_added_site_is_0600(issued):
    kits = issued / "kits"
    secrets = [
        *kits.glob("*/startup/*.key"),
        *kits.glob("*/startup/client_context.tenseal"),
        issued / "state" / "cert.json",
    ]
    assert len(list(kits.glob("*/startup/client_context.tenseal"))) == 4  # hospitals a-c and the added d
    assert kits / "hospital-d" / "startup" / "client.key" in secrets
    assert {str(p.relative_to(issued)): oct(_mode(p)) for p in secrets if _mode(p) != 0o600} == {}
    archives = list(kits.glob("*.zip"))
    assert archives and {p.name: oct(_mode(p)) for p in archives if _mode(p) != 0o600} == {}  # each holds a key
    assert _mode(issued / "state") == 0o700
    # Unzipped with the modes the archive records (as `unzip` does), the secrets stay 0600.
    with zipfile.ZipFile(kits / "hospital-d.zip") as archive:
        modes = {i.filename: stat.S_IMODE(i.external_attr >> 16) for i in archive.infolist()}
    assert modes["hospital-d/startup/client.key"] == 0o600
    assert modes["hospital-d/startup/client_context.tenseal"] == 0o600


def _verify(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="hospital-fl")
    cli_kit.add_kit_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kit", "verify", *argv])
    return args.func(args)


@pytest.mark.parametrize("secret", ["client.key", "client_context.tenseal"])
def test_kit_verify_fails_a_secret_readable_by_others(issued, tmp_path, capsys, secret):
    kit = Path(shutil.copytree(issued / "kits" / "hospital-a", tmp_path / "hospital-a"))
    assert _verify(str(kit), "--json") == 0
    capsys.readouterr()

    os.chmod(kit / "startup" / secret, 0o644)

    assert _verify(str(kit), "--json") == 1
    report = json.loads(capsys.readouterr().out)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["secret file modes"]
    assert failed[0]["detail"].startswith(f"startup/{secret} has mode 0644: a secret")
    assert "mode 0600" in failed[0]["detail"]
    assert failed[0]["fix"] == f"chmod 600 {kit / 'startup' / secret}"
