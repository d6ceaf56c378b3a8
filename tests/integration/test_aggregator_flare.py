"""The FLARE aggregator adapter on real FLModel objects: a bad update is rejected with its
reason while the round still aggregates the good ones; robust rules and central DP."""

import numpy as np
import pytest
from hospital_fl.flare.aggregator import WIRE_BYTES_KEY, UpdateAggregator
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

pytestmark = pytest.mark.integration


def _update(site, w, n, round_=0, params_type=ParamsType.FULL, **meta):
    return FLModel(
        params_type=params_type,
        params={"w": np.asarray(w, dtype=np.float32)},
        metrics={"val_auc": 0.5 + n / 1000},
        current_round=round_,
        meta={"client_name": site, "n_samples": n, "train_seconds": 0.1, **meta},
    )


def _diff(site, w, n, round_=0, **meta):
    return _update(site, w, n, round_, ParamsType.DIFF, **meta)


def test_bad_update_is_rejected_and_the_round_goes_on():
    agg = UpdateAggregator()
    agg.accept_model(_update("site-1", [1.0, 1.0], 100))
    agg.accept_model(_update("site-2", [np.nan, 0.0], 100))
    agg.accept_model(_update("site-3", [3.0, 3.0], 300))

    result = agg.aggregate_model()

    np.testing.assert_allclose(result.params["w"], [2.5, 2.5])
    sites = {s["site"]: s for s in agg.history[0]["sites"]}
    assert not sites["site-2"]["accepted"] and "NaN" in sites["site-2"]["reason"]
    assert result.metrics["val_auc"] == pytest.approx((0.6 * 100 + 0.8 * 300) / 400)


def test_a_round_with_no_valid_update_fails_loudly():
    agg = UpdateAggregator()
    agg.accept_model(_update("site-1", [1.0], 0))

    with pytest.raises(RuntimeError, match="every site's update was rejected"):
        agg.aggregate_model()


def test_rounds_are_kept_apart():
    agg = UpdateAggregator()
    agg.accept_model(_update("site-1", [1.0], 10, round_=0))
    agg.aggregate_model()
    agg.accept_model(_update("site-1", [5.0], 10, round_=1))

    assert agg.aggregate_model().params["w"][0] == 5.0
    assert [h["round"] for h in agg.history] == [0, 1]


def test_differences_are_averaged_and_a_mixed_round_rejects_the_odd_one():
    agg = UpdateAggregator()
    agg.accept_model(_diff("site-1", [1.0, 1.0], 100))
    agg.accept_model(_update("site-2", [9.0, 9.0], 100))  # full weights in a round of differences
    agg.accept_model(_diff("site-3", [3.0, 3.0], 100))
    result = agg.aggregate_model()
    assert result.params_type == ParamsType.DIFF
    np.testing.assert_allclose(result.params["w"], [2.0, 2.0])
    rejected = [s for s in agg.history[0]["sites"] if not s["accepted"]]
    assert [s["site"] for s in rejected] == ["site-2"] and "differs from this round's" in rejected[0]["reason"]


def test_a_scaled_update_is_screened_out_and_the_trimmed_mean_runs_on_the_rest():
    agg = UpdateAggregator(aggregation={"rule": "trimmed_mean", "trim": 1})
    for i, w in enumerate([1.0, 2.0, 3.0, 4.0]):
        agg.accept_model(_diff(f"site-{i + 1}", [w, w], 100, **{WIRE_BYTES_KEY: 2}))
    agg.accept_model(_diff("site-5", [500.0, 500.0], 100))
    result = agg.aggregate_model()
    np.testing.assert_allclose(result.params["w"], [2.5, 2.5])  # mean of 2 and 3
    sites = {s["site"]: s for s in agg.history[0]["sites"]}
    assert "exceeds 10 x the round's median update norm" in sites["site-5"]["reason"]
    assert sites["site-1"]["payload_bytes"] == 2 and sites["site-1"]["uncompressed_bytes"] == 8
    assert agg.history[0]["aggregation"]["rule"] == "trimmed_mean"


