import numpy as np
import pytest
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.operating_point import (
    sensitivity_specificity,
    site_operating_point,
    threshold_for_sensitivity,
)


def test_sensitivity_and_specificity_at_a_threshold_by_hand():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.7, 0.5, 0.2, 0.6, 0.5, 0.3, 0.1, 0.05])
    # threshold 0.5, positive when score >= 0.5:
    # positives 0.9, 0.7, 0.5 called -> TP 3, 0.2 missed -> FN 1; sensitivity 3/4
    # negatives 0.6, 0.5 called -> FP 2; 0.3, 0.1, 0.05 -> TN 3; specificity 3/5

    op = sensitivity_specificity(labels, scores, 0.5)

    assert (op.tp, op.fn, op.tn, op.fp) == (3, 1, 3, 2)
    assert op.sensitivity == pytest.approx(0.75) and op.specificity == pytest.approx(0.6)


def test_threshold_is_the_highest_reaching_the_target_sensitivity():
    # 10 positives; sorted descending: .95 .9 .85 .8 .7 .7 .6 .5 .4 .2
    positives = [0.9, 0.2, 0.7, 0.95, 0.4, 0.6, 0.85, 0.7, 0.5, 0.8]
    labels = np.array([1] * 10 + [0] * 3)
    scores = np.array(positives + [0.65, 0.3, 0.1])
    # target 0.5 -> 5 of 10 needed: threshold 0.7 catches .95 .9 .85 .8 .7 .7 = 6/10 (tie), 0.8 only 4/10
    assert threshold_for_sensitivity(labels, scores, 0.5) == 0.7
    # target 0.6 -> 6 needed: 0.7 (6/10, the tie at 0.7 counts twice)
    assert threshold_for_sensitivity(labels, scores, 0.6) == 0.7
    # target 0.7 -> 7 needed: 0.6 (7/10); 0.9 -> 9 needed: 0.4; 0.95 and 1.0 -> all 10: 0.2
    assert threshold_for_sensitivity(labels, scores, 0.7) == 0.6
    assert threshold_for_sensitivity(labels, scores, 0.9) == 0.4
    assert threshold_for_sensitivity(labels, scores) == 0.2  # default target 0.95
    assert threshold_for_sensitivity(labels, scores, 1.0) == 0.2


def test_threshold_from_validation_is_applied_to_test():
    val_labels = np.array([1, 1, 1, 1, 0, 0, 0])
    val_scores = np.array([0.9, 0.8, 0.6, 0.3, 0.5, 0.2, 0.1])
    # target 0.75: 3 of 4 positives -> highest threshold 0.6 (validation sensitivity 3/4)
    test_labels = np.array([1, 1, 1, 0, 0, 0, 0])
    test_scores = np.array([0.95, 0.55, 0.65, 0.7, 0.4, 0.3, 0.61])
    # at 0.6: positives .95 .65 caught, .55 missed -> sens 2/3; negatives .7 .61 called -> spec 2/4

    result = site_operating_point(val_labels, val_scores, test_labels, test_scores, target_sensitivity=0.75)

    assert result.threshold == 0.6 and result.validation_sensitivity == 0.75
    assert result.test.sensitivity == pytest.approx(2 / 3) and result.test.specificity == pytest.approx(0.5)
    assert result.to_dict()["test"]["tp"] == 2


def test_clear_errors_for_no_positives_and_a_target_outside_zero_one():
    with pytest.raises(InputError, match="validation y_true: got 'no positive labels'.*Fix: choose the threshold"):
        threshold_for_sensitivity(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]))
    for bad in (0, 0.0, 1.5, -0.1, 95):
        with pytest.raises(InputError, match=rf"target_sensitivity: got {bad!r}; it must lie in \(0, 1\]"):
            threshold_for_sensitivity(np.array([1, 0]), np.array([0.9, 0.1]), bad)
    with pytest.raises(InputError, match="y_true: got 'no positive labels'; sensitivity needs"):
        sensitivity_specificity(np.array([0, 0]), np.array([0.1, 0.9]), 0.5)
    with pytest.raises(InputError, match="y_true: got 'no negative labels'; specificity needs"):
        sensitivity_specificity(np.array([1, 1]), np.array([0.1, 0.9]), 0.5)
