"""The FLARE site adapter on real FLARE messages, driving the smallest real site algorithm.

The algorithm is linear least squares on each site's own rows (one gradient step a round),
so every number a reply carries can be recomputed here. The adapter must map FLARE's tasks
onto the algorithm's calls, build the replies, refuse a job once and for every task, and
check the site's policy before any data is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flare_messages import site_context, site_with_engine
from hospital_fl.errors import InputError
from hospital_fl.flare.site_executor import FINAL_MODEL_FILE, SiteExecutor
from hospital_fl.privacy.policy import SitePrivacyPolicy
from hospital_fl.privacy.setup import init_site_privacy
from hospital_fl.training.site_algorithm import RoundTask, SiteAlgorithm, SiteJob, SiteLog, SiteScores, SiteUpdate
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

LR = 0.1


def _rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    return x, x @ np.array([1.0, -2.0, 0.5]) + rng.normal(0, 0.1, n)


SITES = {"site-1": (_rows(1, 40), _rows(2, 10)), "site-2": (_rows(3, 25), _rows(4, 8))}


class LeastSquaresSite:
    """Linear least squares on one site's rows: a round is one gradient step from the global weights."""

    job = "least-squares"
    dp = None

    def __init__(self, sites: dict = SITES):
        self.sites, self.data, self.loads, self.tasks = sites, None, 0, []

    def load(self, job: SiteJob, log: SiteLog) -> None:
        if self.data is not None:
            return
        self.loads += 1
        if job.site not in self.sites:
            raise InputError("site name", job.site, f"this federation holds {sorted(self.sites)}", "run it there")
        self.data = self.sites[job.site]
        log.info(f"{len(self.data[0][1])} training rows")

    def release_plan(self) -> None:
        return None

    def sample_count(self) -> int:
        return len(self.data[0][1])

    def train_round(self, task: RoundTask) -> SiteUpdate:
        self.tasks.append(task)
        (x, y), w = self.data[0], np.asarray(task.weights["w"])
        step = -LR * x.T @ (x @ w - y) / len(y)
        mse = float(np.mean((x @ w - y) ** 2))
        return SiteUpdate({"w": step}, {"train_mse": mse}, len(y), 0.01, "DIFF", {"train_mse": mse})

    def score(self, weights: dict) -> SiteScores:
        x, y = self.data[1]
        mse = float(np.mean((x @ np.asarray(weights["w"]) - y) ** 2))
        return SiteScores({"test_mse": mse}, {"test_mse": mse}, {"n_test": len(y)})


def _site_with_workspace(tmp_path: Path, site: str, job: str = "job-1", **policy):
    """The context of ``site`` in a FLARE workspace whose kit holds ``policy``."""
    for folder in ("startup", "local", job):  # a FLARE site workspace
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    if policy:
        init_site_privacy(tmp_path, site, SitePrivacyPolicy(**policy))
    return site_with_engine(tmp_path, site, job)


def _task(weights: dict, rnd: int = 1, total: int = 3, meta: dict | None = None) -> Shareable:
    model = FLModel(ParamsType.FULL, weights, current_round=rnd, total_rounds=total, meta=meta or {})
    return FLModelUtils.to_shareable(model)


START = {"w": np.zeros(3)}


def test_the_algorithm_satisfies_the_interface():
    assert isinstance(LeastSquaresSite(), SiteAlgorithm)


