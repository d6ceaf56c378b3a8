"""One lying hospital cannot stop a round or make the server allocate unbounded memory.

A compressed payload is checked against the global model's layout before it is expanded
(the real DecompressUpdate filter with FLARE's global model in its context); a bad metric
is refused before any arithmetic (the real UpdateAggregator). Either way the site is
rejected with the reason in the round history and the other sites aggregate. The last test
plays both lies through the real FLARE simulator.
"""

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hospital_fl.compression.codecs import MAX_DECODED_VALUES, CompressionConfig, decode, encode
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import UpdateAggregator
from hospital_fl.flare.filters import DecompressUpdate
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.flare.recipes import cxr as jobs
from hospital_fl.flare.runners.simulator import environment, read_job_result, simulator_env
from hospital_fl.jobspec import JobSpec
from hospital_fl.training.config import TrainConfig
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

HERE = Path(__file__).parent
GLOBAL = {"conv.weight": np.zeros((8, 1, 3, 3), np.float32), "fc.weight": np.zeros((2, 8), np.float32)}


@pytest.fixture(autouse=True)
def _importable_test_sites(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def _server_ctx() -> FLContext:
    """A server context holding the global model the way FLARE's model controllers set it."""
    ctx = FLContext()
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(GLOBAL, {}), private=True, sticky=False)
    return ctx


def _honest(scale: float) -> dict:
    rng = np.random.default_rng(int(scale * 10))
    return {k: (rng.standard_normal(v.shape) * 0.01 * scale).astype(np.float32) for k, v in GLOBAL.items()}


def _through_the_server(site: str, payload: dict, n: int = 100, metrics: dict | None = None) -> FLModel:
    """The FLModel the aggregator receives after the server's input filter decoded ``payload``."""
    dxo = DecompressUpdate().process_dxo(DXO(DataKind.WEIGHT_DIFF, data=payload), None, _server_ctx())
    dxo.meta.update({"n_samples": n})
    model = FLModelUtils.from_shareable(dxo.to_shareable())
    model.metrics = metrics if metrics is not None else {"val_auc": 0.8}
    model.current_round = 0
    model.meta["client_name"] = site  # FLARE sets it from the peer
    return model


def _bomb(named_shape) -> dict:
    payload, _ = encode(_honest(1.0), CompressionConfig("topk", 0.1, error_feedback=False))
    one = {"idx": np.zeros(1, np.int32), "val": np.ones(1, np.float32)}
    payload["conv.weight"] = {**one, "shape": named_shape, "dtype": "<f4"}
    return payload


def test_an_oversized_top_k_payload_is_refused_before_allocation_and_the_round_goes_on():
    agg = UpdateAggregator(aggregation={"rule": "fedavg"})
    topk = CompressionConfig("topk", 0.1, error_feedback=False)
    tracemalloc.start()
    try:
        liar = _through_the_server("site-3", _bomb([50_000_000]))  # 8 bytes of index and value; 200 MB decoded
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # nothing near the 200 MB it names was allocated
    for i, site in enumerate(["site-1", "site-2"]):
        agg.accept_model(_through_the_server(site, encode(_honest(i + 1), topk)[0]))
    agg.accept_model(liar)
    result = agg.aggregate_model()

    sites = {s["site"]: s for s in agg.history[0]["sites"]}
    assert not sites["site-3"]["accepted"]
    assert "compressed payload was refused" in sites["site-3"]["reason"]
    assert "the global model's conv.weight has shape (8, 1, 3, 3)" in sites["site-3"]["reason"]
    assert sites["site-1"]["accepted"] and sites["site-2"]["accepted"]
    assert result.params["conv.weight"].shape == (8, 1, 3, 3)


