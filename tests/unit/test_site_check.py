"""Site check: real checks on this machine, a real socket and real certificates."""

from __future__ import annotations

import datetime as dt
import json
import socket
from importlib import metadata
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hospital_fl.apps.site_check import (
    PINNED,
    CheckResult,
    SiteCheckConfig,
    check_disk,
    check_gpu,
    check_manifest,
    check_packages,
    check_privacy_policy,
    check_python,
    check_server_reachable,
    check_startup_kit,
    exit_code,
    parse_server,
    render_table,
    run_site_check,
)
from hospital_fl.errors import InputError
from rich.console import Console

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


# -- certificates --------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 10 * DAY)
        .not_valid_after(NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _client(ca_key, ca_cert, not_after: dt.datetime, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("site-1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 5 * DAY)
        .not_valid_after(not_after)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_kit(root: Path, ca_cert, client_key, client_cert, local: bool = True) -> Path:
    startup = root / "startup"
    startup.mkdir(parents=True)
    (startup / "fed_client.json").write_text(json.dumps({"format_version": 2, "servers": [{"name": "fl"}]}))
    (startup / "rootCA.pem").write_bytes(_pem(ca_cert))
    (startup / "client.crt").write_bytes(_pem(client_cert))
    (startup / "client.key").write_bytes(_pem(client_key))
    if local:
        (root / "local").mkdir()
    return root


@pytest.fixture(scope="module")
def pki():
    ca_key, ca_cert = _ca("consortium-root")
    other_key, other_cert = _ca("consortium-root")  # same name, different key: a forged root
    return {
        "ca": (ca_key, ca_cert),
        "valid": _client(ca_key, ca_cert, NOW + 300 * DAY),
        "expired": _client(ca_key, ca_cert, NOW - DAY),
        "foreign": _client(other_key, other_cert, NOW + 300 * DAY),
    }


def test_valid_startup_kit_passes(tmp_path, pki):
    key, cert = pki["valid"]
    kit = _write_kit(tmp_path / "kit", pki["ca"][1], key, cert)

    result = check_startup_kit(kit)

    assert result.ok, result.detail
    assert "client CN=site-1 issued by CN=consortium-root" in result.detail
    assert "local/ present" in result.detail


def test_expired_client_certificate_fails(tmp_path, pki):
    key, cert = pki["expired"]
    kit = _write_kit(tmp_path / "kit", pki["ca"][1], key, cert, local=False)

    result = check_startup_kit(kit)

    assert not result.ok and result.required
    assert "startup/client.crt expired on" in result.detail
    assert "newly provisioned kit" in result.detail


def test_certificate_signed_by_another_ca_fails(tmp_path, pki):
    key, cert = pki["foreign"]
    kit = _write_kit(tmp_path / "kit", pki["ca"][1], key, cert)

    result = check_startup_kit(kit)

    assert not result.ok
    assert "startup/client.crt was not issued by startup/rootCA.pem (its signature does not verify" in result.detail


def test_key_that_is_not_the_certificates_fails(tmp_path, pki):
    _, cert = pki["valid"]
    other_key, _ = pki["foreign"]
    kit = _write_kit(tmp_path / "kit", pki["ca"][1], other_key, cert)

    assert "startup/client.key does not belong to startup/client.crt" in check_startup_kit(kit).detail


def test_certificate_not_yet_valid_at_a_given_time(tmp_path, pki):
    key, cert = pki["valid"]
    kit = _write_kit(tmp_path / "kit", pki["ca"][1], key, cert)

    result = check_startup_kit(kit, now=NOW - 30 * DAY)

    assert not result.ok and "is not valid before" in result.detail and "server clock" in result.detail


def test_missing_kit_files_are_named(tmp_path, pki):
    key, cert = pki["valid"]
    kit = _write_kit(tmp_path / "kit", pki["ca"][1], key, cert)
    (kit / "startup" / "client.key").unlink()
    (kit / "startup" / "rootCA.pem").unlink()

    result = check_startup_kit(kit)

    assert not result.ok
    assert result.detail == f"{kit} lacks startup/client.key, startup/rootCA.pem (unpack the complete kit)"
    assert "is not a folder" in check_startup_kit(tmp_path / "nowhere").detail


def test_broken_fed_client_json_fails(tmp_path, pki):
    key, cert = pki["valid"]
    kit = _write_kit(tmp_path / "kit", pki["ca"][1], key, cert)
    (kit / "startup" / "fed_client.json").write_text("{not json")

    result = check_startup_kit(kit)

    assert not result.ok and "fed_client.json is not valid JSON" in result.detail


# -- environment ---------------------------------------------------------------------------
def test_python_and_packages_pass_here():
    assert check_python().ok
    packages = check_packages()
    assert packages.ok, packages.detail
    assert "nvflare 2.9.0" in packages.detail and "monai 1.6.1" in packages.detail


def test_old_python_fails():
    result = check_python((3, 9, 18))
    assert not result.ok and result.detail.startswith("Python 3.9.18; 3.10 or newer is required")


def test_wrong_or_missing_package_version_names_the_fix():
    versions = {"torch": "2.1.0", "nvflare": "2.5.2", "monai": "1.6.1", "opacus": "1.6.0", "pydicom": None}

    result = check_packages(versions)

    assert not result.ok
    assert "torch 2.1.0 installed, 2.4 or newer required (pip install 'torch>=2.4')" in result.detail
    assert "nvflare 2.5.2 installed, 2.9.0 required (pip install 'nvflare==2.9.0')" in result.detail
    assert "pydicom is not installed (pip install 'pydicom==3.0.2')" in result.detail
    assert "monai" not in result.detail


def test_pins_match_the_bundle_requirements():
    requirements = {r.split(";")[0].strip() for r in metadata.requires("hospital-fl")}

    assert {f"{name}=={version}" for name, version in PINNED.items()} <= requirements


def test_gpu_required_fails_on_a_cpu_machine_and_optional_passes():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    required, optional = check_gpu(require_gpu=True), check_gpu(require_gpu=False)

    assert not required.ok and required.required
    assert required.detail.startswith("no CUDA device (torch ")
    assert "install the NVIDIA driver and a CUDA build of torch" in required.detail
    assert optional.ok and not optional.required and "not required" in optional.detail


def test_disk(tmp_path):
    assert check_disk(tmp_path, 0.001).ok
    result = check_disk(tmp_path / "not" / "yet", 1e9)
    assert not result.ok
    assert f"not created yet; measured at {tmp_path}" in result.detail and "1e+09 GB needed" in result.detail


# -- reachability --------------------------------------------------------------------------
def test_server_reachable_against_a_listening_socket():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        result = check_server_reachable("127.0.0.1", port, timeout=2)

    assert result.ok and result.detail.startswith(f"connected to 127.0.0.1:{port} in ")


def test_closed_port_fails_with_host_port_and_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused

        result = check_server_reachable("127.0.0.1", port, timeout=2)

    assert not result.ok
    assert f"cannot connect to 127.0.0.1:{port} (ConnectionRefusedError" in result.detail


@pytest.mark.parametrize("text", ["fl.example.org", "fl.example.org:0", ":8002", "host:80a", "::1:8002"])
def test_bad_server_address_raises(text):
    with pytest.raises(InputError, match="server: got") as err:
        SiteCheckConfig(server=text)
    assert "Fix: use e.g." in str(err.value)


def test_server_address_parses():
    assert parse_server("fl.example.org:8002") == ("fl.example.org", 8002)
    assert parse_server("[::1]:8002") == ("::1", 8002)


# -- manifest and policy -------------------------------------------------------------------
def test_manifest(tmp_path):
    from dicom_factory import upscale, write_cxr
    from hospital_fl.data.federated import load_federated
    from hospital_fl.data.ingest.consent import read_consent
    from hospital_fl.data.ingest.labels import read_labels
    from hospital_fl.data.ingest.pipeline import IngestConfig, ingest

    images = load_federated().sites[0].train.images
    for i in range(3):
        write_cxr(tmp_path / "pacs" / f"{i}.dcm", upscale(images[i], 256), patient_id=f"P{i}")
    (tmp_path / "labels.csv").write_text("file,label\n0.dcm,1\n1.dcm,0\n2.dcm,1\n")
    consent = tmp_path / "consent.csv"
    consent.write_text("patient_id,status,date\nP0,granted,2026-01-01\nP1,granted,2026-01-01\nP2,revoked,2026-01-01\n")
    ingest(
        tmp_path / "pacs",
        read_labels(tmp_path / "labels.csv"),
        tmp_path / "site",
        read_consent(consent),
        IngestConfig(image_size=28, workers=1),
    )
    consent.write_text(consent.read_text() + "P1,revoked,2026-02-01\n")

    good = check_manifest(tmp_path / "site")
    next((tmp_path / "site").glob("images.g*.npy")).write_bytes(b"")
    broken = check_manifest(tmp_path / "site" / "manifest.json")

    assert good == CheckResult(
        "manifest", True, "2 images at 28x28 (cxr-pixels-1); 1 usable today, 1 patients excluded for consent"
    )
    assert not broken.ok and "images" in broken.detail
    assert (
        check_manifest(tmp_path / "none").detail == f"{tmp_path / 'none'} does not exist (run hospital-fl ingest first)"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "a site dataset folder must hold manifest.json" in check_manifest(empty).detail


def test_privacy_policy_uses_the_bundle_validator(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "hospital_fl_privacy.json").write_text(json.dumps({"require_dp": True, "max_job_epsilon": 8}))

    ok = check_privacy_policy(local)
    (local / "hospital_fl_privacy.json").write_text(json.dumps({"require_dp": True, "delta": 2}))
    bad = check_privacy_policy(local / "hospital_fl_privacy.json")
    other = tmp_path / "policy.json"
    other.write_text("{}")

    assert ok == CheckResult("privacy policy", True, "require_dp true, max_job_epsilon 8, delta 1e-05")
    assert not bad.ok and "delta: got 2; delta must lie in (0, 1)" in bad.detail
    assert "jobs read the policy only from local/hospital_fl_privacy.json" in check_privacy_policy(other).detail
    assert "does not exist (create it with hospital-fl privacy init)" in check_privacy_policy(tmp_path).detail


# -- the whole check -----------------------------------------------------------------------
def test_run_site_check_lists_skipped_checks_and_exit_code(tmp_path):
    results = run_site_check(SiteCheckConfig(require_gpu=False, min_free_gb=0.001, workdir=str(tmp_path)))
    by_name = {r.name: r for r in results}

    assert list(by_name) == ["python", "packages", "gpu", "disk", "manifest", "startup kit", "server", "privacy policy"]
    assert by_name["startup kit"] == CheckResult(
        "startup kit", True, "not checked: pass --kit <startup kit folder>", required=False
    )
    assert exit_code(results) == 0

    failing = run_site_check(
        SiteCheckConfig(require_gpu=False, min_free_gb=0.001, manifest=str(tmp_path / "none"), workdir=str(tmp_path))
    )

    assert exit_code(failing) == 1
    console = Console(width=200, record=True)
    console.print(render_table(failing))
    text = console.export_text()
    assert "skipped" in text and "FAIL" in text and "not checked: pass --server <host:port>" in text


def test_exit_code_ignores_optional_failures():
    assert exit_code([CheckResult("gpu", False, "no CUDA device", required=False)]) == 0
    assert exit_code([CheckResult("disk", False, "full")]) == 1


def test_invalid_config_raises():
    with pytest.raises(InputError, match=r"min_free_gb: got -1; it must be a number >= 0"):
        SiteCheckConfig(min_free_gb=-1)
