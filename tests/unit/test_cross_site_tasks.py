"""A site's part of FLARE's cross-site evaluation, on real FLARE messages and a real CXR site.

Each train round keeps the site's local model (what the server already saw: received plus
sent difference); "submit_model" sends it, or refuses when the job encrypted the site's
updates; "validate" from CrossSiteModelEval scores the model on the site's own local test
and sends one cell, refused under DP.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flare_messages import site_with_engine
from hospital_fl.data.splits import SplitConfig
from hospital_fl.evaluation.clinical.cross_site import SiteCell
from hospital_fl.flare.cross_site import local_model_paths
from hospital_fl.flare.site_executor import SiteExecutor
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.setup import init_site_privacy
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights, predict_proba
from hospital_fl.training.metrics import rank_auc
from hospital_fl.training.site_algorithm import SiteScores, SiteUpdate
from hospital_fl.training.site_round import CXRSiteAlgorithm
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils


def _context(root, site="site-1", job="job-1", result_filters=()):
    """A site in a FLARE workspace running ``job``, whose client config names ``result_filters``."""
    for folder in ("startup", "local"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    config_dir = root / job / f"app_{site}" / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "executors": [],
        "task_result_filters": [{"tasks": ["train"], "filters": [{"path": p} for p in result_filters]}],
    }
    (config_dir / "config_fed_client.json").write_text(json.dumps(config))
    return site_with_engine(root, site, job)


class OneStepSite:
    """A site whose round sends a fixed difference: the kept local model is checkable by hand."""

    job = "one-step"
    dp = None

    def load(self, job, log):
        pass

    def release_plan(self):
        return None

    def sample_count(self):
        return 3

    def train_round(self, task):
        return SiteUpdate({"w": np.full(3, 0.5)}, {}, 3, 0.01, "DIFF")

    def score(self, weights):
        return SiteScores({})


def _train(executor, ctx, weights):
    model = FLModel(ParamsType.FULL, weights, current_round=2, total_rounds=3)
    return executor.execute("train", FLModelUtils.to_shareable(model), ctx, Signal())


def test_a_site_submits_its_last_local_model_the_global_model_plus_its_sent_update(tmp_path):
    executor = SiteExecutor(OneStepSite())
    ctx = _context(tmp_path)

    _train(executor, ctx, {"w": np.arange(3.0)})
    submitted = FLModelUtils.from_shareable(executor.execute("submit_model", Shareable(), ctx, Signal()))

    np.testing.assert_allclose(submitted.params["w"], np.arange(3.0) + 0.5)
    assert submitted.meta["round"] == 2 and submitted.meta["trained_in_job"] == "job-1"
    weights, record = local_model_paths(tmp_path, "one-step")
    assert weights.is_file() and json.loads(record.read_text())["withheld"] is None


def test_after_an_he_job_the_site_refuses_to_submit_its_local_model(tmp_path):
    executor = SiteExecutor(OneStepSite())
    plain, he = (
        _context(tmp_path, job="job-1"),
        _context(tmp_path, job="job-2", result_filters=["hospital_fl.flare.he.EncryptUpdate"]),
    )
    _train(executor, plain, {"w": np.zeros(3)})

    _train(executor, he, {"w": np.zeros(3)})  # the later HE job replaces the older plaintext model
    reply = executor.execute("submit_model", Shareable(), he, Signal())

    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "the job encrypted this site's updates (HE)" in reply.get_header(ReservedHeaderKey.ERROR)
    assert not local_model_paths(tmp_path, "one-step")[0].exists()


def test_a_site_without_a_kept_model_says_how_to_get_one(tmp_path):
    reply = SiteExecutor(OneStepSite()).execute("submit_model", Shareable(), _context(tmp_path), Signal())

    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "run a training job at this site first" in reply.get_header(ReservedHeaderKey.ERROR)


@pytest.fixture(scope="module")
def cxr_site(federated_data):
    """A CXR site with its data loaded (the first site of the default split)."""
    algorithm = CXRSiteAlgorithm(SplitConfig(), ModelConfig(), TrainConfig(device="cpu"), DPConfig())
    algorithm.data = federated_data.sites[0]
    return algorithm


def _validate(executor, ctx, weights, owner="SRV_FL_global_model.pt"):
    task = FLModelUtils.to_shareable(FLModel(ParamsType.FULL, weights))
    task.set_header(AppConstants.MODEL_OWNER, owner)
    return executor.execute("validate", task, ctx, Signal())


def test_validate_sends_one_cell_computed_on_the_sites_own_test_data(cxr_site, tmp_path):
    model = build_cxr_model(ModelConfig())

    reply = _validate(SiteExecutor(cxr_site), _context(tmp_path), get_weights(model))

    result = FLModelUtils.from_shareable(reply)
    cell = SiteCell.from_metrics(result.metrics, "reply")
    test = cxr_site.data.test
    assert cell.data_site == "site-1" and cell.n_test == len(test)
    assert cell.auc.estimate == pytest.approx(rank_auc(predict_proba(model, test.images, "cpu"), test.labels))
    assert set(result.metrics) == set(SiteCell.METRIC_KEYS) and not result.params


def test_validate_refuses_a_model_of_another_network_and_refuses_under_dp(cxr_site, federated_data, tmp_path):
    wrong = _validate(SiteExecutor(cxr_site), _context(tmp_path), {"w": np.zeros(3)})
    dp_site = CXRSiteAlgorithm(SplitConfig(), ModelConfig(), TrainConfig(), DPConfig("sample", 8.0), num_rounds=2)
    dp_site.data = federated_data.sites[0]
    dp_root = tmp_path / "dp"
    dp_context = _context(dp_root)
    init_site_privacy(dp_root, "site-1")  # a site's privacy policy and ledger, as provisioning writes them
    under_dp = _validate(SiteExecutor(dp_site), dp_context, get_weights(build_cxr_model(ModelConfig())))

    assert wrong.get_return_code() == under_dp.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "cannot load the model to score" in wrong.get_header(ReservedHeaderKey.ERROR)
    assert "under DP site-1 keeps its scores at the site" in under_dp.get_header(ReservedHeaderKey.ERROR)
