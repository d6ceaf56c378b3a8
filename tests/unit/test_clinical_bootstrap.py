import numpy as np
import pytest
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.bootstrap import bootstrap_auc, bootstrap_ci
from hospital_fl.training.metrics import bootstrap_auc_ci, rank_auc


def _scores(n, rng):
    labels = rng.integers(0, 2, n)
    return labels, rng.normal(labels * 1.2, 1.0)


def test_auc_interval_equals_the_reports_and_is_reproducible():
    labels, scores = _scores(300, np.random.default_rng(0))

    ci = bootstrap_auc(labels, scores, n_boot=500, seed=3)

    assert (ci.low, ci.high) == bootstrap_auc_ci(scores, labels, n_boot=500, seed=3)
    assert ci.estimate == rank_auc(scores, labels) and ci.low < ci.estimate < ci.high
    assert bootstrap_auc(labels, scores, n_boot=500, seed=3) == ci
    assert bootstrap_auc(labels, scores, n_boot=500, seed=4) != ci


def test_any_metric_and_a_narrower_interval_at_a_lower_level():
    labels, scores = _scores(400, np.random.default_rng(1))

    def sensitivity_at_zero(s, y):
        return float((s[y == 1] >= 0).mean()) if (y == 1).any() else float("nan")

    wide = bootstrap_ci(sensitivity_at_zero, labels, scores, n_boot=400, level=0.95)
    narrow = bootstrap_ci(sensitivity_at_zero, labels, scores, n_boot=400, level=0.5)

    assert wide.estimate == sensitivity_at_zero(scores, labels)
    assert wide.low < narrow.low <= wide.estimate <= narrow.high < wide.high
    assert wide.to_dict()["ci"] == [wide.low, wide.high]


def test_one_class_resamples_are_skipped_and_counted():
    # one positive among ten: a resample misses it with probability (9/10)^10 = 0.349
    labels = np.array([1] + [0] * 9)
    scores = np.linspace(1, 0, 10)

    ci = bootstrap_auc(labels, scores, n_boot=1000)

    assert 300 < ci.n_skipped < 400
    assert ci.low <= ci.estimate <= ci.high == 1.0
    with pytest.raises(InputError, match=r"of 1000 resamples undefined'; at most 20% of resamples may lack a class"):
        bootstrap_ci(rank_auc, labels, scores, n_boot=1000, max_skipped_fraction=0.2)


def test_bad_inputs():
    with pytest.raises(InputError, match="y_true: got '0 positives of 3'; the metric is undefined on the full data"):
        bootstrap_auc(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(InputError, match="n_boot: got 10; it must be an integer >= 100"):
        bootstrap_auc(np.array([0, 1]), np.array([0.1, 0.2]), n_boot=10)
    with pytest.raises(InputError, match=r"level: got 95; it must lie in \(0, 1\)"):
        bootstrap_auc(np.array([0, 1]), np.array([0.1, 0.2]), level=95)