def test_a_train_task_returns_the_sites_step_its_count_and_metrics():
    algorithm = LeastSquaresSite()
    executor = SiteExecutor(algorithm)
    mu, control = 0.3, {"w": np.ones(3)}

    reply = executor.execute(
        "train",
        _task(START, meta={AlgorithmConstants.FEDPROX_MU: mu, AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: control}),
        site_context("site-1", "job-1"),
        Signal(),
    )

    result = FLModelUtils.from_shareable(reply)
    (x, y), _ = SITES["site-1"]
    np.testing.assert_allclose(result.params["w"], LR * x.T @ y / len(y))
    assert result.params_type == ParamsType.DIFF and result.current_round == 1
    assert result.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] == result.meta["n_samples"] == 40
    assert result.meta["train_seconds"] == 0.01
    assert result.metrics == {"train_mse": pytest.approx(float(np.mean(y**2)))}
    assert AlgorithmConstants.SCAFFOLD_CTRL_DIFF not in result.meta  # the algorithm sent no control change
    (task,) = algorithm.tasks
    assert (task.round_index, task.total_rounds, task.fedprox_mu) == (1, 3, mu)
    assert task.server_control is not None and set(task.server_control) == {"w"}


def test_sample_count_and_validate_answer_from_the_sites_own_data(tmp_path):
    executor = SiteExecutor(LeastSquaresSite())
    ctx = _site_with_workspace(tmp_path, "site-2")
    final = {"w": np.array([1.0, -2.0, 0.5])}

    count = FLModelUtils.from_shareable(executor.execute("sample_count", Shareable(), ctx, Signal()))
    scored = FLModelUtils.from_shareable(executor.execute("validate", _task(final), ctx, Signal()))

    assert count.meta["n_samples"] == 25
    x, y = SITES["site-2"][1]
    assert scored.metrics == {"test_mse": pytest.approx(float(np.mean((x @ final["w"] - y) ** 2)))}
    assert scored.meta["n_test"] == 8 and not scored.params
    kept = torch.load(tmp_path / "job-1" / FINAL_MODEL_FILE)  # the final model stays in the site's run folder
    np.testing.assert_array_equal(kept["w"].numpy(), final["w"])


def test_unknown_tasks_are_declined_and_tasks_without_a_model_are_bad_data():
    algorithm = LeastSquaresSite()
    executor = SiteExecutor(algorithm)

    unknown = executor.execute("get_weights", Shareable(), site_context("site-1", "job-1"), Signal())

    assert unknown.get_return_code() == ReturnCode.TASK_UNKNOWN
    assert algorithm.loads == 0  # an unknown task reads nothing
    for task in ("train", "validate"):
        reply = executor.execute(task, Shareable(), site_context("site-1", "job-1"), Signal())
        assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA
    assert algorithm.tasks == []


def test_a_site_whose_data_fails_refuses_every_task_with_the_reason_once():
    algorithm = LeastSquaresSite()
    executor = SiteExecutor(algorithm)
    ctx = site_context("hospital-z", "job-1")

    replies = [executor.execute(task, _task(START), ctx, Signal()) for task in ("train", "sample_count", "validate")]

    for reply in replies:
        assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
        reason = reply.get_header(ReservedHeaderKey.ERROR)
        assert reason.startswith("site data refused this job at hospital-z: site name: got 'hospital-z'")
        assert "Fix: run it there" in reason
    assert algorithm.loads == 1 and algorithm.tasks == []


def test_a_site_that_requires_dp_refuses_a_job_without_dp_before_reading_data(tmp_path):
    algorithm = LeastSquaresSite()
    executor = SiteExecutor(algorithm)
    ctx = _site_with_workspace(tmp_path, "site-1", require_dp=True)

    reply = executor.execute("train", _task(START), ctx, Signal())

    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    reason = reply.get_header(ReservedHeaderKey.ERROR)
    assert reason.startswith("privacy gate refused this job at site-1: ")
    assert "requires differential privacy" in reason and "run least-squares only at hospitals" in reason
    assert algorithm.loads == 0 and algorithm.data is None


def test_an_aborted_round_is_answered_as_aborted():
    executor = SiteExecutor(LeastSquaresSite())
    abort = Signal()
    abort.trigger("the server ended the job")

    reply = executor.execute("train", _task(START), site_context("site-1", "job-1"), abort)

    assert reply.get_return_code() == ReturnCode.TASK_ABORTED
