"""Robust aggregation rules, the round's screening, FedOpt's server step and SCAFFOLD's controls."""

import numpy as np
import pytest
import torch
from hospital_fl.aggregation.robust import coordinate_median, krum_scores, multi_krum, norm_bounded_mean, trimmed_mean
from hospital_fl.aggregation.server_optimizer import ServerOptimizer, ServerOptimizerConfig
from hospital_fl.aggregation.strategy import AggregationConfig, aggregate_round
from hospital_fl.aggregation.validation import norm_outliers
from hospital_fl.bench.attacks import Attack, poison_update
from hospital_fl.errors import InputError
from hospital_fl.training.scaffold import control_update


def _u(*values, dtype=np.float32):
    return {"w": np.asarray(values, dtype=dtype), "b": np.asarray([sum(values)], dtype=dtype)}


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    ups = [_u(1, 10), _u(2, 20), _u(3, 30), _u(100, -100), _u(4, 40)]
    out = trimmed_mean(ups, trim=1)
    np.testing.assert_allclose(out["w"], [3.0, 20.0])  # mean of the middle three per coordinate


def test_median_and_dtypes_are_kept():
    ups = [_u(1, 5), _u(2, 6), _u(900, 7)]
    out = coordinate_median(ups)
    np.testing.assert_allclose(out["w"], [2.0, 6.0])
    assert out["w"].dtype == np.float32
    counters = [{"n": np.array(v, dtype=np.int64)} for v in (1, 2, 4)]
    assert coordinate_median(counters)["n"].dtype == np.int64


def test_norm_bounded_mean_caps_a_scaled_update_at_the_median_norm():
    honest = [{"w": np.array([3.0, 4.0], np.float32)} for _ in range(4)]  # norm 5
    attacker = {"w": np.array([300.0, 400.0], np.float32)}  # norm 500
    out, bound = norm_bounded_mean([*honest, attacker], [1] * 5)
    assert bound == pytest.approx(5.0)
    np.testing.assert_allclose(out["w"], [3.0, 4.0], rtol=1e-6)  # the attacker now counts as one honest site


def test_krum_picks_an_update_from_the_honest_cluster():
    rng = np.random.default_rng(0)
    honest = [{"w": (np.ones(50) + rng.normal(0, 0.01, 50)).astype(np.float32)} for _ in range(4)]
    bad = {"w": np.full(50, -20.0, np.float32)}
    out, chosen = multi_krum([bad, *honest], [1] * 5, byzantine=1, select=3)
    assert 0 not in chosen and len(chosen) == 3
    assert np.all(out["w"] > 0.9)
    scores = krum_scores(np.stack([u["w"] for u in [bad, *honest]]), byzantine=1)
    assert np.argmax(scores) == 0


def test_krum_refuses_too_few_updates():
    with pytest.raises(ValueError, match="needs at least 5 updates"):
        multi_krum([_u(1, 2)] * 4, [1] * 4, byzantine=1, select=1)


def test_norm_outliers_need_three_updates_and_flag_the_big_one():
    assert norm_outliers([1.0, 50.0], factor=10) == []
    assert norm_outliers([1.0, 1.1, 0.9, 50.0], factor=10) == [3]


def test_a_round_rejects_bad_updates_with_reasons_and_aggregates_the_rest():
    ref = {"w": np.zeros(2, np.float32)}
    ups = [
        {"w": np.array([1.0, 1.0], np.float32)},
        {"w": np.array([np.nan, 1.0], np.float32)},
        {"w": np.array([1.0, 1.0, 1.0], np.float32)},
        {"w": np.array([3.0, 3.0], np.float32)},
        {"w": np.array([500.0, 500.0], np.float32)},
        {"w": np.array([2.0, 2.0], np.float32)},
    ]
    result = aggregate_round(AggregationConfig(), ups, [100, 100, 100, 300, 100, 100], reference=ref)
    assert sorted(result.rejected) == [1, 2, 4]
    assert "NaN" in result.rejected[1] and "shape (3,)" in result.rejected[2]
    assert "exceeds 10 x the round's median update norm" in result.rejected[4]
    np.testing.assert_allclose(result.update["w"], [(100 + 900 + 200) / 500] * 2)


def test_a_site_with_an_odd_layout_arriving_first_cannot_get_the_others_rejected():
    odd = {"w": np.ones(2, np.float32), "backdoor": np.ones(3, np.float32)}
    honest = [{"w": np.full(2, v, np.float32)} for v in (1.0, 2.0, 3.0)]
    result = aggregate_round(AggregationConfig(), [odd, *honest], [10, 10, 10, 10])
    assert list(result.rejected) == [0] and "does not have (e.g. ['backdoor'])" in result.rejected[0]
    np.testing.assert_allclose(result.update["w"], [2.0, 2.0])


