"""DP jobs through a real FLARE simulator: the ledger records every round, and a site's
policy refuses a job before it trains."""

import json

import pytest
from hospital_fl.data.splits import SplitConfig
from hospital_fl.flare.runners.simulator import run_in_simulator
from hospital_fl.jobspec import JobSpec
from hospital_fl.privacy.accounting import epsilon_of
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.ledger import PrivacyLedger
from hospital_fl.privacy.policy import SitePrivacyPolicy
from hospital_fl.privacy.setup import init_site_privacy
from hospital_fl.training.config import TrainConfig

pytestmark = pytest.mark.integration

DP_JOB = JobSpec(
    name="cxr_dp_small",
    num_rounds=2,
    split=SplitConfig(num_sites=2),
    train=TrainConfig(torch_threads=1),
    privacy=DPConfig("sample", 6.0),
)


def _site_log(tmp_path, job, site):
    return (tmp_path / "ws" / job / site / "log.txt").read_text()


def test_dp_job_records_every_round_in_each_sites_ledger_and_spans_jobs(tmp_path):
    home = tmp_path / "privacy"
    run = run_in_simulator(DP_JOB, tmp_path / "ws", privacy_home=home)

    assert [h["round"] for h in run.history] == [0, 1]
    for entry in run.history:
        for site in entry["sites"]:
            assert site["accepted"] and "val_auc" not in site["metrics"]  # scores stay at the site
            assert site["privacy"]["mechanism"] == "sample"
    for name in ("site-1", "site-2"):
        ledger = PrivacyLedger(home / name / "privacy" / "ledger.json")
        by_mech = {e.mechanism: e for e in ledger.entries()}
        assert set(by_mech) == {"sample", "metrics"}
        # every round checked and recorded: the job spent its target (training + metrics), never more
        assert 5.9 <= ledger.epsilon(1e-5) <= 6.0
        assert epsilon_of([by_mech["sample"].release], 1e-5) <= 6.0
        assert ledger.audit_problems() == []  # the audit trail holds the same spends

    # The same sites, a second job: refused once it would exceed the lifetime budget.
    spent = PrivacyLedger(home / "site-1" / "privacy" / "ledger.json").epsilon(1e-5)
    policy_file = home / "site-1" / "local" / "hospital_fl_privacy.json"
    policy_file.parent.mkdir(parents=True, exist_ok=True)
    policy_file.write_text(json.dumps({"lifetime_epsilon": round(spent * 1.2, 3)}))
    with pytest.raises(RuntimeError):  # the server ends the job
        run_in_simulator(DP_JOB, tmp_path / "ws", privacy_home=home)
    log = _site_log(tmp_path, DP_JOB.name, "site-1")
    assert "privacy gate refused this job at site-1" in log and "lifetime budget" in log
    # nothing was spent by the refused job
    assert PrivacyLedger(home / "site-1" / "privacy" / "ledger.json").epsilon(1e-5) == pytest.approx(spent)


def test_a_site_requiring_dp_refuses_a_job_without_it(tmp_path):
    home = tmp_path / "privacy"
    init_site_privacy(home / "site-2", "site-2", SitePrivacyPolicy(require_dp=True))
    plain = JobSpec(name="cxr_plain", num_rounds=1, split=SplitConfig(num_sites=2), train=TrainConfig(torch_threads=1))
    with pytest.raises(RuntimeError):  # the server ends the job
        run_in_simulator(plain, tmp_path / "ws", privacy_home=home)
    assert "requires differential privacy" in _site_log(tmp_path, "cxr_plain", "site-2")
