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


def _small_federation():
    from hospital_fl.data.federated import load_federated
    from hospital_fl.data.splits import SplitConfig

    return load_federated(SplitConfig(num_sites=3))


def test_in_process_he_round_uses_the_bounded_weights(monkeypatch):
    from hospital_fl.bench import federated_loop
    from hospital_fl.bench.attacks import Attack
    from hospital_fl.models.cxr import ModelConfig
    from hospital_fl.privacy.he_params import CKKSParams
    from hospital_fl.training.config import TrainConfig

    seen = []

    def fake_round(weights, updates, counts, params, contexts):
        seen.append(list(counts))
        return weights, {"uplink_bytes": 0.0}

    monkeypatch.setattr(federated_loop, "_he_contexts", lambda params: (None, None))
    monkeypatch.setattr(federated_loop, "_encrypted_round", fake_round)
    data = _small_federation()
    run = federated_loop.run_federated_in_process(
        data, ModelConfig(), TrainConfig(torch_threads=1), 1, attack=Attack("inflate"), he=CKKSParams()
    )
    honest = [len(s.train) for s in data.sites]
    cap = 3.0 * float(np.median([honest[0] * 100, *honest[1:]]))
    assert seen == [[min(honest[0] * 100, cap), *map(float, honest[1:])]]
    assert run.rounds[0]["weight_clips"][0]["index"] == 0


def test_in_process_scaffold_screens_control_changes(monkeypatch):
    import dataclasses

    from hospital_fl.bench import federated_loop
    from hospital_fl.models.cxr import ModelConfig
    from hospital_fl.training.config import TrainConfig

    real = federated_loop.run_site_round

    def nan_control(site, *args, **kwargs):
        out = real(site, *args, **kwargs)
        if site.name == "site-1":
            nan = {k: np.full_like(v, np.nan) for k, v in out.control_delta.items()}
            out = dataclasses.replace(out, control_delta=nan)
        return out

    monkeypatch.setattr(federated_loop, "run_site_round", nan_control)
    run = federated_loop.run_federated_in_process(
        _small_federation(), ModelConfig(), TrainConfig(torch_threads=1), 2, scaffold=True
    )
    assert all("NaN" in r["control_rejected"]["site-1"] for r in run.rounds)
    assert all(np.isfinite(v.numpy()).all() for v in run.model.state_dict().values())
    assert federated_loop._control_screen(federated_loop.AggregationConfig()).min_cosine is None
