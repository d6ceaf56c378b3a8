"""A site's privacy budget holds against a server that asks for more, jobs that race, a lead
who asks for a huge epsilon, and a site operator's environment variable.

Adversaries (DESIGN.md threat model): the server operator sends more train tasks than the job
announced; a lead submits a profile job at epsilon 1e12 or a segmentation job to a site that
requires DP; two jobs start together at one site; an operator points HOSPITAL_FL_PRIVACY_HOME at
a looser policy. Every release is checked against the caps and recorded under the ledger's lock
before anything leaves the site, so each attack is refused with the budget, the spend and the fix.

Real components: the bundle's FLARE executors on real FLARE messages and a real FLARE
Workspace (the site's kit folder), Opacus DP-SGD and accounting, the ledger's file lock across
processes (multiprocessing).
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from hospital_fl.flare.executor import CXRTrainExecutor
from hospital_fl.flare.privacy_gate import PRIVACY_HOME_ENV, SitePrivacyGate
from hospital_fl.flare.profile_job import PROFILE_TASK, SiteProfileExecutor
from hospital_fl.flare.seg_executor import SegTrainExecutor
from hospital_fl.models.cxr import build_cxr_model
from hospital_fl.privacy.ledger import PrivacyLedger, Spend
from hospital_fl.privacy.policy import SitePrivacyPolicy, check_job_budget
from hospital_fl.training import site_round as site_round_module
from hospital_fl.training.loops import get_weights
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from site_kit import FAST, SITE
from site_kit import ledger_of as _ledger
from site_kit import make_kit as _kit
from site_kit import refusal as _refusal
from site_kit import site_ctx as _ctx
from site_kit import train_task as _train_task


# -- a server that sends more rounds than it announced -------------------------------------------
def test_a_server_sending_twice_the_announced_rounds_is_refused_at_the_cap(tmp_path):
    kit = _kit(tmp_path, max_job_epsilon=4.0, lifetime_epsilon=30.0)
    executor = CXRTrainExecutor(train=FAST, privacy={"mechanism": "sample", "target_epsilon": 4.0}, num_rounds=2)
    ctx = _ctx(kit)
    weights = get_weights(build_cxr_model())

    # The job announced 2 rounds; the server sends 4 train tasks, each announcing 2 in total.
    replies = [executor.execute("train", _train_task(weights, r, 2), ctx, Signal()) for r in range(4)]

    assert [r.get_return_code() for r in replies[:2]] == [ReturnCode.OK, ReturnCode.OK]
    for reply in replies[2:]:
        reason = _refusal(reply)
        assert "job's plan, approved when it started" in reason and "Fix:" in reason
    job_eps = _ledger(kit).epsilon(1e-5)
    assert 3.9 < job_eps <= 4.0  # what 2 rounds spend; the extra tasks released and recorded nothing
    assert _ledger(kit).audit_problems() == []


def test_the_per_job_cap_holds_release_by_release_even_without_a_plan(tmp_path):
    """A job whose plan was generous (or a gate opened without one) still stops at max_job_epsilon."""
    kit = _kit(tmp_path, max_job_epsilon=3.0)
    policy = SitePrivacyPolicy(max_job_epsilon=3.0)
    gate = SitePrivacyGate("job-x", policy, _ledger(kit), None, None)
    spent, refused = [], None
    for _ in range(100):
        try:
            spent.append(gate.spend([Spend.gaussian("sample", (1.0, 0.05, 20))]))
        except Exception as err:  # noqa: BLE001 - the refusal is the point
            refused = err
            break
    assert refused is not None and "above this site's per-job budget max_job_epsilon=3.0" in str(refused)
    assert "nothing was released or recorded" in str(refused)
    assert spent and max(spent) <= 3.0
    assert _ledger(kit).epsilon(1e-5) == pytest.approx(spent[-1], abs=1e-12)  # the refused release left no trace


# -- two jobs that race at one site ---------------------------------------------------------------
ROUNDS, STEPS = 20, 20  # one job: epsilon 7.42 at (1.0, 0.05), fits 8.0 alone; two: 10.61, do not


def _job_process(ledger_path: str, job: str, lifetime: float, barrier, results) -> None:
    done, refused = 0, ""
    try:
        policy = SitePrivacyPolicy(lifetime_epsilon=lifetime)
        ledger = PrivacyLedger(ledger_path)
        # Both jobs pass the start-of-job check: each alone fits the lifetime budget.
        check_job_budget(policy, ledger.releases(), "sample", [(1.0, 0.05, ROUNDS * STEPS)])
        gate = SitePrivacyGate(job, policy, ledger, None, {"sample": ROUNDS * STEPS})
        barrier.wait(timeout=30)
        for _ in range(ROUNDS):
            gate.spend([Spend.gaussian("sample", (1.0, 0.05, STEPS))])
            done += 1
    except Exception as err:  # noqa: BLE001 - the refusal is the point
        refused = str(err)
    results.put((job, done, refused))


def test_two_concurrent_jobs_cannot_together_exceed_the_lifetime_budget(tmp_path):
    kit = _kit(tmp_path, lifetime_epsilon=8.0)
    path = str(_ledger(kit).path)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_job_process, args=(path, j, 8.0, barrier, results)) for j in ("job-a", "job-b")]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)

    lifetime = _ledger(kit).epsilon(1e-5)
    assert 7.0 < lifetime <= 8.0
    assert any("lifetime budget 8.0" in refused for _, _, refused in outcome), outcome
    assert sum(done for _, done, _ in outcome) < 2 * ROUNDS and all(done > 0 for _, done, _ in outcome), outcome
    assert _ledger(kit).audit_problems() == []  # every accepted release, and only those, on the trail


# -- a lead's job that asks for a huge epsilon, or none -------------------------------------------
def test_a_profile_job_asking_for_epsilon_1e12_is_refused_and_nothing_is_recorded(tmp_path):
    kit = _kit(tmp_path, max_job_epsilon=8.0)
    executor = SiteProfileExecutor(site_data=str(tmp_path / "no-data-needed"), epsilon=1e12)

    reply = executor.execute(PROFILE_TASK, Shareable(), _ctx(kit), Signal())

    reason = _refusal(reply)
    assert "max_job_epsilon=8.0" in reason and "1000000000000" in reason.replace(".0000", "")
    assert "profile" not in reply
    assert _ledger(kit).entries() == []


def test_a_site_without_a_per_job_cap_still_refuses_an_unbounded_profile(tmp_path):
    kit = _kit(tmp_path)  # no caps at all
    reply = SiteProfileExecutor(site_data="x", epsilon=1e12).execute(PROFILE_TASK, Shareable(), _ctx(kit), Signal())
    assert "max_job_epsilon=10.0" in _refusal(reply)


def test_a_segmentation_job_at_a_require_dp_site_is_refused_before_it_trains(tmp_path):
    kit = _kit(tmp_path, require_dp=True)
    executor = SegTrainExecutor(datalist=str(tmp_path / "never-read.json"))

    reply = executor.execute("train", Shareable(), _ctx(kit), Signal())

    reason = _refusal(reply)
    assert "requires differential privacy" in reason and "segmentation" in reason and "Fix:" in reason
    assert executor.algorithm.cases is None  # the datalist was never read, nothing trained


# -- an environment variable that tries to loosen the signed policy -------------------------------
def _plain_job_reply(kit: Path) -> Shareable:
    executor = CXRTrainExecutor(train=FAST)
    return executor.execute("train", _train_task(get_weights(build_cxr_model()), 0, 1), _ctx(kit), Signal())


def test_the_env_override_cannot_loosen_the_kits_policy(tmp_path, monkeypatch):
    kit = _kit(tmp_path, require_dp=True, max_job_epsilon=2.0)
    loose = tmp_path / "override" / SITE / "local"
    loose.mkdir(parents=True)
    (loose / "hospital_fl_privacy.json").write_text(json.dumps({"require_dp": False, "max_job_epsilon": 100}))
    monkeypatch.setenv(PRIVACY_HOME_ENV, str(tmp_path / "override"))
    trained = []
    monkeypatch.setattr(site_round_module, "run_site_round", lambda *a, **k: trained.append(1))

    assert "requires differential privacy" in _refusal(_plain_job_reply(kit))  # require_dp stays on
    dp = CXRTrainExecutor(train=FAST, privacy={"mechanism": "sample", "target_epsilon": 8.0}, num_rounds=1)
    reason = _refusal(dp.execute("train", _train_task(get_weights(build_cxr_model()), 0, 1), _ctx(kit), Signal()))
    assert "max_job_epsilon=2.0" in reason  # the kit's cap, not the override's 100
    assert trained == []


def test_the_env_override_may_tighten_but_not_move_the_ledger(tmp_path, monkeypatch):
    kit = _kit(tmp_path, max_job_epsilon=8.0)
    tight = tmp_path / "override" / SITE / "local"
    tight.mkdir(parents=True)
    (tight / "hospital_fl_privacy.json").write_text(json.dumps({"max_job_epsilon": 1.0}))
    monkeypatch.setenv(PRIVACY_HOME_ENV, str(tmp_path / "override"))

    dp = CXRTrainExecutor(train=FAST, privacy={"mechanism": "sample", "target_epsilon": 3.0}, num_rounds=1)
    reason = _refusal(dp.execute("train", _train_task(get_weights(build_cxr_model()), 0, 1), _ctx(kit), Signal()))
    assert "max_job_epsilon=1.0" in reason  # the stricter override applies
    # the override folder got no ledger: with a kit policy the ledger stays in the kit's workspace
    assert not (tmp_path / "override" / SITE / "privacy").exists()


# -- an operator who skipped `privacy init` ---------------------------------------------------------
def test_a_kit_never_set_up_for_privacy_refuses_a_dp_job_naming_the_init_command(tmp_path):
    kit = tmp_path / "kit"
    for folder in ("startup", "local"):  # a provisioned kit, no `hospital-fl privacy init` run
        (kit / folder).mkdir(parents=True)
    executor = CXRTrainExecutor(train=FAST, privacy={"mechanism": "sample", "target_epsilon": 4.0}, num_rounds=2)

    reply = executor.execute("train", _train_task(get_weights(build_cxr_model()), 0, 2), _ctx(kit), Signal())

    reason = _refusal(reply)
    assert str(kit / "privacy" / "ledger.json") in reason and "has no privacy ledger" in reason
    assert f"hospital-fl privacy init {kit} --site {SITE}" in reason
    assert not (kit / "privacy").exists()  # nothing was trained, released or created


# -- a server that restarts and resumes a DP job --------------------------------------------------
def test_a_server_claiming_a_restart_gets_one_plan_per_job_at_the_original_noise(tmp_path):
    """The continuation after a server restart is a new job at the site, with the original
    client config. An honest server asks for the rounds left (plus the one trained again); a
    lying one can ask a continuation for up to the job's whole plan, but no more, and at the
    original plan's noise (not recalibrated to fewer rounds, which would spend more per round):
    what it gains is what a new job would, bounded by the per-job cap and the lifetime budget."""
    from hospital_fl.flare.controllers import RoundPolicyFedAvg
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    kit = _kit(tmp_path, max_job_epsilon=4.0, lifetime_epsilon=30.0)
    dp = {"mechanism": "sample", "target_epsilon": 4.0}
    weights = get_weights(build_cxr_model())

    # Job a: rounds 0 and 1 of 3; the server dies with round 1 trained but not saved.
    first = CXRTrainExecutor(train=FAST, privacy=dp, num_rounds=3)
    for rnd in (0, 1):
        reply = first.execute("train", _train_task(weights, rnd, 3), _ctx(kit, "job-a"), Signal())
        assert reply.get_return_code() == ReturnCode.OK

    # Job b, "the continuation" (start_round 1), whose server keeps asking for rounds.
    controller = RoundPolicyFedAvg(num_clients=1, num_rounds=2, start_round=1)
    second = CXRTrainExecutor(train=FAST, privacy=dp, num_rounds=3)  # the same client config
    replies = []
    for rnd in (1, 2, 3, 4):
        task = FLModel(params=weights, current_round=rnd, total_rounds=controller.num_rounds)  # as FLARE's FedAvg sets
        controller._announce_job_rounds(task)
        replies.append(second.execute("train", FLModelUtils.to_shareable(task), _ctx(kit, "job-b"), Signal()))

    assert [r.get_return_code() for r in replies[:3]] == [ReturnCode.OK] * 3  # the job's plan: 3 rounds
    assert "Fix:" in _refusal(replies[3])  # a fourth release in one job is refused
    entries = [e for e in _ledger(kit).entries() if e.mechanism == "sample"]
    a, b = sorted(entries, key=lambda e: e.job_id)
    assert (a.noise_multiplier, a.sample_rate) == (b.noise_multiplier, b.sample_rate)  # the original plan's noise
    assert 2 * b.steps == 3 * a.steps  # 3 rounds against job a's 2
    assert a.job_id.startswith("job-a@") and b.job_id.startswith("job-b@")
    assert 0 < _ledger(kit).epsilon(1e-5, job_id=b.job_id) <= 4.0  # the per-job cap holds for the continuation
    assert _ledger(kit).audit_problems() == []
