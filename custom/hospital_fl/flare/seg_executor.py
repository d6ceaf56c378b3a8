"""FLARE Executor that runs one brain-tumour segmentation round at a hospital.

The site's datalist (MONAI decathlon-style JSON) is validated when the job starts, before
anything trains: cases with a missing modality, mismatched shapes or spacings, an empty
mask, labels outside the scheme or an unreadable file are listed in the site's log (and in
``seg_datalist_report.json`` in the site's run folder) and left out, the rest train; a
site with no usable training case refuses the job with the report's reason. All maths is
hospital_fl.segmentation.site_round; this class only converts FLARE messages.

Like the CXR executor it also answers an HE job's ``sample_count`` and final ``validate``
tasks, so the HE filters (hospital_fl.flare.he) and compression filters apply unchanged.

Segmentation training has no differential privacy in this bundle, so the executor passes the
site's privacy gate as a job without DP: a site whose policy requires DP refuses it before
anything trains, and answers every task with the reason and the fix.
"""

from __future__ import annotations

import json
import os

import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from hospital_fl.data.ingest.site_dataset import site_data_path
from hospital_fl.errors import InputError
from hospital_fl.flare.executor import SAMPLE_COUNT_TASK, TRAIN_TASK, VALIDATE_TASK, keep_final_model
from hospital_fl.flare.privacy_gate import refusal_reply, refuse_without_dp
from hospital_fl.models.seg import SegModelConfig, build_seg_model
from hospital_fl.segmentation.datalist import DatalistReport, validate_datalist
from hospital_fl.segmentation.pipeline import SegPipelineConfig, SegTrainConfig, evaluate
from hospital_fl.segmentation.site_round import run_seg_round, set_weights

__all__ = ["SegTrainExecutor", "REPORT_FILE"]

REPORT_FILE = "seg_datalist_report.json"
NO_DP_FIX = (
    "run segmentation only at hospitals whose privacy policy does not set require_dp (segmentation has no "
    "DP-SGD in this bundle), or ask this site's privacy officer"
)


class SegTrainExecutor(Executor):
    """Trains the segmentation network on this hospital's datalist for each "train" task.

    Each task: score the received global model on the site's validation cases (Dice per
    region), train it for ``train["epochs"]`` epochs of label-aware crops, and send back
    the difference to the received weights with the number of training cases.

    Args:
        datalist: the site's datalist JSON; "{site}" is replaced by this site's FLARE name
            and "${VAR}" by the site's environment variable.
        model: SegModelConfig fields (must match the server's initial model).
        pipeline: SegPipelineConfig fields (spacing, crop size, label scheme).
        train: SegTrainConfig fields.
        num_rounds: the job's rounds (the learning-rate schedule spans them).
    """

    def __init__(
        self,
        datalist: str = "${HOSPITAL_FL_SEG_DATALIST}",
        model: dict | None = None,
        pipeline: dict | None = None,
        train: dict | None = None,
        num_rounds: int = 1,
    ):
        super().__init__()
        self.datalist, self.model, self.pipeline, self.train, self.num_rounds = (
            datalist,
            model,
            pipeline,
            train,
            num_rounds,
        )
        self.model_cfg = SegModelConfig(**(model or {}))
        self.pipe_cfg = SegPipelineConfig(**(pipeline or {}))
        self.train_cfg = SegTrainConfig(**(train or {}))
        self._cases: dict[str, list[dict]] | None = None
        self._refusal: str | None = None

    _always_serialize_args = ("datalist", "model", "pipeline", "train", "num_rounds")

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._prepare(fl_ctx)

    def _prepare(self, fl_ctx: FLContext) -> None:
        """Pass the privacy gate and validate the site's datalist before any task; keep the usable cases."""
        site = fl_ctx.get_identity_name()
        try:
            refuse_without_dp(fl_ctx, "segmentation", NO_DP_FIX)
        except InputError as err:
            self._refusal = f"privacy gate refused this job at {site}: {err}"
            self.log_error(fl_ctx, self._refusal)
            return
        if self.train_cfg.torch_threads:
            torch.set_num_threads(self.train_cfg.torch_threads)
        try:
            path = site_data_path(self.datalist, site)
            report = validate_datalist(path, label_scheme=self.pipe_cfg.label_scheme)
            self._write_report(report, fl_ctx)
            for problem in report.problems:
                self.log_warning(fl_ctx, f"datalist: left out {problem.section}/{problem.case}: {problem.detail}")
            train = report.require("training", minimum=1)
        except Exception as err:  # any failure preparing the data (a read-only or full disk too) refuses with its reason
            reason = str(err) if isinstance(err, InputError) else f"{type(err).__name__}: {err}"
            self._refusal = f"segmentation data refused this job at {site}: {reason}"
            self.log_error(fl_ctx, self._refusal)
            return
        self._cases = {"training": train, "validation": report.usable.get("validation", [])}
        self.log_info(
            fl_ctx,
            f"datalist {path}: {len(train)} training / {len(self._cases['validation'])} validation cases usable, "
            f"{len(report.problems)} left out",
        )

    def _write_report(self, report: DatalistReport, fl_ctx: FLContext) -> None:
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        with open(os.path.join(run_dir, REPORT_FILE), "w") as f:
            json.dump(report.to_json(), f, indent=1, default=str)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (TRAIN_TASK, SAMPLE_COUNT_TASK, VALIDATE_TASK):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if self._cases is None and self._refusal is None:  # START_RUN not seen (a unit harness)
            self._prepare(fl_ctx)
        if self._refusal is not None:
            return refusal_reply(self._refusal)
        train_cases, val_cases = self._cases["training"], self._cases["validation"]
        if task_name == SAMPLE_COUNT_TASK:
            return FLModelUtils.to_shareable(FLModel(params={}, meta={"n_samples": len(train_cases)}))
        received = FLModelUtils.from_shareable(shareable, fl_ctx)
        if task_name == VALIDATE_TASK:
            return self._score_final(received, val_cases, fl_ctx)
        outcome = run_seg_round(
            train_cases,
            val_cases,
            received.params,
            round_index=received.current_round or 0,
            total_rounds=max(received.total_rounds or 1, (received.current_round or 0) + 1),
            model_cfg=self.model_cfg,
            pipe_cfg=self.pipe_cfg,
            train_cfg=self.train_cfg,
            fedprox_mu=float((received.meta or {}).get(AlgorithmConstants.FEDPROX_MU) or 0.0),
            send_difference=True,  # robust rules and compression work on differences; FLARE adds them
        )
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        self.log_info(fl_ctx, f"round {received.current_round}: {outcome.metrics}")
        reply = FLModel(
            params_type=ParamsType(outcome.params_type),
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

    def _score_final(self, received: FLModel, val_cases: list[dict], fl_ctx: FLContext) -> Shareable:
        """Score a final model (an HE job's, decrypted at the site) and keep it at the site."""
        model = build_seg_model(self.model_cfg)
        set_weights(model, received.params)
        scores = evaluate(model, val_cases, self.pipe_cfg, self.train_cfg) if val_cases else {}
        keep_final_model(received.params, fl_ctx)
        metrics = (
            {"val_dice": scores["mean_dice"], **{f"val_dice_{r}": v for r, v in scores["dice"].items()}}
            if scores
            else {}
        )
        return FLModelUtils.to_shareable(FLModel(params={}, metrics=metrics))
