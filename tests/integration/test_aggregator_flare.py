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
