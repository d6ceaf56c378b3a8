"""`hospital-fl status` on plain data: the round history read into rows, rejections and the
privacy sites released; who is connected; days until each certificate expires; each site's
reason for a failed job from the texts FLARE hands an admin; the self-contained page."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hospital_fl.operations.status import (
    ConsortiumStatus,
    central_privacy,
    certificate_expiry,
    error_log_reason,
    failure_reasons,
    job_progress,
    kit_certificates,
    privacy_releases,
    round_rows,
    site_links,
    total_rounds_of,
)
from hospital_fl.operations.status_page import render_status_html

NOW = dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)

HISTORY = [
    {
        "round": 0,
        "sites": [
            {
                "site": "site-1",
                "accepted": True,
                "reason": None,
                "train_seconds": 2.0,
                "metrics": {"train_loss": 0.5, "grad_norm": 1.5},
                "privacy": {"mechanism": "sample", "delta": 1e-05, "accountant": "rdp", "epsilon_bound": 8.0},
            },
            {
                "site": "site-2",
                "accepted": False,
                "reason": "update has 1 NaN values",
                "train_seconds": 3.0,
                "metrics": {},
                "privacy": {"mechanism": "sample", "delta": 1e-05, "accountant": "rdp", "epsilon_bound": 8.0},
            },
        ],
    },
    {
        "round": 1,
        "sites": [
            {
                "site": "site-1",
                "accepted": True,
                "reason": None,
                "train_seconds": 1.0,
                "metrics": {"train_loss": 0.4, "grad_norm": 1.2},
                "privacy": {"mechanism": "sample", "delta": 1e-05, "accountant": "rdp", "epsilon_bound": 8.0},
            }
        ],
        "central_dp": {"epsilon": 0.7, "delta": 1e-5, "noise_multiplier": 1.1},
    },
]


def test_the_round_history_becomes_rows_rejections_and_released_privacy():
    rows = round_rows(HISTORY)

    assert [(r.round, r.site, r.train_seconds, r.accepted) for r in rows] == [
        (0, "site-1", 2.0, True),
        (0, "site-2", 3.0, False),
        (1, "site-1", 1.0, True),
    ]
    status = ConsortiumStatus("t", "s:1", "started", (), None, rounds=rows)
    assert [(r.site, r.reason) for r in status.rejections] == [("site-2", "update has 1 NaN values")]
    released = {p.site: p for p in privacy_releases(HISTORY, total_rounds=3)}
    assert (released["site-1"].epsilon_bound, released["site-1"].rounds_released, released["site-1"].total_rounds) == (
        8.0,
        2,
        3,
    )
    assert released["site-2"].rounds_released == 1
    central = central_privacy(HISTORY)
    assert (central.epsilon_spent, central.rounds) == (0.7, 1)
    assert central_privacy(HISTORY[:1]) is None


def test_job_progress_counts_rounds_and_reads_the_controllers_rounds():
    config = {"workflows": [{"id": "controller", "args": {"num_rounds": 10}}]}
    meta = {"job_id": "j1", "name": "cxr_fedavg", "status": "RUNNING", "submit_time_iso": "2027-01-01T00:00:00"}

    progress = job_progress(meta, HISTORY, total_rounds_of(config))

    assert (progress.rounds_done, progress.total_rounds, progress.running) == (2, 10, True)
    assert total_rounds_of({"workflows": []}) is None


def test_an_expected_site_that_is_not_connected_is_listed_as_such():
    links = site_links({"site-1": 1000.0}, {"site-1": "started"}, ["site-1", "site-3"], now=1012.5)

    assert [(s.site, s.connected, s.heartbeat_age_s, s.job_state) for s in links] == [
        ("site-1", True, 12.5, "started"),
        ("site-3", False, None, None),
    ]
    assert links[0].last_heartbeat == "1970-01-01 00:16:40 UTC"


def _certificate(name: str, not_after: dt.datetime) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=360))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )


def _write(path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_days_left_count_down_and_go_negative_once_expired():
    assert certificate_expiry(_certificate("site-1", NOW + dt.timedelta(days=30, hours=5)), "f", NOW).days_left == 30
    expired = certificate_expiry(_certificate("site-1", NOW - dt.timedelta(hours=1)), "f", NOW)
    assert expired.days_left == -1 and expired.expired and expired.holder == "site-1"


def test_an_admin_kit_shows_its_own_certificates_and_those_of_the_kits_beside_it(tmp_path):
    admin, server, site = tmp_path / "admin@x.org", tmp_path / "server", tmp_path / "site-1"
    _write(admin / "startup" / "client.crt", _certificate("admin@x.org", NOW + dt.timedelta(days=100)))
    _write(admin / "startup" / "rootCA.pem", _certificate("project", NOW + dt.timedelta(days=300)))
    _write(server / "startup" / "server.crt", _certificate("server", NOW + dt.timedelta(days=5)))
    (server / "startup" / "fed_server.json").write_text("{}")
    _write(site / "startup" / "client.crt", _certificate("site-1", NOW + dt.timedelta(days=200)))
    (site / "startup" / "fed_client.json").write_text("{}")
    (tmp_path / "lead@x.org" / "startup").mkdir(parents=True)  # another admin's kit: not shown

    found = {(c.holder, c.file, c.days_left) for c in kit_certificates(admin, NOW)}

    assert found == {
        ("admin@x.org", "admin@x.org/startup/client.crt", 100),
        ("project", "admin@x.org/startup/rootCA.pem", 300),
        ("server", "server/startup/server.crt", 5),
        ("site-1", "site-1/startup/client.crt", 200),
    }


# Texts as FLARE 2.9 hands them to an admin (ERRORLOG_<site> components, the server's job log).
REFUSAL_LOG = (
    "2026-12-05 12:36:35,077 - CXRTrainExecutor - ERROR - [identity=site-1, run=56d9] - privacy gate refused "
    "this job at site-1: job privacy mechanism: got 'none'; this site's policy requires differential privacy "
    "applied at the site (sample or client-local). Fix: submit the job with --dp-epsilon\n"
)
EXCEPTION_LOG = """2026-12-05 11:59:01,100 - ClientRunner - ERROR - [identity=site-2, run=r19bad] - Error processing config
Traceback (most recent call last):
  File "/x/component_builder.py", line 120, in build_component
    return class_type(**args)
