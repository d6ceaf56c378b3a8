"""A hospital that negates its update (an ordinary norm, so the norm screen passes it) must not
pull the default job's FedAvg backwards.

Played against the real FLARE aggregator built from the exported job folder (jobs/cxr_fedavg),
fed real FLModels, and against a real in-process federation of the demo's Dirichlet(0.5)-skewed
hospitals training the demo model on the embedded chest X-rays (the FLARE job's site and
server functions), where the honest hospitals must all pass.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hospital_fl.aggregation.direction import direction_outliers, update_cosines
from hospital_fl.aggregation.strategy import AggregationConfig, aggregate_round
from hospital_fl.bench.attacks import Attack
from hospital_fl.bench.federated_loop import run_federated_in_process
from hospital_fl.data.federated import load_federated
from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import UpdateAggregator
from hospital_fl.flare.recipes.cxr import STANDARD_JOBS
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

ROOT = Path(__file__).resolve().parents[2]
SITES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e"]
COUNTS = [300, 250, 200, 350, 280]


def _job_aggregator(job: str) -> UpdateAggregator:
    """The UpdateAggregator exactly as the committed job folder configures it."""
    config = json.loads((ROOT / "jobs" / job / "app" / "config" / "config_fed_server.json").read_text())
    aggregator = config["workflows"][0]["args"]["aggregator"]
    assert aggregator["path"] == "hospital_fl.flare.aggregator.UpdateAggregator"
    return UpdateAggregator(**aggregator["args"])


def _updates(seed=0, d=2000, noise=1.0):
    """Five skewed honest updates: one shared direction plus a per-site part as large as it."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(d).astype(np.float32)
    shared /= np.linalg.norm(shared)
    own = rng.standard_normal((len(SITES), d)).astype(np.float32)
    own *= noise / np.linalg.norm(own, axis=1, keepdims=True)
    return [shared + o for o in own], shared


def _send(agg, updates, claims, params_type=ParamsType.DIFF):
    for site, u, n in zip(SITES, updates, claims):
        agg.accept_model(
            FLModel(
                params_type=params_type,
                params={"w": u},
                metrics={"val_auc": 0.8},
                current_round=0,
                meta={"client_name": site, "n_samples": n},
            )
        )
    return agg.aggregate_model()


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_exported_default_job_has_the_direction_screen_on():
    assert _job_aggregator("cxr_fedavg").rule.min_cosine == AggregationConfig().min_cosine == 0.0
    assert STANDARD_JOBS["cxr_fedavg"].aggregation.min_cosine == 0.0


@pytest.mark.parametrize("claim_factor", [1, 100])
def test_default_job_rejects_a_negated_update_of_ordinary_norm(claim_factor):
    agg = _job_aggregator("cxr_fedavg")
    updates, shared = _updates()
    updates[0] = -updates[0]  # the largest say after the bound; its norm equals an honest one's
    claims = [COUNTS[0] * claim_factor, *COUNTS[1:]]
    result = _send(agg, updates, claims)

    sites = {s["site"]: s for s in agg.history[0]["sites"]}
    liar = sites[SITES[0]]
    assert not liar["accepted"]
    assert "cosine similarity" in liar["reason"] and "below the floor 0" in liar["reason"]
    assert f"{liar['update_cosine']:.3f}" in liar["reason"] and liar["update_cosine"] < 0
    assert all(sites[s]["accepted"] and sites[s]["update_cosine"] > 0 for s in SITES[1:])
    # The norm screen saw nothing odd: an ordinary norm.
    honest_norms = [sites[s]["update_norm"] for s in SITES[1:]]
    assert min(honest_norms) * 0.9 < liar["update_norm"] < max(honest_norms) * 1.1
    expected = sum(n * u for n, u in zip(COUNTS[1:], updates[1:])) / sum(COUNTS[1:])
    np.testing.assert_allclose(result.params["w"], expected, rtol=1e-5, atol=1e-7)
    assert _cos(result.params["w"], shared) > 0.5

    # Without the screen (the job before it) the liar drags the round away from the shared
    # direction; with its claim unbounded too, backwards.
    unscreened = UpdateAggregator(aggregation={"min_cosine": None, "claim_cap": None})
    dragged = _cos(_send(unscreened, updates, claims).params["w"], shared)
    assert dragged < _cos(result.params["w"], shared) - 0.1
    assert claim_factor == 1 or dragged < 0


