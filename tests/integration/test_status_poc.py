"""`hospital-fl status` against one real FLARE POC system (server + 2 hospital processes on
loopback), through the admin API with the POC's admin kit: a DP job while it runs and after
it ended, a job both hospitals refuse, the HTML page in a headless browser, and the bad
inputs (server down, expired admin certificate, unknown job ID)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hospital_fl.cli import main
from hospital_fl.data.splits import SplitConfig
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.flare.recipes.cxr import TB_FOLDER, export_job
from hospital_fl.flare.runners import poc
from hospital_fl.flare.runners.status import collect_status
from hospital_fl.jobspec import JobSpec
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.setup import init_site_privacy
from hospital_fl.training.config import TrainConfig
from PIL import Image
from small_cxr import write_small_cxr
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.integration

SITES = ("site-1", "site-2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("status")


@pytest.fixture(scope="module")
def system(root) -> poc.PocSystem:
    """The POC's kits, prepared but not started; every site has an (empty) privacy ledger."""
    system = poc._prepare(root / "poc", poc.poc_project(len(SITES), _free_port()))
    for name in system.participants:
        allow_bundle_components(system.kit(name) / "local")
    for site in system.clients:
        init_site_privacy(system.kit(site), site)
    return system


@pytest.fixture(scope="module")
def admin_kit(system) -> str:
    return str(system.kit(system.admin))


@pytest.fixture(scope="module")
def live(system):
    with poc.running_system(system) as live:
        yield live


@pytest.fixture(scope="module")
def jobs(live, root, admin_kit) -> dict:
    """A 2-round DP job, followed with `status` while it runs, and beside it a job both sites
    refuse (FLARE runs both at once, which keeps the module short)."""
    common = {"num_rounds": 2, "split": SplitConfig(num_sites=len(SITES)), "train": TrainConfig(torch_threads=1)}
    data = write_small_cxr(root / "small.npz")
    dp = JobSpec(name="ops_dp", privacy=DPConfig("sample", 8.0), data_path=str(data), **common)
    refused = JobSpec(name="ops_refused", site_data=str(root / "no-such-data" / "{site}"), **common)
    session, out = live.session, {"running": []}
    with tempfile.TemporaryDirectory() as jobs_dir:
        out["refused"] = poc.submit_folder(session, export_job(refused, jobs_dir))
        out["dp"] = poc.submit_folder(session, export_job(dp, jobs_dir))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            snapshot = collect_status(admin_kit, timeout=10, job_id=out["dp"])
            if snapshot.job.status.startswith("FINISHED"):
                break
            if snapshot.job.running:
                out["running"].append(snapshot)
            time.sleep(0.5)
        for job in ("dp", "refused"):
            _, out[f"{job}_meta"] = session.monitor_job_and_return_job_meta(out[job], timeout=180, poll_interval=1)
    return out


def _run_status(capsys, *args) -> tuple[int, str, str]:
    code = main(["status", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- before the system starts


def test_a_server_that_is_down_is_named_with_the_fix(system, admin_kit, capsys):
    code, out, err = _run_status(capsys, "--admin-kit", admin_kit, "--timeout", "2")

    assert code == 1 and out == ""
    assert f"the FLARE server at localhost:{_port(admin_kit)}" in err and "did not answer within 2s" in err
    assert "Fix: start the server" in err and "Traceback" not in err


def _port(admin_kit: str) -> int:
    return json.loads((Path(admin_kit) / "startup" / "fed_admin.json").read_text())["admin"]["port"]


def test_an_admin_kit_with_an_expired_certificate_is_refused_before_connecting(admin_kit, tmp_path, capsys):
    kit = Path(shutil.copytree(admin_kit, tmp_path / "admin"))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin@nvidia.com")])
    now = dt.datetime.now(dt.timezone.utc)
    expired = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now - dt.timedelta(days=40))
        .sign(key, hashes.SHA256())
    )
    (kit / "startup" / "client.crt").write_bytes(expired.public_bytes(serialization.Encoding.PEM))

    code, _, err = _run_status(capsys, "--admin-kit", str(kit), "--timeout", "2")

    assert code == 2
    assert "its certificate startup/client.crt (admin@nvidia.com) expired on" in err
    assert "Fix: ask the project admin for a new admin kit" in err and "Traceback" not in err


# ---------------------------------------------------------------- the running system