@pytest.mark.parametrize(
    "lie, says",
    [
        (lambda p: p["fc.weight"].update(idx=np.array([0, 10**9], np.int64), val=np.ones(2, np.float32)), "[0, 16)"),
        (lambda p: p["fc.weight"].update(idx=np.zeros(100, np.int32), val=np.ones(100, np.float32)), "at most"),
        (lambda p: p["fc.weight"].update(val=np.array([np.inf], np.float32)), "idx and val"),
        (lambda p: p["fc.weight"].update(val=np.full_like(p["fc.weight"]["val"], np.inf)), "finite"),
        (lambda p: p["fc.weight"].update(dtype="<U1000000"), "floating-point"),
        (lambda p: p["fc.weight"].update(shape=["16"]), "non-negative integers"),
        (lambda p: p["fc.weight"].update(shape=[-1, -16]), "non-negative integers"),
        (lambda p: p.update({"extra": {"raw": np.zeros(10**6, np.float32)}}), "unknown"),
        (lambda p: p.pop("fc.weight"), "missing"),
        (lambda p: p.update({"fc.weight": "text"}), "mapping"),
        (lambda p: p.update({"fc.weight": {"raw": np.zeros((16, 1), np.float32)}}), "shape (2, 8)"),
    ],
)
def test_every_malformed_payload_is_refused_with_its_reason(lie, says):
    payload, _ = encode(_honest(1.0), CompressionConfig("topk", 0.2, error_feedback=False))
    lie(payload)

    with pytest.raises(InputError) as err:
        decode(payload, {k: (v.shape, v.dtype) for k, v in GLOBAL.items()})
    assert says in str(err.value)
    model = _through_the_server("site-9", payload)
    assert set(model.params) == {"hospital_fl_refused"} and says in model.meta["hospital_fl_decode_problem"]


def test_without_a_layout_the_decoded_size_is_still_bounded():
    with pytest.raises(InputError, match=f"at most {MAX_DECODED_VALUES}"):
        decode(_bomb([MAX_DECODED_VALUES + 1]))


@pytest.mark.parametrize(
    "metric, says",
    [
        ("high", "is a str"),
        (float("nan"), "is nan"),
        (float("inf"), "is inf"),
        ({"nested": 1.0}, "is a dict"),
        ([0.9], "is a list"),
        (True, "is a bool"),
    ],
)
def test_a_bad_metric_is_rejected_with_the_reason_and_the_others_aggregate(metric, says):
    agg = UpdateAggregator()
    for i, site in enumerate(["site-1", "site-2"]):
        agg.accept_model(
            FLModel(
                params_type=ParamsType.DIFF,
                params=_honest(i + 1),
                metrics={"val_auc": 0.7 + 0.1 * i},
                current_round=0,
                meta={"client_name": site, "n_samples": 100},
            )
        )
    agg.accept_model(
        FLModel(
            params_type=ParamsType.DIFF,
            params=_honest(3),
            metrics={"val_auc": metric},
            current_round=0,
            meta={"client_name": "site-3", "n_samples": 100},
        )
    )
    result = agg.aggregate_model()

    sites = {s["site"]: s for s in agg.history[0]["sites"]}
    assert not sites["site-3"]["accepted"]
    assert says in sites["site-3"]["reason"] and "'val_auc'" in sites["site-3"]["reason"]
    assert result.metrics["val_auc"] == pytest.approx(0.75)
    json.dumps(agg.history)  # the history stays writable


def test_both_lies_in_the_flare_simulator_leave_the_round_to_the_honest_site(tmp_path, monkeypatch):
    from lying_sites import LyingSiteExecutor  # noqa: PLC0415 (the module the simulated sites import)

    spec = JobSpec(
        name="lying_sites",
        num_rounds=1,
        split=SplitConfig(num_sites=3),
        train=TrainConfig(torch_threads=1, augment=False),
        uplink=CompressionConfig("topk", 0.05),
    )
    lies = {"site-2": "text_metric", "site-3": "bomb"}
    monkeypatch.setattr(jobs, "CXRTrainExecutor", lambda **args: LyingSiteExecutor(lies=lies, **args))
    env = simulator_env(tmp_path, spec.name, spec.num_sites)
    policy = allow_bundle_components(tmp_path / spec.name / "local")
    resources = json.loads(policy.read_text())
    resources[next(k for k in resources if isinstance(resources[k], list))] += ["lying_sites."]
    policy.write_text(json.dumps(resources))
    recipe = jobs.build_recipe(spec)
    with environment({"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}):
        recipe.run(env)
    run = read_job_result(tmp_path / spec.name / "server", 0.0)

    assert [h["round"] for h in run.history] == [0]
    sites = {s["site"]: s for s in run.history[0]["sites"]}
    assert not sites["site-3"]["accepted"] and "compressed payload was refused" in sites["site-3"]["reason"]
    assert "has shape" in sites["site-3"]["reason"]
    assert not sites["site-2"]["accepted"] and "metric 'val_auc' is a str" in sites["site-2"]["reason"]
    assert sites["site-1"]["accepted"]  # the round went on with the honest site
