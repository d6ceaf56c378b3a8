import numpy as np
import pytest
from hospital_fl.training.metrics import binary_metrics, bootstrap_auc_ci, rank_auc, roc_auc, roc_curve


def test_rank_auc_matches_monai_including_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    probs = np.round(rng.random(500) * 0.5 + labels * 0.3, 2)  # rounding creates ties

    assert rank_auc(probs, labels) == pytest.approx(roc_auc(probs, labels), abs=1e-9)


def test_binary_metrics_on_a_hand_counted_example():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    probs = np.array([0.9, 0.8, 0.3, 0.6, 0.1, 0.2, 0.4, 0.7])  # TP=3 FN=1 FP=1 TN=3

    m = binary_metrics(probs, labels)

    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(14 / 16)


def test_bootstrap_interval_brackets_the_point_estimate_and_narrows_with_data():
    rng = np.random.default_rng(1)

    def sample(n):
        labels = rng.integers(0, 2, n)
        return rng.normal(labels * 1.0, 1.0), labels

    small, large = sample(100), sample(3000)
    lo_s, hi_s = bootstrap_auc_ci(*small, n_boot=300)
    lo_l, hi_l = bootstrap_auc_ci(*large, n_boot=300)

    assert lo_l <= rank_auc(*large) <= hi_l
    assert hi_s - lo_s > hi_l - lo_l


def test_roc_curve_runs_from_origin_to_corner():
    fpr, tpr = roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))

    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_a_site_leaves_out_a_metric_it_could_not_compute():
    # an AUC on a one-class validation split is NaN; the server rejects an update carrying it
    from hospital_fl.training.metrics import rank_auc, reportable_metrics

    auc = rank_auc(np.array([0.2, 0.7]), np.array([0, 0]))
    assert np.isnan(auc)
    sent = reportable_metrics({"val_auc": auc, "train_loss": 0.4, "hd95": None, "inf": float("inf")})
    assert sent == {"train_loss": 0.4}
