"""FLARE Executor that runs one CXR training round at a hospital.

The executor ships with the installed package and is named by path in the job config, so a
job folder carries no code (no BYOC permission needed at hospitals). All maths lives in
hospital_fl.training.site_round; this class only converts FLARE messages to plain data.
"""

from __future__ import annotations

import torch
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from hospital_fl.data.federated import FederatedDataset, load_federated
from hospital_fl.data.splits import SplitConfig
from hospital_fl.models.cxr import ModelConfig
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.site_round import run_site_round

__all__ = ["CXRTrainExecutor", "TRAIN_TASK"]

TRAIN_TASK = "train"


class CXRTrainExecutor(Executor):
    """Trains the CXR classifier on this hospital's data for each "train" task.

    Each task: score the received global model on the site's validation and local test
    portions, train it for ``train["epochs"]`` epochs, and send back the weights with the
    sample count (the aggregation weight) and the seconds spent training.

    Args:
        split: SplitConfig fields (which images this site holds in the embedded dataset).
        model: ModelConfig fields (must match the server's initial model).
        train: TrainConfig fields (local epochs per round, optimiser, device, AMP).
        data_path: a MedMNIST-layout .npz instead of the embedded dataset.
    """

    def __init__(
        self,
        split: dict | None = None,
        model: dict | None = None,
        train: dict | None = None,
        data_path: str | None = None,
    ):
        super().__init__()
        # Kept under the argument names: FLARE's job export reads them back into the config.
        self._split, self._model, self._train = split, model, train
        # Validate at construction: a bad setting fails the job start, not round 1.
        self.split_cfg = SplitConfig(**(split or {}))
        self.model_cfg = ModelConfig(**(model or {}))
        self.train_cfg = TrainConfig(**(train or {}))
        self.data_path = data_path
        self._data: FederatedDataset | None = None

    _always_serialize_args = ("split", "model", "train")

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name != TRAIN_TASK:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if self._data is None:
            if self.train_cfg.torch_threads:
                torch.set_num_threads(self.train_cfg.torch_threads)
            self._data = load_federated(self.split_cfg, self.data_path)
        site = self._data.site(fl_ctx.get_identity_name())
        received = FLModelUtils.from_shareable(shareable, fl_ctx)
        outcome = run_site_round(
            site,
            received.params,
            round_index=received.current_round or 0,
            total_rounds=received.total_rounds or 1,
            train_cfg=self.train_cfg,
            model_cfg=self.model_cfg,
            fedprox_mu=float((received.meta or {}).get(AlgorithmConstants.FEDPROX_MU) or 0.0),
        )
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        self.log_info(fl_ctx, f"round {received.current_round}: {site.name} {outcome.metrics}")
        reply = FLModel(
            params_type=ParamsType.FULL,
            params=outcome.weights,
            metrics=outcome.metrics,
            current_round=received.current_round,
            meta={
                FLMetaKey.NUM_STEPS_CURRENT_ROUND: outcome.n_samples,
                "n_samples": outcome.n_samples,
                "train_seconds": outcome.train_seconds,
            },
        )
        return FLModelUtils.to_shareable(reply)
