"""Adversary: a curious server reads everything a DP site replies and wants the site's exact
record count (which the sample_count task already withholds from a DP site).

Before, a DP reply carried the DP-SGD sample rate batch/n and the metric sample rate
256/n in plaintext, plus noise multipliers and an exact epsilon calibrated from them: n
followed by one division. The test runs the real executor (real FLARE messages, the
site's real privacy gate and ledger in its workspace) for two sites holding n and n+1
records and compares every field of their replies: apart from the DP-noised count and
metrics, and the training time (a measurement the server also takes by its own clock),
the replies are identical, so nothing in them determines n.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flare_messages import site_with_engine
from hospital_fl.data.federated import SiteData, load_federated
from hospital_fl.data.splits import SplitConfig
from hospital_fl.flare.executor import CXRTrainExecutor
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.setup import init_site_privacy
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights
from hospital_fl.training.private_site import SitePrivacy
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

BATCH = 64
FAST = {"augment": False, "device": "cpu", "torch_threads": 1, "batch_size": BATCH}
# Fields a DP site fills with DP-noised values (the count's release is accounted) or a
# wall-clock measurement; every other field must not depend on n.
# (FLARE copies the reply's metrics, DP-released, into the meta as "initial_metrics".)
NOISY_META = {"n_samples", FLMetaKey.NUM_STEPS_CURRENT_ROUND, "train_seconds", "initial_metrics"}


@pytest.fixture(scope="module")
def base_site() -> SiteData:
    return load_federated(SplitConfig(num_sites=2, seed=0)).sites[0]


def _with_train_records(site: SiteData, n: int) -> SiteData:
    train = dataclasses.replace(site.train, images=site.train.images[:n], labels=site.train.labels[:n])
    return dataclasses.replace(site, train=train)


def test_the_old_reply_fields_gave_the_count_away_and_the_new_ones_do_not():
    cfg = TrainConfig(**FAST)
    for mechanism in ("sample", "client-local", "client-central"):
        dp = DPConfig(mechanism, 3.0)
        replies, counts = [], []
        for n in (300, 301):
            privacy = SitePrivacy(dp, ModelConfig(), cfg, n, 3, "site-1")
            old = privacy.noise_summary()  # what a reply used to carry
            # the adversary's reconstruction from the old fields
            counts.append(round(256 / old["metrics_sample_rate"]))
            if mechanism == "sample":
                assert round(BATCH / old["sample_rate"]) == n
            replies.append(privacy.reply_summary())
        assert counts == [300, 301]  # control: the old fields determined n exactly
        assert replies[0] == replies[1]  # the new ones are the same for n and n + 1
        assert set(replies[0]) == {"mechanism", "delta", "accountant", "epsilon_bound"}


def _ctx(root, site: str) -> FLContext:
    return site_with_engine(root, site, "job-1")


def _site_replies(tmp_path, site: SiteData, n: int) -> tuple[FLModel, FLModel]:
    root = tmp_path / f"ws-{n}"
    for folder in ("job-1", "startup", "local"):  # a FLARE site workspace
        (root / folder).mkdir(parents=True)
    init_site_privacy(root, site.name)  # the site's own kit policy and ledger
    executor = CXRTrainExecutor(train=FAST, privacy=dataclasses.asdict(DPConfig("sample", 8.0)), num_rounds=2)
    executor.algorithm.data = _with_train_records(site, n)  # the site's data, n training records
    ctx = _ctx(root, site.name)
    start = get_weights(build_cxr_model(ModelConfig()))
    task = FLModel(params_type=ParamsType.FULL, params=start, current_round=0, total_rounds=2)
    train = executor.execute("train", FLModelUtils.to_shareable(task), ctx, Signal())
    assert train.get_return_code(ReturnCode.OK) == ReturnCode.OK
    final = executor.execute("validate", FLModelUtils.to_shareable(task), ctx, Signal())
    count = executor.execute("sample_count", FLModelUtils.to_shareable(task), ctx, Signal())
    assert FLModelUtils.from_shareable(count).meta["n_samples"] is None  # withheld, as before
    return FLModelUtils.from_shareable(train), FLModelUtils.from_shareable(final)


def test_a_dp_sites_replies_for_n_and_n_plus_one_records_are_indistinguishable(tmp_path, base_site):
    n = 150
    (train_a, final_a), (train_b, final_b) = (_site_replies(tmp_path, base_site, k) for k in (n, n + 1))

    for a, b in ((train_a, train_b), (final_a, final_b)):
        assert a.params_type == b.params_type and a.current_round == b.current_round
        assert {k: np.shape(v) for k, v in (a.params or {}).items()} == {
            k: np.shape(v) for k, v in (b.params or {}).items()
        }
        assert set(a.meta) == set(b.meta)
        fixed_a = {k: v for k, v in a.meta.items() if k not in NOISY_META}
        fixed_b = {k: v for k, v in b.meta.items() if k not in NOISY_META}
        assert fixed_a == fixed_b, "a reply field other than the DP-noised count depends on n"
        assert set(a.metrics or {}) == set(b.metrics or {})
    # what the train reply carries: DP-released metrics only, the privacy bound, no rates
    assert set(train_a.metrics) == {"train_loss", "grad_norm"}
    assert train_a.meta["privacy"] == {
        "mechanism": "sample",
        "delta": 1e-5,
        "accountant": "rdp",
        "epsilon_bound": 8.0,
    }
    # the final scores and the test count stay at a DP site
    assert final_a.metrics == {} and final_a.meta["n_test"] is None