def test_a_round_with_too_few_updates_for_the_rule_keeps_the_model():
    cfg = AggregationConfig(rule="trimmed_mean", trim=1)
    ups = [{"w": np.ones(2, np.float32)}, {"w": np.full(2, np.inf, np.float32)}, {"w": np.ones(2, np.float32)}]
    result = aggregate_round(cfg, ups, [1, 1, 1])
    assert result.update is None and "needs 3" in result.info["skipped"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rule="mean"), "aggregation.rule: got 'mean'; it must be one of"),
        (dict(trim=-1), "aggregation.trim: got -1"),
        (dict(outlier_factor=0.5), "aggregation.outlier_factor: got 0.5; it must be > 1 or None"),
    ],
)
def test_bad_aggregation_configs_are_named(kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        AggregationConfig(**kwargs)


def test_trimming_more_sites_than_exist_is_refused():
    with pytest.raises(InputError) as err:
        AggregationConfig(rule="trimmed_mean", trim=2).check_sites(4)
    assert "min_clients: got 4; trimming 2 per side needs at least 5 sites" in str(err.value)
    assert "Fix: lower aggregation.trim" in str(err.value)


def test_attacks_rewrite_the_update():
    honest = {"w": np.array([1.0, -2.0], np.float32), "n": np.array(3)}
    np.testing.assert_allclose(poison_update(Attack("scale"), honest, 0)["w"], [50.0, -100.0])
    np.testing.assert_allclose(poison_update(Attack("sign_flip"), honest, 0)["w"], [-1.0, 2.0])
    random = poison_update(Attack("random"), honest, 0)["w"]
    assert random.shape == (2,) and not np.allclose(random, honest["w"])
    assert poison_update(Attack("scale"), honest, 0)["n"] == 3  # integer entries untouched


def test_server_adam_matches_torch_adam_on_the_pseudo_gradient():
    cfg = ServerOptimizerConfig("adam", lr=0.1)
    w0 = {"w": np.array([1.0, 2.0], np.float32), "count": np.array([5], np.int64)}
    opt = ServerOptimizer(cfg, w0, trainable=["w"])
    step = {"w": np.array([0.5, -0.5], np.float32), "count": np.array([1], np.int64)}
    w1 = opt.step(w0, step)
    ref = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    adam = torch.optim.Adam([ref], lr=0.1, betas=(0.9, 0.99), eps=1e-3)
    ref.grad = torch.tensor([-0.5, 0.5])
    adam.step()
    np.testing.assert_allclose(w1["w"], ref.detach().numpy(), rtol=1e-6)
    assert w1["count"][0] == 6  # buffers take the plain averaged difference, as in FLARE's FedOpt
    assert cfg.flare_optimizer_args() == {
        "path": "torch.optim.Adam",
        "args": {"lr": 0.1, "betas": [0.9, 0.99], "eps": 1e-3},
    }


def test_yogi_moves_against_the_gradient():
    cfg = ServerOptimizerConfig("yogi", lr=0.05)
    opt = ServerOptimizer(cfg, {"w": np.zeros(3, np.float32)}, trainable=["w"])
    out = opt.step({"w": np.zeros(3, np.float32)}, {"w": np.array([1.0, -1.0, 0.0], np.float32)})
    assert out["w"][0] > 0 > out["w"][1] and out["w"][2] == 0


def test_scaffold_control_update_follows_option_two():
    c, ci = {"w": np.array([0.1], np.float32)}, {"w": np.array([0.3], np.float32)}
    new, delta = control_update(c, ci, {"w": np.array([1.0], np.float32)}, {"w": np.array([0.5], np.float32)}, 2.0)
    # c_i+ = c_i - c + (x - y) / sum(lr) = 0.3 - 0.1 + 0.25
    np.testing.assert_allclose(new["w"], [0.45], rtol=1e-6)
    np.testing.assert_allclose(delta["w"], [0.15], rtol=1e-5)
    with pytest.raises(ValueError, match="lr_sum must be > 0"):
        control_update(c, ci, c, c, 0.0)


def test_update_cosines_equal_the_flat_computation_over_every_float_entry():
    from hospital_fl.aggregation.direction import update_cosines

    rng = np.random.default_rng(3)
    updates = [
        {"a": rng.normal(size=(6, 5)).astype(np.float32), "b": rng.normal(size=4), "n": np.array(i, np.int64)}
        for i in range(5)
    ]
    flat = np.stack([np.concatenate([u["a"].ravel(), u["b"]]) for u in updates])
    median = np.median(flat, axis=0)
    expected = flat @ median / (np.linalg.norm(flat, axis=1) * np.linalg.norm(median))
    np.testing.assert_allclose(update_cosines(updates), expected, rtol=1e-5)


def test_every_registered_rule_combines_through_the_one_screen():
    from hospital_fl.aggregation.rules import RULE_REGISTRY, RULES

    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(1.0, 0.1, 4).astype(np.float32)} for _ in range(7)]
    assert RULES == tuple(RULE_REGISTRY)
    for rule in RULES:
        cfg = AggregationConfig(rule=rule)
        result = aggregate_round(cfg, updates, [10] * 7)
        assert result.info["rule"] == rule and result.update is not None
        assert cfg.min_updates() == RULE_REGISTRY[rule].min_updates(cfg)
        # each rule's update lies within the spread of the inputs (a wrong rule wiring would not)
        assert 0.7 < float(result.update["w"].mean()) < 1.3


def test_an_unregistered_rule_is_refused_with_the_registry_names():
    with pytest.raises(InputError, match="aggregation.rule: got 'mean'; it must be one of \\('fedavg'"):
        AggregationConfig(rule="mean")