TypeError: SlowNPExecutor.__init__() got an unexpected keyword argument 'bogus'

ValueError: Class r19mods.SlowNPExecutor has parameters error: TypeError: SlowNPExecutor.__init__() got an unexpected keyword argument 'bogus'.
"""
SERVER_LOG = """2026-12-05 11:57:40,000 - RoundPolicyFedAvg - INFO - [identity=p, run=j, wf=controller] -
                                Round 3 started.
2026-12-05 11:57:40,001 - RoundPolicyFedAvg - INFO - [identity=p, run=j, wf=controller] - Sending task train to ['site-3', 'site-4', 'site-5']
2026-12-05 11:57:43,000 - ServerRunner - INFO - [identity=p, run=j, peer=site-4] - got result from client site-4 for task: name=train, id=abc
2026-12-05 11:57:48,000 - WFCommServer - WARNING - [identity=p, run=j] - client ['site-3'] is dead - set task train to TIMEOUT
2026-12-05 11:57:58,000 - WFCommServer - INFO - [identity=p, run=j, wf=controller] - task train exit with status TaskCompletionStatus.TIMEOUT
2026-12-05 11:57:58,001 - FederatedServer - INFO - Failing job j due to reported failure from site-6: infrastructure error
"""


def test_each_site_gets_its_reason_for_a_failed_job():
    failures = failure_reasons(
        {"site-1": REFUSAL_LOG, "site-2": EXCEPTION_LOG},
        SERVER_LOG,
        [
            "server: OK",
            "site-1: OK",
            "site-7: site-7 refuses the job: component 'x.Y' at components[0].path in config/config_fed_client.json "
            "is not an approved class",
            "site-8: no reply (deployment timeout)",
            "num_ok_sites 6 < required_min_sites 7",
        ],
    )

    by_site = {f.site: f for f in failures}
    assert [f.site for f in failures] == ["site-1", "site-2", "site-3", "site-5", "site-6", "site-7", "site-8"]
    assert by_site["site-1"].kind == "refusal" and by_site["site-1"].source == "ERRORLOG_site-1"
    assert by_site["site-1"].reason.startswith("privacy gate refused this job at site-1: job privacy mechanism")
    assert by_site["site-2"].kind == "exception"
    assert by_site["site-2"].reason.startswith("ValueError: Class r19mods.SlowNPExecutor has parameters error")
    assert by_site["site-3"].kind == "timeout" and "is dead" in by_site["site-3"].reason
    assert (by_site["site-5"].kind, by_site["site-5"].reason) == (
        "timeout",
        "no train result in round 3 before the task's timeout",
    )
    assert (by_site["site-6"].kind, by_site["site-6"].source) == ("exception", "server job log")
    assert (by_site["site-7"].kind, by_site["site-7"].source) == ("refusal", "job deployment")
    assert by_site["site-8"].kind == "timeout"


def test_an_error_log_without_errors_gives_no_reason():
    assert error_log_reason("\n\n") is None
    assert error_log_reason("2026-12-05 12:00:00,000 - X - ERROR - [identity=s] - disk full") == (
        "exception",
        "disk full",
    )


def test_the_page_is_self_contained_escaped_and_plots_each_series():
    status = ConsortiumStatus(
        "2027-01-01 00:00:00 UTC",
        "localhost:8002",
        "started",
        (),
        job_progress({"job_id": "j", "name": "<b>job</b>", "status": "RUNNING"}, HISTORY, 2),
        rounds=round_rows(HISTORY),
    )

    page = render_status_html(status)

    assert "<b>job</b>" not in page and "&lt;b&gt;job&lt;/b&gt;" in page
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)) == 3  # seconds, grad_norm, loss
    assert not re.search(r"(src|href)=\"(?!data:)", page)
    assert "update has 1 NaN values" in page


@pytest.mark.parametrize("days", [0, 1])
def test_days_left_round_down(days):
    left = certificate_expiry(_certificate("s", NOW + dt.timedelta(days=days, minutes=1)), "f", NOW).days_left
    assert left == days
