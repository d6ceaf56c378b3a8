"""A site's privacy ledger cannot be reset, rolled back or edited to win back spent budget.

Adversaries: a site operator (or anyone with write access to the site's privacy folder) who
deletes the ledger and runs ``privacy init`` again, restores an older copy, edits an entry
(without the ledger key, or even with it), or truncates the audit trail. Each is detected and
named, against the real ledger files, the real hash-chained audit trail and the real
``hospital-fl`` CLI; the spend comes back only by rebuilding from the verified trail.

Bad input (a corrupt or missing ledger, a missing policy where the site keeps a ledger, an
unknown mechanism) is refused by the real FLARE executor with the file, the value and the fix:
nothing trains and nothing is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

import pytest
from hospital_fl.cli import main
from hospital_fl.errors import InputError
from hospital_fl.flare.executor import CXRTrainExecutor
from hospital_fl.models.cxr import build_cxr_model
from hospital_fl.privacy.ledger import PrivacyLedger, Spend
from hospital_fl.training import site_round as site_round_module
from hospital_fl.training.loops import get_weights
from nvflare.apis.signal import Signal
from site_kit import FAST, SITE, ledger_of, make_kit, refusal, site_ctx, train_task


def _spent_kit(tmp_path):
    kit = make_kit(tmp_path, lifetime_epsilon=20.0)
    ledger = ledger_of(kit)
    ledger.record("job-a", "sample", 1.0, 0.05, 100)
    ledger.record("job-a", "metrics", 5.0, 1.0, 3)
    ledger.spend("job-b", [Spend.laplace("profile", 1.0)])
    return kit, ledger, ledger.epsilon(1e-5)


def _rewrite(ledger: PrivacyLedger, change, key: bytes | None = None) -> None:
    """Edit the ledger file; with ``key`` the edit also carries a valid keyed checksum (an insider)."""
    data = json.loads(ledger.path.read_text())
    change(data)
    if key is None:
        ledger.path.write_text(json.dumps(data))
        return
    # the file's format: canonical JSON of the body with its HMAC as the last field
    fields = {k: data[k] for k in ("version", "site", "entries", "audit")}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    mac = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
    ledger.path.write_text(f'{body[:-1]},"mac":"{mac}"}}')


# -- reset -----------------------------------------------------------------------------------
def test_a_deleted_ledger_is_named_and_privacy_init_refuses_the_reset(tmp_path, capsys):
    kit, ledger, spent = _spent_kit(tmp_path)
    ledger.path.unlink()

    with pytest.raises(InputError) as err:
        ledger.entries()
    assert "missing" in str(err.value) and "so it was deleted" in str(err.value) and "--rebuild" in str(err.value)

    # a fresh init (even with the key deleted too) would hand the budget back: refused
    ledger.key_path.unlink()
    assert main(["privacy", "init", str(kit), "--site", SITE]) == 2
    assert "records 3 earlier (job, mechanism) spends" in capsys.readouterr().err
    assert not ledger.path.exists()

    # the fix: rebuild from the verified trail, every spend back
    assert main(["privacy", "init", str(kit), "--site", SITE, "--rebuild"]) == 0
    assert ledger.epsilon(1e-5) == pytest.approx(spent, abs=1e-12)
    assert ledger.audit_problems() == []


# -- edits -----------------------------------------------------------------------------------
def test_an_edited_entry_without_the_key_fails_the_keyed_checksum(tmp_path):
    kit, ledger, spent = _spent_kit(tmp_path)

    def free_budget(data):
        data["entries"][0]["steps"] = 1
        # even a recomputed unkeyed checksum (what version 1 used) does not help
        data["mac"] = hashlib.sha256(json.dumps(data["entries"]).encode()).hexdigest()

    _rewrite(ledger, free_budget)
    with pytest.raises(InputError, match=r"keyed checksum \(HMAC\) does not match"):
        ledger.epsilon(1e-5)


def test_an_edit_signed_with_the_key_is_named_by_the_audit_trail(tmp_path):
    kit, ledger, spent = _spent_kit(tmp_path)
    _rewrite(ledger, lambda d: d["entries"][0].update(steps=10), key=ledger.key_path.read_bytes())

    assert ledger.epsilon(1e-5) < spent  # the file alone now claims less spend...
    with pytest.raises(InputError) as err:  # ...but every job start compares it with the trail
        ledger.check_against_audit()
    assert "job-a/sample: the ledger holds 10 releases, the audit trail 100" in str(err.value)

    # and the real executor refuses the next job at this site before it trains
    executor = CXRTrainExecutor(train=FAST, privacy={"mechanism": "sample", "target_epsilon": 2.0}, num_rounds=1)
    reply = executor.execute("train", train_task(get_weights(build_cxr_model()), 0, 1), site_ctx(kit), Signal())
    assert "disagrees with the site's audit trail" in refusal(reply)


def test_a_deleted_entry_signed_with_the_key_is_named(tmp_path):
    kit, ledger, spent = _spent_kit(tmp_path)
    _rewrite(ledger, lambda d: d["entries"].pop(2), key=ledger.key_path.read_bytes())
    assert ledger.audit_problems() == ["job-b/profile: in the audit trail (1 releases) but not in the ledger"]


# -- rollback and truncation -----------------------------------------------------------------
def test_a_ledger_rolled_back_to_an_older_copy_is_refused(tmp_path):
    kit, ledger, spent = _spent_kit(tmp_path)
    older = ledger.path.read_bytes()
    ledger.record("job-c", "sample", 1.0, 0.05, 500)
    ledger.path.write_bytes(older)  # an old backup, with a valid keyed checksum

    with pytest.raises(InputError, match="rolled back to an older copy"):
        ledger.entries()
    assert PrivacyLedger.rebuild_from_audit(ledger.path, SITE).epsilon(1e-5) > spent  # job-c's spend is back


def test_a_truncated_audit_trail_is_refused(tmp_path):
    kit, ledger, spent = _spent_kit(tmp_path)
    lines = ledger.trail.read_bytes().splitlines(keepends=True)
    ledger.trail.write_bytes(b"".join(lines[:-1]))  # drop the last spend: a valid, shorter chain
    with pytest.raises(InputError, match="the trail\\s+was cut or replaced|was cut or replaced"):
        ledger.epsilon(1e-5)


def test_a_ledger_key_readable_by_others_is_refused(tmp_path):
    kit, ledger, spent = _spent_kit(tmp_path)
    os.chmod(ledger.key_path, 0o644)
    with pytest.raises(InputError) as err:
        ledger.entries()
    assert "mode 644" in str(err.value) and f"chmod 600 {ledger.key_path}" in str(err.value)


def test_a_version_1_ledger_is_refused_with_its_migration(tmp_path):
    kit, ledger, spent = _spent_kit(tmp_path)
    entries = [e for e in json.loads(ledger.path.read_text())["entries"] if e["mechanism"] != "profile"]
    for e in entries:
        e.pop("pure_epsilon")
    checksum = hashlib.sha256(
        json.dumps({"site": SITE, "entries": entries}, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    ledger.path.write_text(json.dumps({"version": 1, "site": SITE, "entries": entries, "checksum": checksum}))

    with pytest.raises(InputError) as err:
        ledger.entries()
    assert "version-1 ledger" in str(err.value) and "--rebuild" in str(err.value)
    assert PrivacyLedger.rebuild_from_audit(ledger.path, SITE).epsilon(1e-5) == pytest.approx(spent, abs=1e-12)


# -- bad input through the real executor: nothing trains, nothing is sent ----------------------
def _dp_job_reply(kit, monkeypatch):
    trained = []
    monkeypatch.setattr(site_round_module, "run_site_round", lambda *a, **k: trained.append(1))
    executor = CXRTrainExecutor(train=FAST, privacy={"mechanism": "sample", "target_epsilon": 2.0}, num_rounds=1)
    reply = executor.execute("train", train_task(get_weights(build_cxr_model()), 0, 1), site_ctx(kit), Signal())
    assert trained == []
    return refusal(reply)


def test_a_corrupt_ledger_refuses_the_job_naming_the_file_and_fix(tmp_path, monkeypatch):
    kit, ledger, _ = _spent_kit(tmp_path)
    ledger.path.write_text("{half a ledg")
    reason = _dp_job_reply(kit, monkeypatch)
    assert str(ledger.path) in reason and "does not parse" in reason and "--rebuild" in reason


def test_a_missing_ledger_refuses_the_job(tmp_path, monkeypatch):
    kit = make_kit(tmp_path)
    ledger_of(kit).path.unlink()
    reason = _dp_job_reply(kit, monkeypatch)
    assert "the file is missing" in reason and "Fix:" in reason


def test_a_missing_policy_at_a_site_with_a_ledger_refuses_every_job(tmp_path, monkeypatch):
    kit, _, _ = _spent_kit(tmp_path)
    (kit / "local" / "hospital_fl_privacy.json").unlink()
    reason = _dp_job_reply(kit, monkeypatch)
    assert "hospital_fl_privacy.json" in reason and "it is missing, but this site keeps a privacy ledger" in reason
    plain = CXRTrainExecutor(train=FAST)
    reply = plain.execute("train", train_task(get_weights(build_cxr_model()), 0, 1), site_ctx(kit), Signal())
    assert "it is missing, but this site keeps a privacy ledger" in refusal(reply)


def test_a_deleted_kit_policy_is_not_replaced_by_a_looser_override(tmp_path, monkeypatch):
    kit, _, _ = _spent_kit(tmp_path)
    (kit / "local" / "hospital_fl_privacy.json").unlink()
    loose = tmp_path / "override" / SITE
    (loose / "local").mkdir(parents=True)
    (loose / "local" / "hospital_fl_privacy.json").write_text(json.dumps({"require_dp": False}))
    monkeypatch.setenv("HOSPITAL_FL_PRIVACY_HOME", str(tmp_path / "override"))
    reason = _dp_job_reply(kit, monkeypatch)
    assert "it is missing, but this site keeps a privacy ledger" in reason and str(kit / "local") in reason


def test_an_unknown_mechanism_is_refused(tmp_path, monkeypatch):
    kit, ledger, _ = _spent_kit(tmp_path)
    with pytest.raises(InputError, match="mechanism: got 'quantum'"):
        ledger.spend("job-z", [Spend("quantum", 1.0, 1.0, 1)])
    _rewrite(ledger, lambda d: d["entries"][0].update(mechanism="quantum"), key=ledger.key_path.read_bytes())
    reason = _dp_job_reply(kit, monkeypatch)
    assert "got 'quantum'" in reason and str(ledger.path) in reason
