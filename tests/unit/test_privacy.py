"""Differential privacy: accounting against Opacus, ledger, policy, mechanisms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hospital_fl.data.federated import load_federated
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.privacy.accounting import calibrate_noise, epsilon_of, noise_for_epsilon, poisson_schedule
from hospital_fl.privacy.central import CentralClientDP
from hospital_fl.privacy.client_dp import (
    adapt_clip_norm,
    central_dp_mean,
    client_level_releases,
    clip_update,
    privatize_local,
    update_norm,
)
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.ledger import PrivacyLedger
from hospital_fl.privacy.metrics_release import LOSS_BOUND, release_metrics
from hospital_fl.privacy.policy import SitePrivacyPolicy, check_job_budget, policy_from_dict, read_site_policy
from hospital_fl.privacy.setup import init_site_privacy
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.dp_sgd import DPSGDTrainer, make_dp_valid
from hospital_fl.training.loops import get_weights
from hospital_fl.training.private_site import SitePrivacy
from hospital_fl.training.site_round import run_site_round
from opacus.accountants import PRVAccountant, RDPAccountant


# -- accounting ---------------------------------------------------------------------------
@pytest.mark.parametrize("sigma,q,steps", [(1.1, 0.03, 340), (0.8, 0.42, 20), (2.0, 1.0, 10)])
def test_epsilon_equals_opacus_rdp_stepped(sigma, q, steps):
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert abs(epsilon_of([(sigma, q, steps)], 1e-5) - acc.get_epsilon(1e-5)) < 1e-9


def test_epsilon_equals_opacus_prv_for_composed_jobs():
    acc = PRVAccountant()
    acc.history = [(1.0, 0.05, 100), (3.0, 0.2, 30)]
    assert abs(epsilon_of([(1.0, 0.05, 100), (3.0, 0.2, 30)], 1e-5, "prv") - acc.get_epsilon(1e-5)) < 1e-9


def test_noise_calibration_meets_the_target_tightly():
    q, steps = poisson_schedule(n_samples=2000, batch_size=64, epochs=10)
    assert q == pytest.approx(0.032) and steps == 10 * 31
    sigma = noise_for_epsilon(3.0, 1e-5, q, steps, "rdp")
    eps = epsilon_of([(sigma, q, steps)], 1e-5)
    assert 2.95 <= eps <= 3.0
    composite = calibrate_noise(3.0, 1e-5, lambda z: client_level_releases(z, 10, adaptive=True))
    assert 2.98 <= epsilon_of(client_level_releases(composite, 10, True), 1e-5) <= 3.0


def test_an_unreachable_budget_is_a_clear_error():
    with pytest.raises(InputError, match="no noise level reaches it"):
        noise_for_epsilon(1e-9, 1e-5, 1.0, 1000, "rdp")


# -- configs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"target_epsilon": 0}, "privacy.target_epsilon"),
        ({"target_epsilon": -1}, "privacy.target_epsilon"),
        ({"delta": 1.0}, "privacy.delta"),
        ({"max_grad_norm": 0}, "privacy.max_grad_norm"),
        ({"clip_norm": -1}, "privacy.clip_norm"),
        ({"mechanism": "svt"}, "privacy.mechanism"),
        ({"accountant": "gdp"}, "privacy.accountant"),
        ({"optimizer": "adam"}, "privacy.optimizer"),
        ({"learning_rate": 0}, "privacy.learning_rate"),
    ],
)
def test_invalid_privacy_settings_raise(kwargs, field):
    with pytest.raises(InputError) as err:
        DPConfig(mechanism=kwargs.pop("mechanism", "sample"), **kwargs)
    assert str(err.value).startswith(field) and "Fix:" in str(err.value)


def test_delta_must_be_below_one_over_n():
    with pytest.raises(InputError, match=r"below 1/n .* 151 records at site-3"):
        DPConfig("sample", 8.0, delta=0.01).check_delta_for(151, "site-3")


# -- ledger -------------------------------------------------------------------------------
def test_ledger_survives_reopening_and_composes_jobs_like_opacus(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger.create(path, "site-1").record("job-a", "sample", 1.0, 0.05, 50)
    reopened = PrivacyLedger(path)  # a new process
    reopened.record("job-a", "sample", 1.0, 0.05, 50)
    reopened.record("job-b", "metrics", 5.0, 1.0, 30)
    assert [(e.job_id, e.steps) for e in reopened.entries()] == [("job-a", 100), ("job-b", 30)]
    acc = RDPAccountant()
    acc.history = [(1.0, 0.05, 100), (5.0, 1.0, 30)]
    assert abs(reopened.epsilon(1e-5) - acc.get_epsilon(1e-5)) < 1e-9
    summary = reopened.summary(1e-5)
    assert {j["job_id"] for j in summary["jobs"]} == {"job-a", "job-b"}
    assert summary["lifetime_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), abs=1e-9)


def test_every_spend_is_on_the_sites_hash_chained_audit_trail(tmp_path):
    from hospital_fl.audit import read_trail, verify_trail

    ledger = PrivacyLedger.create(tmp_path / "ledger.json", "site-1")
    ledger.record("job-a", "sample", 1.0, 0.05, 50)
    ledger.record("job-a", "sample", 1.0, 0.05, 25)
    ledger.record("job-b", "metrics", 5.0, 1.0, 0)  # nothing released, nothing recorded

    trail = tmp_path / "audit.jsonl"
    assert verify_trail(trail).ok
    records = read_trail(trail)
    assert records[0].event == "privacy.init"
    assert [(r.event, r.actor, r.details["releases"][0]["steps"]) for r in records[1:]] == [
        ("privacy.spend", "job job-a", 50),
        ("privacy.spend", "job job-a", 25),
    ]
    assert records[2].details["site"] == "site-1" and records[2].details["releases"][0]["noise_multiplier"] == 1.0


def test_ledger_is_never_reset_or_overwritten(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.create(path, "site-1")
    ledger.record("job-a", "sample", 1.0, 0.05, 10)
    with pytest.raises(InputError, match="never overwritten"):
        PrivacyLedger.create(path, "site-1")
    with pytest.raises(InputError, match="fixed for the job"):
        ledger.record("job-a", "sample", 2.0, 0.05, 10)


def test_a_tampered_ledger_is_refused_and_rebuilt_from_the_audit_trail(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.create(path, "site-1")
    ledger.record("job-a", "sample", 1.0, 0.05, 100)
    ledger.record("job-a", "sample", 1.0, 0.05, 100)
    data = json.loads(path.read_text())
    data["entries"][0]["steps"] = 1  # someone "frees" budget by hand
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        ledger.epsilon(1e-5)
    assert "keyed checksum (HMAC)" in str(err.value) and "--rebuild" in str(err.value)
    path.write_text("{not json")
    with pytest.raises(InputError, match="does not parse"):
        ledger.entries()
    # the audit trail holds every spend: the rebuilt ledger has all 200 steps back
    assert PrivacyLedger.rebuild_from_audit(path, "site-1").entries()[0].steps == 200


def test_a_missing_ledger_is_refused_not_recreated(tmp_path):
    with pytest.raises(InputError) as err:
        PrivacyLedger(tmp_path / "gone.json").entries()
    assert "missing" in str(err.value) and "hospital-fl privacy init" in str(err.value)
    assert not (tmp_path / "gone.json").exists()


@pytest.mark.parametrize(
    "history",
    [[(1.0, 0.05, 100)], [(1.1, 0.02, 250), (5.0, 0.1, 30), (0.8, 1.0, 4)], [(2.5, 0.3, 7), (1.1, 0.02, 1)]],
)
def test_cached_rdp_composition_equals_opacus_exactly(history):
    from hospital_fl.privacy.budget import gaussian_epsilon

    acc = RDPAccountant()
    acc.history = list(history)
    assert gaussian_epsilon(history, 1e-5) == acc.get_epsilon(1e-5)  # the same arrays, summed in the same order
    assert gaussian_epsilon(history, 1e-5) == gaussian_epsilon(history, 1e-5)  # and from the cache


def test_laplace_entries_add_their_pure_epsilon(tmp_path):
    from hospital_fl.privacy.ledger import Spend

    ledger = PrivacyLedger.create(tmp_path / "ledger.json", "site-1")
    ledger.record("job-a", "sample", 1.0, 0.05, 100)
    ledger.spend("job-b", [Spend.laplace("profile", 0.5)])
    ledger.spend("job-c", [Spend.laplace("profile", 0.25)])
    acc = RDPAccountant()
    acc.history = [(1.0, 0.05, 100)]
    assert ledger.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5) + 0.75, abs=1e-12)
    assert ledger.epsilon(1e-5, job_id="job-b") == 0.5
    with pytest.raises(InputError, match="finite epsilon > 0"):
        ledger.spend("job-d", [Spend.laplace("profile", float("inf"))])


def test_check_release_names_the_budget_the_spend_and_the_fix(tmp_path):
    from hospital_fl.privacy.ledger import Spend
    from hospital_fl.privacy.policy import check_release

    ledger = PrivacyLedger.create(tmp_path / "ledger.json", "site-1")
    policy = SitePrivacyPolicy(lifetime_epsilon=5.0)
    ledger.record("job-a", "sample", 1.0, 0.05, 100)  # about 4.04

    def spend(job, steps, allowance=None):
        return ledger.spend(
            job, [Spend("sample", 1.0, 0.05, steps)], lambda b, a: check_release(policy, job, b, a, allowance)
        )

    with pytest.raises(InputError) as err:
        spend("job-b", 100)
    msg = str(err.value)
    assert "lifetime budget 5.0" in msg and "has spent epsilon 4.0383" in msg and "is left" in msg
    with pytest.raises(InputError, match="covers 5 sample steps"):
        spend("job-c", 6, {"sample": 5})
    assert [e.job_id for e in ledger.entries()] == ["job-a"]  # refused releases left no trace


def test_the_kit_policy_wins_over_a_looser_override(tmp_path):
    from hospital_fl.privacy.policy import resolve_site_policy

    kit, override = tmp_path / "kit", tmp_path / "override"
    for folder, policy in ((kit, {"require_dp": True, "max_job_epsilon": 4}), (override, {"max_job_epsilon": 50})):
        folder.mkdir()
        (folder / "hospital_fl_privacy.json").write_text(json.dumps(policy))
    policy, in_kit = resolve_site_policy(kit, override)
    assert in_kit and policy.require_dp and policy.max_job_epsilon == 4
    (override / "hospital_fl_privacy.json").write_text(json.dumps({"max_job_epsilon": 2, "lifetime_epsilon": 9}))
    policy, _ = resolve_site_policy(kit, override)
    assert policy.max_job_epsilon == 2 and policy.lifetime_epsilon == 9 and policy.require_dp
    assert resolve_site_policy(tmp_path / "no-kit", override)[0].max_job_epsilon == 2  # no kit policy: the override


# -- policy -------------------------------------------------------------------------------
def test_policy_errors_name_the_file_field_value_and_fix(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "hospital_fl_privacy.json").write_text(json.dumps({"lifetime_epsilon": -2}))
    with pytest.raises(InputError) as err:
        read_site_policy(local)
    msg = str(err.value)
    assert "hospital_fl_privacy.json: lifetime_epsilon" in msg and "-2" in msg and "Fix:" in msg
    (local / "hospital_fl_privacy.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_site_policy(local)
    with pytest.raises(InputError, match="unknown key"):
        policy_from_dict({"epsilon": 3}, "x.json")


def test_a_scope_only_tightens_the_site_policy(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "hospital_fl_privacy.json").write_text(json.dumps({"lifetime_epsilon": 20, "max_job_epsilon": 8}))
    scoped = read_site_policy(local, {"hospital_fl_privacy": {"max_job_epsilon": 30, "require_dp": True}})
    assert scoped.max_job_epsilon == 8 and scoped.lifetime_epsilon == 20 and scoped.require_dp
    assert read_site_policy(tmp_path / "nothing") is None


def test_budget_check_refuses_before_training():
    job = [(1.0, 0.05, 200)]
    job_eps = epsilon_of(job, 1e-5)
    ok = check_job_budget(SitePrivacyPolicy(max_job_epsilon=job_eps + 0.1), [], "sample", job)
    assert ok.job_epsilon == pytest.approx(job_eps)
    with pytest.raises(InputError, match="per-job budget max_job_epsilon=1.0"):
        check_job_budget(SitePrivacyPolicy(max_job_epsilon=1.0), [], "sample", job)
    with pytest.raises(InputError) as err:
        check_job_budget(SitePrivacyPolicy(lifetime_epsilon=job_eps * 1.2), job, "sample", job)
    assert "lifetime budget" in str(err.value) and "is left" in str(err.value)
    for mechanism in ("none", "client-central"):
        with pytest.raises(InputError, match="requires differential privacy"):
            check_job_budget(SitePrivacyPolicy(require_dp=True), [], mechanism, [])


def test_init_site_privacy_keeps_what_exists(tmp_path):
    ledger = init_site_privacy(tmp_path, "site-1", SitePrivacyPolicy(lifetime_epsilon=10.0))
    ledger.record("j", "sample", 1.0, 0.1, 5)
    again = init_site_privacy(tmp_path, "site-1")
    assert again.entries()[0].steps == 5
    with pytest.raises(InputError, match="these would loosen it: lifetime_epsilon"):  # flags never loosen
        init_site_privacy(tmp_path, "site-1", SitePrivacyPolicy(lifetime_epsilon=99.0))
    assert read_site_policy(tmp_path / "local").lifetime_epsilon == 10.0


# -- client-level DP -----------------------------------------------------------------------
def test_clipping_bounds_the_norm_and_keeps_direction():
    update = {"w": np.full((10, 10), 3.0, np.float32), "b": np.ones(4, np.float32), "n": np.array([7])}
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(np.sqrt(900 + 4))
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    assert np.allclose(clipped["w"] / clipped["w"][0, 0], 1.0) and clipped["n"][0] == 7
    small, _ = clip_update({"w": np.full(3, 0.1, np.float32)}, 1.0)
    assert np.allclose(small["w"], 0.1)


def test_local_and_central_noise_have_the_calibrated_std():
    rng = np.random.default_rng(0)
    zero = {"w": np.zeros(200_000, np.float32)}
    noisy, _ = privatize_local(zero, clip_norm=0.5, noise_multiplier=2.0, rng=rng)
    assert np.std(noisy["w"]) == pytest.approx(1.0, rel=0.02)
    mean, norms = central_dp_mean([zero] * 4, clip_norm=0.5, noise_multiplier=2.0, rng=rng)
    assert np.std(mean["w"]) == pytest.approx(0.25, rel=0.02) and norms == [0.0] * 4


def test_adaptive_clipping_moves_toward_the_target_quantile():
    rng = np.random.default_rng(0)
    assert adapt_clip_norm(1.0, [0.1] * 5, 0.5, 0.2, 0.0, rng) < 1.0  # all within: shrink
    assert adapt_clip_norm(1.0, [9.0] * 5, 0.5, 0.2, 0.0, rng) > 1.0  # none within: grow


def test_central_dp_spends_exactly_its_target_over_the_job():
    central = CentralClientDP(DPConfig("client-central", 3.0), num_rounds=4)
    updates = [{"w": np.full(10, float(i), np.float32)} for i in range(1, 4)]
    for _ in range(4):
        _, info = central.combine(updates)
    assert 2.95 <= central.epsilon_spent() <= 3.0
    assert info["next_clip_norm"] != info["clip_norm"]


# -- metrics release ----------------------------------------------------------------------
def test_metric_release_is_noisy_bounded_and_unbiased():
    losses, norms = np.full(1000, 50.0), np.full(1000, 0.5)  # losses far above the bound
    rng = np.random.default_rng(0)
    out = [release_metrics(losses, norms, 2.0, rng) for _ in range(200)]
    assert all(o["train_loss"] <= LOSS_BOUND for o in out)
    counts = [o["n_samples"] for o in out]
    assert np.std(counts) > 1.0 and abs(np.mean(counts) - 1000) < 1.0
    half = release_metrics(losses[:500], norms[:500], 0.01, rng, sample_rate=0.5)
    assert half["n_samples"] == pytest.approx(1000, abs=1)


# -- DP-SGD -------------------------------------------------------------------------------
def test_make_dp_valid_replaces_batchnorm():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8))
    fixed = make_dp_valid(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in fixed.modules())


@pytest.fixture(scope="module")
def small_site():
    return load_federated(SplitConfig(num_sites=5, seed=0)).sites[3]  # ~200 training images


def test_dp_sgd_keeps_one_wrapped_model_and_plain_names_across_rounds(small_site):
    cfg = TrainConfig(epochs=1, batch_size=32, device="cpu")
    model = build_cxr_model()
    trainer = DPSGDTrainer(model, len(small_site.train), cfg, DPConfig("sample", 8.0), total_rounds=2)
    module = trainer.module
    start = get_weights(trainer.model)
    assert set(start) == set(build_cxr_model().state_dict())  # no "_module." prefix
    anchor = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    for rnd in range(2):
        result = trainer.train_round(
            small_site.train.images, small_site.train.labels, seed=rnd, anchor=anchor, fedprox_mu=0.01, epoch_offset=rnd
        )
        assert result.steps == trainer.steps_per_round and np.isfinite(result.mean_loss)
    assert trainer.module is module
    moved = get_weights(trainer.model)
    assert any(not np.allclose(moved[k], start[k]) for k in start)
    eps = epsilon_of([trainer.planned_release()], 1e-5)
    assert 7.9 <= eps <= 8.0


def test_private_site_round_sends_only_noised_metrics_and_a_difference(small_site):
    cfg = TrainConfig(epochs=1, device="cpu")
    privacy = SitePrivacy(DPConfig("sample", 8.0), ModelConfig(), cfg, len(small_site.train), 3, "site-4")
    planned, per_round = privacy.planned_releases(), privacy.round_releases()
    assert set(planned) == {"sample", "metrics"}
    # the job's target is the total: training and metric releases composed
    assert 7.99 <= epsilon_of(list(planned.values()), 1e-5) <= 8.0
    assert planned["sample"][2] == 3 * per_round["sample"][2]
    global_weights = get_weights(build_cxr_model())
    outcome = run_site_round(small_site, global_weights, 0, 3, cfg, ModelConfig(), privacy=privacy)
    assert outcome.params_type == "DIFF"
    assert set(outcome.metrics) == {"train_loss", "grad_norm"}  # no AUCs leave the site
    assert {"val_auc", "test_auc"} <= set(outcome.local_metrics)
    assert isinstance(outcome.n_samples, int) and outcome.n_samples >= 1
    assert set(outcome.weights) == set(global_weights)


def test_local_client_dp_noises_the_update(small_site):
    cfg = TrainConfig(epochs=1, device="cpu")
    privacy = SitePrivacy(DPConfig("client-local", 8.0), ModelConfig(), cfg, len(small_site.train), 2, "s")
    outcome = run_site_round(small_site, get_weights(build_cxr_model()), 0, 2, cfg, ModelConfig(), privacy=privacy)
    # clipped to 1.0, then noise of std z*1.0 on every coordinate: the norm is far above the clip
    assert update_norm(outcome.weights) > 10 * privacy.dp.clip_norm


@pytest.mark.parametrize("mechanism,eps", [("sample", 8.0), ("sample", 1.0), ("client-local", 3.0)])
def test_the_target_epsilon_is_the_total_of_training_and_metric_releases(mechanism, eps):
    rounds = 4
    privacy = SitePrivacy(DPConfig(mechanism, eps), ModelConfig(), TrainConfig(batch_size=64), 300, rounds, "s")
    planned = list(privacy.planned_releases().values())
    total = epsilon_of(planned, 1e-5)
    assert eps - 0.01 <= total <= eps  # the whole job, every release included, never above
    # a ledger's recomposition from one entry per mechanism and round gives the same figure
    per_round = [r for _ in range(rounds) for r in privacy.round_releases().values()]
    assert epsilon_of(per_round, 1e-5) <= eps and abs(epsilon_of(per_round, 1e-5) - total) < 1e-9
    assert epsilon_of([privacy.planned_releases()["metrics"]], 1e-5) <= privacy.dp.metrics_budget


def test_metric_releases_take_at_most_an_eighth_of_the_job():
    assert DPConfig("sample", 8.0).metrics_budget == 1.0
    assert DPConfig("sample", 1.0).metrics_budget == 0.125
    assert DPConfig("sample", 8.0, metrics_epsilon=0.5).metrics_budget == 0.5