def test_two_colluding_minority_sites_are_both_rejected_and_a_majority_never_is():
    updates, shared = _updates(seed=1)
    flipped = [{"w": -u if i < 2 else u} for i, u in enumerate(updates)]
    result = aggregate_round(AggregationConfig(), flipped, COUNTS)
    assert sorted(result.rejected) == [0, 1]
    assert _cos(result.update["w"], shared) > 0.5

    # Three of five against the other two: the majority is not rejected, whichever side is honest.
    three = [{"w": -u if i < 3 else u} for i, u in enumerate(updates)]
    result = aggregate_round(AggregationConfig(), three, COUNTS)
    assert len(result.rejected) <= 2 and all(i >= 3 for i in result.rejected)
    assert direction_outliers([-0.5, -0.4, -0.3, 0.9, 0.8], 0.0) == []  # a majority below the floor
    assert direction_outliers([-0.5, 0.9], 0.0) == []  # too few updates to trust a median


def test_full_weights_are_not_direction_screened():
    agg = UpdateAggregator()
    updates, _ = _updates()
    updates[0] = -updates[0]
    _send(agg, [u + 10.0 for u in updates], COUNTS, params_type=ParamsType.FULL)
    assert all(s["accepted"] and "update_cosine" not in s for s in agg.history[0]["sites"])


def test_a_zero_update_and_integer_buffers_carry_no_direction():
    updates, _ = _updates()
    with_buffers = [{"w": u, "n": np.array(7, np.int64)} for u in updates]
    with_buffers[2] = {"w": np.zeros_like(updates[2]), "n": np.array(-10**9, np.int64)}
    cosines = update_cosines(with_buffers)
    assert cosines[2] == 0.0 and all(c > 0 for i, c in enumerate(cosines) if i != 2)
    assert 2 not in aggregate_round(AggregationConfig(), with_buffers, COUNTS).rejected


@pytest.mark.parametrize("bad", [-1.5, 1.0, True, "0"])
def test_min_cosine_outside_its_range_is_refused(bad):
    with pytest.raises(InputError, match="min_cosine"):
        AggregationConfig(min_cosine=bad)


def test_real_skewed_hospitals_pass_and_a_sign_flipping_one_is_rejected():
    """Two rounds of the demo federation (Dirichlet 0.5, 5 hospitals, real training)."""
    spec = STANDARD_JOBS["cxr_fedavg"]
    data = load_federated(dataclasses.replace(spec.split, alpha=0.5, seed=0))
    train = dataclasses.replace(spec.train, torch_threads=1, seed=0)
    run = run_federated_in_process(data, spec.model, train, 2, aggregation=spec.aggregation, attack=Attack("sign_flip"))
    for rnd in run.rounds:
        assert list(rnd["rejected"]) == [data.sites[0].name], rnd
        assert "cosine similarity" in rnd["rejected"][data.sites[0].name]
        honest = [c for name, c in rnd["cosines"].items() if name != data.sites[0].name]
        assert rnd["cosines"][data.sites[0].name] < 0 < min(honest)


def test_the_screen_never_starves_krum_which_weeds_the_outlier_out_itself():
    updates, shared = _updates(seed=2)
    updates[0] = -updates[0]
    result = aggregate_round(AggregationConfig(rule="multi_krum"), [{"w": u} for u in updates], COUNTS)
    assert result.update is not None and not result.rejected  # Krum on 5 sites needs all 5
    assert 0 not in result.info["selected"] and _cos(result.update["w"], shared) > 0.5
    trimmed = aggregate_round(AggregationConfig(rule="trimmed_mean"), [{"w": u} for u in updates], COUNTS)
    assert list(trimmed.rejected) == [0]  # 4 left: enough for a trimmed mean dropping 1 per side
