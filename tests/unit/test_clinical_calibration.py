import numpy as np
import pytest
from hospital_fl.errors import InputError
from hospital_fl.evaluation.clinical.calibration import (
    expected_calibration_error,
    plot_reliability,
    reliability_diagram,
)


def test_ece_and_bins_on_a_hand_computed_example():
    # 4 bins of width 0.25; a probability p falls in bin floor(4 p), p = 1 in the last bin
    probs = np.array([0.1, 0.2, 0.25, 0.3, 0.6, 0.7, 0.75, 0.9, 1.0, 0.95])
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 1, 1, 0])
    # bin 0 [0, .25):   0.1, 0.2            -> mean 0.15, positives 0/2 = 0.0,  gap 0.15
    # bin 1 [.25, .5):  0.25, 0.3           -> mean 0.275, positives 1/2 = 0.5, gap 0.225
    # bin 2 [.5, .75):  0.6, 0.7            -> mean 0.65, positives 1/2 = 0.5,  gap 0.15
    # bin 3 [.75, 1]:   0.75, 0.9, 1.0, .95 -> mean 0.9,  positives 3/4 = 0.75, gap 0.15
    # ECE = 2/10 * 0.15 + 2/10 * 0.225 + 2/10 * 0.15 + 4/10 * 0.15 = 0.03 + 0.045 + 0.03 + 0.06 = 0.165

    d = reliability_diagram(labels, probs, n_bins=4)

    assert d.counts.tolist() == [2, 2, 2, 4]
    np.testing.assert_allclose(d.mean_confidence, [0.15, 0.275, 0.65, 0.9])
    np.testing.assert_allclose(d.positive_fraction, [0.0, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(d.edges, [0, 0.25, 0.5, 0.75, 1.0])
    assert d.ece == pytest.approx(0.165)
    assert expected_calibration_error(labels, probs, n_bins=4) == pytest.approx(0.165)


def test_empty_bins_are_nan_and_do_not_count():
    # 10 bins; only bins 2 (0.2, 0.25) and 8 (0.8) hold images
    # bin 2: mean 0.225, positives 0/2 -> gap 0.225; bin 8: mean 0.8, positives 1/1 -> gap 0.2
    # ECE = 2/3 * 0.225 + 1/3 * 0.2 = 0.15 + 0.0667 = 0.21667
    d = reliability_diagram(np.array([0, 0, 1]), np.array([0.2, 0.25, 0.8]), n_bins=10)

    assert d.counts.sum() == 3 and d.counts[2] == 2 and d.counts[8] == 1
    assert np.isnan(d.mean_confidence[0]) and np.isnan(d.positive_fraction[9])
    assert d.ece == pytest.approx(2 / 3 * 0.225 + 1 / 3 * 0.2)


def test_a_calibrated_model_has_small_ece_and_an_overconfident_one_large():
    rng = np.random.default_rng(0)
    probs = rng.random(20000)
    labels = (rng.random(20000) < probs).astype(int)  # the label is drawn with probability p
    overconfident = np.clip((probs - 0.5) * 3 + 0.5, 0, 1)

    assert expected_calibration_error(labels, probs) < 0.02
    assert expected_calibration_error(labels, overconfident) > 0.1


def test_bad_inputs_name_the_input_and_the_fix():
    with pytest.raises(
        InputError, match=r"y_score: got 'range \[-2, 3\]'; probabilities must lie in \[0, 1\]. Fix: pass sigmoid"
    ):
        reliability_diagram(np.array([0, 1]), np.array([-2.0, 3.0]))
    with pytest.raises(InputError, match="n_bins: got 0; it must be an integer >= 1"):
        reliability_diagram(np.array([0, 1]), np.array([0.2, 0.8]), n_bins=0)
    with pytest.raises(InputError, match="y_true/y_score: got '2 labels, 3 scores'"):
        reliability_diagram(np.array([0, 1]), np.array([0.2, 0.8, 0.5]))
    with pytest.raises(InputError, match="labels must be 0 or 1"):
        reliability_diagram(np.array([0, 2]), np.array([0.2, 0.8]))


def test_reliability_plot_is_a_png(tmp_path):
    rng = np.random.default_rng(1)
    probs = rng.random(300)
    labels = (rng.random(300) < probs).astype(int)
    diagrams = {"federated": reliability_diagram(labels, probs), "centralized": reliability_diagram(labels, probs**2)}

    path = plot_reliability(diagrams, tmp_path / "calibration.png")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