def test_while_the_job_runs_status_shows_the_sites_the_job_and_its_rounds(jobs):
    running = jobs["running"]
    assert running, "status never saw the DP job running"
    for snapshot in running:
        assert snapshot.job.job_id == jobs["dp"] and snapshot.job.total_rounds == 2
        assert [s.site for s in snapshot.sites if s.connected] == list(SITES)
        assert all(0 <= s.heartbeat_age_s < 60 for s in snapshot.sites)
        assert snapshot.job.rounds_done == len({r.round for r in snapshot.rounds}) <= 2
    # the aggregator's history is read mid-job: rounds show up before the job ends
    assert max(s.job.rounds_done for s in running) >= 1
    latest = running[-1]
    holders = {c.holder for c in latest.certificates}
    assert {"admin@nvidia.com", "server", *SITES} <= holders
    assert any(c.file.startswith("TLS handshake") for c in latest.certificates)
    assert all(300 < c.days_left <= 360 for c in latest.certificates)  # FLARE issues 360-day certificates


def test_after_the_dp_job_status_reports_rounds_and_only_released_privacy(live, jobs, admin_kit, capsys):
    assert jobs["dp_meta"]["status"] == "FINISHED:COMPLETED"

    code, out, _ = _run_status(capsys, "--admin-kit", admin_kit, "--job", jobs["dp"], "--json")

    report = json.loads(out)
    assert code == 0 and report["ok"] and report["job"]["status"] == "FINISHED:COMPLETED"
    assert (report["job"]["rounds_done"], report["job"]["total_rounds"]) == (2, 2)
    rows = report["rounds"]
    assert sorted((r["round"], r["site"]) for r in rows) == [(r, s) for r in (0, 1) for s in SITES]
    assert all(r["accepted"] and r["train_seconds"] > 0 for r in rows)
    assert all(set(r["metrics"]) == {"train_loss", "grad_norm"} for r in rows)  # DP-released only
    assert [(p["site"], p["mechanism"], p["epsilon_bound"], p["rounds_released"]) for p in report["privacy"]] == [
        (s, "sample", 8.0, 2) for s in SITES
    ]
    assert report["failures"] == [] and report["rejections"] == []


def test_a_dp_jobs_live_stream_holds_no_exact_metric(live, jobs, tmp_path):
    result = Path(live.session.download_job_result(jobs["dp"], str(tmp_path)))

    (tb_root,) = result.rglob(TB_FOLDER)
    for site in SITES:
        events = EventAccumulator(str(tb_root / site))
        events.Reload()
        assert set(events.Tags()["scalars"]) == {"train_loss", "grad_norm", "train_seconds"}
        assert [e.step for e in events.Scalars("train_loss")] == [0, 1]


def test_a_failed_job_shows_each_sites_reason(jobs, admin_kit, capsys):
    assert jobs["refused_meta"]["status"].startswith("FINISHED:") and jobs["refused_meta"]["status"] != (
        "FINISHED:COMPLETED"
    )

    code, out, _ = _run_status(capsys, "--admin-kit", admin_kit, "--job", jobs["refused"], "--json")

    failures = {f["site"]: f for f in json.loads(out)["failures"]}
    assert code == 0 and sorted(failures) == list(SITES)
    for site, failure in failures.items():
        assert (failure["kind"], failure["source"]) == ("refusal", f"ERRORLOG_{site}")
        assert failure["reason"].startswith(f"site data refused this job at {site}: manifest:")
    # the admin kit is left as it was: the downloaded error logs are removed
    assert not list((Path(admin_kit) / "transfer").glob(f"{jobs['refused']}*"))


def test_an_unknown_job_id_is_named_with_the_fix(live, jobs, admin_kit, capsys):
    code, out, err = _run_status(capsys, "--admin-kit", admin_kit, "--job", "no-such-job")

    assert code == 2 and out == ""
    assert "--job: got 'no-such-job'; the server has no job with this ID" in err
    assert jobs["dp"] in err and "Traceback" not in err


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_the_html_page_renders_in_a_headless_browser(live, jobs, admin_kit, tmp_path, capsys):
    page = tmp_path / "status.html"
    code, out, _ = _run_status(capsys, "--admin-kit", admin_kit, "--job", jobs["dp"], "--html", str(page))
    assert code == 0 and "Rounds per site" in out and f"HTML page: {page}" in out
    assert page.read_text().count('src="data:image/png;base64,') == 3  # training seconds, grad_norm, train_loss

    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (scripts/setup.sh installs Debian's chromium as root)")
    shot = tmp_path / "status.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (900, 1200) and pixels.std() > 10  # tables and text, not a blank page
