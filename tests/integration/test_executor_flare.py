"""The site executor on real FLARE messages: what a hospital receives and sends back."""

import numpy as np
import pytest
from hospital_fl.errors import InputError
from hospital_fl.flare.executor import CXRTrainExecutor
from hospital_fl.models.cxr import build_cxr_model
from hospital_fl.training.loops import get_weights
from nvflare.apis.fl_constant import FLMetaKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

pytestmark = pytest.mark.integration

FAST = {"augment": False, "device": "cpu", "torch_threads": 1}


def _ctx(site):
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    return ctx


def _task(weights, meta=None):
    return FLModelUtils.to_shareable(
        FLModel(params_type=ParamsType.FULL, params=weights, current_round=1, total_rounds=3, meta=meta or {})
    )


def _drift(reply):
    """Squared distance the site moved from the global model (the reply is the difference)."""
    params = FLModelUtils.from_shareable(reply).params
    return sum(float((np.asarray(v) ** 2).sum()) for v in params.values())


def test_train_task_returns_the_difference_sample_count_and_metrics():
    executor = CXRTrainExecutor(train=FAST)
    start = get_weights(build_cxr_model())

    reply = executor.execute("train", _task(start), _ctx("site-3"), Signal())

    result = FLModelUtils.from_shareable(reply)
    assert result.params_type == ParamsType.DIFF and set(result.params) == set(start)
    assert result.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] == result.meta["n_samples"] == 151
    assert result.current_round == 1
    assert {"val_auc", "test_auc", "train_loss"} <= set(result.metrics)
    assert _drift(reply) > 0


def test_fedprox_mu_sent_by_the_server_holds_the_site_near_the_global_model():
    executor = CXRTrainExecutor(train={**FAST, "lr": 0.005})
    start = get_weights(build_cxr_model())

    plain = executor.execute("train", _task(start), _ctx("site-2"), Signal())
    prox = executor.execute("train", _task(start, {"fedprox_mu": 10.0}), _ctx("site-2"), Signal())

    assert _drift(prox) < 0.5 * _drift(plain)


def test_under_scaffold_the_site_keeps_its_control_and_returns_its_change():
    executor = CXRTrainExecutor(train=FAST)
    start = get_weights(build_cxr_model())
    zeros = {k: np.zeros_like(v) for k, v in start.items()}

    first = FLModelUtils.from_shareable(
        executor.execute(
            "train", _task(start, {AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: zeros}), _ctx("site-2"), Signal()
        )
    )
    delta = first.meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF]
    assert set(delta) == set(start) and any(np.abs(v).sum() > 0 for v in delta.values())
    kept = {k: v.copy() for k, v in executor.algorithm.control.items()}
    for k in delta:  # the site starts from zero, so its control equals the first change
        np.testing.assert_allclose(kept[k], delta[k], rtol=1e-6)
    # a plain FedAvg task leaves the control untouched and returns none
    plain = FLModelUtils.from_shareable(executor.execute("train", _task(start), _ctx("site-2"), Signal()))
    assert AlgorithmConstants.SCAFFOLD_CTRL_DIFF not in plain.meta


def test_other_tasks_are_declined_and_unknown_sites_named():
    executor = CXRTrainExecutor(train=FAST)

    assert (
        executor.execute("get_weights", Shareable(), _ctx("site-1"), Signal()).get_return_code()
        == ReturnCode.TASK_UNKNOWN
    )
    # the HE job's final "validate" task must carry the model: without one it is answered with an error
    assert (
        executor.execute("validate", Shareable(), _ctx("site-1"), Signal()).get_return_code()
        == ReturnCode.BAD_TASK_DATA
    )
    # an unknown site answers every task with an error naming the problem (the server then ends the job)
    executor = CXRTrainExecutor(train=FAST)
    reply = executor.execute("train", _task(get_weights(build_cxr_model())), _ctx("hospital-z"), Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "site data refused this job at hospital-z: site name: got 'hospital-z'" in executor._refusal


def test_bad_settings_fail_when_the_job_starts():
    with pytest.raises(InputError, match="epochs: got 0"):
        CXRTrainExecutor(train={"epochs": 0})


def test_a_dp_job_without_a_site_workspace_is_refused_not_trained_silently():
    executor = CXRTrainExecutor(train=FAST, privacy={"mechanism": "sample", "target_epsilon": 8.0}, num_rounds=3)
    reply = executor.execute("train", _task(get_weights(build_cxr_model())), _ctx("site-3"), Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "needs the site's FLARE workspace" in executor._refusal


def test_a_dp_job_must_declare_its_rounds():
    with pytest.raises(InputError, match="num_rounds"):
        CXRTrainExecutor(privacy={"mechanism": "sample"})
