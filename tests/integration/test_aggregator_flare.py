"""The FLARE aggregator adapter on real FLModel objects: a bad update is rejected with its
reason while the round still aggregates the good ones."""

import numpy as np
import pytest
from hospital_fl.flare.aggregator import SampleWeightedAggregator
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

pytestmark = pytest.mark.integration


def _update(site, w, n, round_=0):
    return FLModel(
        params_type=ParamsType.FULL,
        params={"w": np.asarray(w, dtype=np.float32)},
        metrics={"val_auc": 0.5 + n / 1000},
        current_round=round_,
        meta={"client_name": site, "n_samples": n, "train_seconds": 0.1},
    )


def test_bad_update_is_rejected_and_the_round_goes_on():
    agg = SampleWeightedAggregator()
    agg.accept_model(_update("site-1", [1.0, 1.0], 100))
    agg.accept_model(_update("site-2", [np.nan, 0.0], 100))
    agg.accept_model(_update("site-3", [3.0, 3.0], 300))

    result = agg.aggregate_model()

    np.testing.assert_allclose(result.params["w"], [2.5, 2.5])
    sites = {s["site"]: s for s in agg.history[0]["sites"]}
    assert not sites["site-2"]["accepted"] and "NaN" in sites["site-2"]["reason"]
    assert result.metrics["val_auc"] == pytest.approx((0.6 * 100 + 0.8 * 300) / 400)


def test_a_round_with_no_valid_update_fails_loudly():
    agg = SampleWeightedAggregator()
    agg.accept_model(_update("site-1", [1.0], 0))

    with pytest.raises(RuntimeError, match="every site's update was rejected"):
        agg.aggregate_model()


def test_rounds_are_kept_apart():
    agg = SampleWeightedAggregator()
    agg.accept_model(_update("site-1", [1.0], 10, round_=0))
    agg.aggregate_model()
    agg.accept_model(_update("site-1", [5.0], 10, round_=1))

    assert agg.aggregate_model().params["w"][0] == 5.0
    assert [h["round"] for h in agg.history] == [0, 1]


def _diff(site, w, n, round_=0):
    model = _update(site, w, n, round_)
    model.params_type = ParamsType.DIFF
    return model


def test_differences_are_averaged_and_a_mixed_round_rejects_the_odd_one():
    agg = SampleWeightedAggregator()
    agg.accept_model(_diff("site-1", [1.0, 1.0], 100))
    agg.accept_model(_update("site-2", [9.0, 9.0], 100))  # full weights in a round of differences
    agg.accept_model(_diff("site-3", [3.0, 3.0], 100))
    result = agg.aggregate_model()
    assert result.params_type == ParamsType.DIFF
    np.testing.assert_allclose(result.params["w"], [2.0, 2.0])
    rejected = [s for s in agg.history[0]["sites"] if not s["accepted"]]
    assert [s["site"] for s in rejected] == ["site-2"] and "differs from this round's" in rejected[0]["reason"]


def test_central_dp_clips_averages_equally_and_accounts():
    agg = SampleWeightedAggregator(
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