def test_robust_rules_refuse_full_weights_and_too_few_updates_keep_the_model():
    agg = UpdateAggregator(aggregation={"rule": "trimmed_mean", "trim": 1})
    agg.accept_model(_update("site-1", [1.0], 10))
    agg.accept_model(_diff("site-2", [1.0], 10))
    agg.accept_model(_diff("site-3", [2.0], 10))
    result = agg.aggregate_model()
    assert result.params_type == ParamsType.DIFF and result.params == {}  # the global model stays as it was
    assert "works on weight differences" in agg.history[0]["sites"][0]["reason"]


def test_krum_reports_which_sites_it_selected():
    agg = UpdateAggregator(aggregation={"rule": "multi_krum", "byzantine": 1, "select": 2, "outlier_factor": None})
    for i, w in enumerate([1.0, 1.1, 0.9, 1.05]):
        agg.accept_model(_diff(f"site-{i + 1}", [w, w], 10))
    agg.accept_model(_diff("site-5", [-30.0, 40.0], 10))
    agg.aggregate_model()
    assert "site-5" not in agg.history[0]["aggregation"]["selected"]
    assert len(agg.history[0]["aggregation"]["selected"]) == 2


def test_central_dp_clips_averages_equally_and_accounts():
    agg = UpdateAggregator(
        central_dp={"mechanism": "client-central", "target_epsilon": 8.0, "clip_norm": 1.0}, num_rounds=2
    )
    agg.accept_model(_diff("site-1", np.full(50_000, 100.0), 10))  # huge update: clipped to norm 1
    agg.accept_model(_diff("site-2", np.zeros(50_000), 5000))  # sample count gives no extra weight
    agg.accept_model(_update("site-3", np.zeros(50_000), 10))  # full weights are refused under central DP
    result = agg.aggregate_model()
    info = agg.history[0]["central_dp"]
    assert info["clip_norm"] == 1.0 and info["update_norms"][0] == pytest.approx(100.0 * np.sqrt(50_000))
    # mean of a norm-1 update and zero (norm 0.5), plus noise of std z * C / 2 per coordinate
    expected_std = info["noise_multiplier"] * 1.0 / 2
    assert np.std(result.params["w"]) == pytest.approx(expected_std, rel=0.05)
    assert 0 < info["epsilon"] < 8.0
    assert not agg.history[0]["sites"][2]["accepted"]


def test_central_dp_runs_the_same_screen_as_the_rules():
    """Under central DP an odd update arriving first cannot get the others rejected (the
    layout is the round's majority, as with every rule), and one site's norm or direction
    never decides whether another's update counts: those screens would let one site change
    the clipped sum by more than one clip norm."""
    agg = UpdateAggregator(
        central_dp={"mechanism": "client-central", "target_epsilon": 8.0, "clip_norm": 1.0}, num_rounds=2
    )
    odd = FLModel(
        params_type=ParamsType.DIFF,
        params={"w": np.zeros(7, dtype=np.float32)},
        metrics={"val_auc": 0.5},
        current_round=0,
        meta={"client_name": "site-0", "n_samples": 10, "train_seconds": 0.1},
    )
    agg.accept_model(odd)  # first to arrive, with a layout no other site shares
    agg.accept_model(_diff("site-1", [1.0, 1.0], 10))
    agg.accept_model(_diff("site-2", [1.1, 0.9], 10))
    agg.accept_model(_diff("site-3", [-500.0, -500.0], 10))  # far larger and opposite: still counted, clipped
    agg.aggregate_model()

    sites = {s["site"]: s for s in agg.history[0]["sites"]}
    assert not sites["site-0"]["accepted"] and "shape" in sites["site-0"]["reason"]
    assert all(sites[f"site-{i}"]["accepted"] for i in (1, 2, 3))
    assert agg.history[0]["central_dp"]["update_norms"][2] == pytest.approx(500.0 * np.sqrt(2))
