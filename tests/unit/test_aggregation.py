import numpy as np
import pytest
from hospital_fl.aggregation.validation import update_problem
from hospital_fl.aggregation.weighted import weighted_mean


def test_weighted_mean_weights_by_sample_count():
    a = {"w": np.array([0.0, 2.0], dtype=np.float32), "n": np.array(2, dtype=np.int64)}
    b = {"w": np.array([4.0, 6.0], dtype=np.float32), "n": np.array(5, dtype=np.int64)}

    out = weighted_mean([a, b], [1, 3])

    np.testing.assert_allclose(out["w"], [3.0, 5.0])
    assert out["w"].dtype == np.float32
    assert out["n"] == 4 and out["n"].dtype == np.int64


def test_weighted_mean_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="need one weight per update"):
        weighted_mean([{"w": np.ones(2)}], [1, 2])


@pytest.mark.parametrize(
    "update,n,reason",
    [
        ({"w": np.array([np.nan, 1.0])}, 10, "w contains NaN or infinite values"),
        ({"w": np.ones(3)}, 10, "w has shape (3,), expected (2,)"),
        ({"w": np.ones(2), "v": np.ones(2)}, 10, "holds 1 weight(s) the model does not have (e.g. ['v'])"),
        ({"v": np.ones(2)}, 10, "lacks 1 weight(s) the model has (e.g. ['w'])"),
        ({"w": np.ones(2, dtype=np.float32)}, 10, "w has dtype float32, expected float64"),
        ({"w": [1.0, 1.0]}, 10, "w is a list, expected a numpy array"),
        ({"w": np.ones(2)}, 0, "n_samples must be a positive integer, got 0"),
        ({"w": np.ones(2)}, None, "n_samples must be a positive integer, got None"),
    ],
)
def test_bad_updates_are_named_with_their_reason(update, n, reason):
    problem = update_problem(update, n, reference={"w": np.zeros(2)})

    assert problem is not None and reason in problem


def test_a_good_update_passes():
    assert update_problem({"w": np.ones(2)}, 7, reference={"w": np.zeros(2)}) is None
