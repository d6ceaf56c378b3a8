"""FLARE Executor that runs a site algorithm (hospital_fl.training.site_algorithm) at a hospital.

One adapter for every job a site trains. When the job starts it passes the site's privacy
gate and has the algorithm load its data: a job that never applies DP is checked against the
policy before any data is read; a DP job's plan depends on the site's record count, so its
budget is checked once the data is loaded, before anything trains. A refused job answers
every task with an error and the reason (also in the site's log), not a panic, which would
silence the site and leave the server waiting: the server's controller ends the job once it
can no longer reach its minimum number of sites.

Tasks: "train" (a DP round's releases are checked against the caps and recorded in the
site's ledger before it trains), "sample_count" (the aggregation weight an HE job's sites
apply before encrypting) and "validate" (the job's final model, decrypted at the site in an
HE job: scored on the site's own data and kept in its run folder). FLARE's cross-site
evaluation adds "submit_model" and its own "validate" (hospital_fl.flare.cross_site: each
train round keeps the site's last local model for it). This class only converts FLARE
messages to plain data; the algorithm holds the maths.

Live metrics: after each train round the metrics the reply carries (and the round's training
seconds) are also sent as scalars on FLARE's analytics path (the local "analytix_log_stats"
event, which the job's ConvertToFedEvent forwards to the server's TensorBoard receiver), with
the round as the step. Only what the reply already sends is streamed: under DP those are the
DP-released figures, never the site's exact scores.
"""

from __future__ import annotations

import numpy as np
import torch
from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from hospital_fl.errors import InputError
from hospital_fl.flare.cross_site import (
    SUBMIT_MODEL_TASK,
    is_cross_site_validation,
    keep_local_model,
    score_for_cross_site,
    submit_local_model,
)
from hospital_fl.flare.privacy_gate import SitePrivacyGate, open_gate, refusal_reply, refuse_without_dp
from hospital_fl.training.site_algorithm import RoundTask, SiteAlgorithm, SiteJob, SiteReleases

__all__ = [
    "FINAL_MODEL_FILE",
    "SAMPLE_COUNT_TASK",
    "TRAIN_SECONDS_TAG",
    "TRAIN_TASK",
    "VALIDATE_TASK",
    "SiteExecutor",
    "keep_final_model",
]

TRAIN_TASK = "train"
SAMPLE_COUNT_TASK = "sample_count"  # an HE job asks for each site's aggregation weight first
VALIDATE_TASK = "validate"  # an HE job's final model, decrypted at the site: score it and keep it
FINAL_MODEL_FILE = "final_global_model.pt"
TRAIN_SECONDS_TAG = "train_seconds"  # streamed beside the reply's metrics (the reply's meta carries it too)


class SiteExecutor(Executor):
    """Answers a job's tasks at one site by calling ``algorithm``.

    Args:
        algorithm: the site's part of the job; FLARE builds the job's executor by class path,
            so each job has a small subclass that builds its algorithm from the job's arguments.
    """

    # Attribute and method names here must differ from every job argument of a subclass and
    # its "_" form (split, _train, ...): FLARE's job export reads the arguments back by name.
    def __init__(self, algorithm: SiteAlgorithm):
        super().__init__()
        self.algorithm = algorithm
        self._prepared = False
        self._refusal: str | None = None
        self._gate: SitePrivacyGate | None = None
        self._releases: SiteReleases | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._prepare(fl_ctx)

    def _prepare(self, fl_ctx: FLContext) -> None:
        """Pass the privacy gate and load the site's data, before any task; any failure refuses the job."""
        self._prepared = True
        site, dp = fl_ctx.get_identity_name(), self.algorithm.dp
        if dp is None:
            try:
                refuse_without_dp(fl_ctx, self.algorithm.job, _without_dp_fix(self.algorithm.job))
            except InputError as err:
                return self._refuse(fl_ctx, f"privacy gate refused this job at {site}: {err}")
        try:  # any failure preparing the data (a read-only or full disk too) refuses the job with its reason
            self.algorithm.load(_site_job(fl_ctx), _SiteLog(self, fl_ctx))
        except Exception as err:  # noqa: BLE001
            reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
            return self._refuse(fl_ctx, f"site data refused this job at {site}: {reason}")
        if dp is None:
            return
        try:  # the site's policy must allow the job and its budget cover the job's planned releases
            self._releases = self.algorithm.release_plan()
            self._gate = open_gate(fl_ctx, dp, self._releases)
        except ValueError as err:
            return self._refuse(fl_ctx, f"privacy gate refused this job at {site}: {err}")
        if self._gate.budget is not None:
            b = self._gate.budget
            self.log_info(
                fl_ctx,
                f"privacy: {dp.mechanism} job plans epsilon {b.job_epsilon:.3f}; site lifetime spend "
                f"{b.spent_before:.3f} -> {b.spent_after:.3f} of {b.lifetime_epsilon} (delta {self._gate.policy.delta})",
            )

    def _refuse(self, fl_ctx: FLContext, reason: str) -> None:
        self._refusal = reason
        self.log_error(fl_ctx, reason)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (TRAIN_TASK, SAMPLE_COUNT_TASK, VALIDATE_TASK, SUBMIT_MODEL_TASK):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if not self._prepared:  # START_RUN not seen (e.g. a unit harness)
            self._prepare(fl_ctx)
        if self._refusal is not None:
            return refusal_reply(self._refusal)
        if task_name == SAMPLE_COUNT_TASK:
            return FLModelUtils.to_shareable(FLModel(params={}, meta={"n_samples": self.algorithm.sample_count()}))
        if task_name == SUBMIT_MODEL_TASK:
            return submit_local_model(self.algorithm.job, fl_ctx, _SiteLog(self, fl_ctx))
        try:
            received = FLModelUtils.from_shareable(shareable, fl_ctx)
        except ValueError as err:  # a train or validate task must carry the model
            self.log_error(fl_ctx, f"{task_name} task without a model: {err}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        if task_name == VALIDATE_TASK and is_cross_site_validation(shareable):
            return score_for_cross_site(self.algorithm, received.params, fl_ctx, _SiteLog(self, fl_ctx))
        if task_name == VALIDATE_TASK:
            return self._score_final(received, fl_ctx)
        return self._run_round(received, fl_ctx, abort_signal)

    def _run_round(self, received: FLModel, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site, releases, meta = fl_ctx.get_identity_name(), self._releases, received.meta or {}
        if releases is not None:
            if (received.total_rounds or 1) > releases.total_rounds:
                reason = (
                    f"privacy: the server announced {received.total_rounds} rounds but the job's DP noise and the "
                    f"budget check cover {releases.total_rounds}; refusing to train"
                )
                self.log_error(fl_ctx, reason)
                return refusal_reply(reason)
            # Checked against the caps and recorded before the round trains: nothing of it
            # leaves the site unless the whole round's releases fit the budget.
            try:
                job_epsilon = self._gate.spend_round(releases)
            except InputError as err:
                reason = f"privacy: {site} refused round {received.current_round}: {err}"
                self.log_error(fl_ctx, reason)
                return refusal_reply(reason)
        update = self.algorithm.train_round(
            RoundTask(
                weights=received.params,
                round_index=received.current_round or 0,
                total_rounds=received.total_rounds,
                fedprox_mu=float(meta.get(AlgorithmConstants.FEDPROX_MU) or 0.0),
                server_control=meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL),
            )
        )
        extra = {}
        if update.control_delta is not None:
            extra[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = update.control_delta
        if releases is not None:
            # The exact spend, noise multipliers and sample rates are functions of the record
            # count: they stay in the site's log and ledger; the reply says only the job's bound.
            self.log_info(fl_ctx, f"privacy: {releases.noise_summary()}, job epsilon so far {job_epsilon}")
            extra["privacy"] = releases.reply_summary()
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        self.log_info(fl_ctx, f"round {received.current_round}: {site} kept {update.local_metrics}")
        keep_local_model(
            received.params,
            update.weights,
            update.params_type,
            received.current_round or 0,
            self.algorithm.job,
            fl_ctx,
            _SiteLog(self, fl_ctx),
        )
        self._stream_round(
            {**update.metrics, TRAIN_SECONDS_TAG: update.train_seconds}, received.current_round or 0, fl_ctx
        )
        reply = FLModel(
            params_type=ParamsType(update.params_type),
            params=update.weights,
            metrics=update.metrics,
            current_round=received.current_round,
            meta={
                FLMetaKey.NUM_STEPS_CURRENT_ROUND: update.n_samples,
                "n_samples": update.n_samples,
                "train_seconds": update.train_seconds,
                **extra,
            },
        )
        return FLModelUtils.to_shareable(reply)

    def _stream_round(self, scalars: dict[str, float], round_index: int, fl_ctx: FLContext) -> None:
        """Send what the round's reply says as live scalars (tag = metric name, step = round).

        Callers pass only figures the reply already carries: under DP the released ones.
        """
        if fl_ctx.get_engine() is None:  # a bare harness context: no FLARE to receive them
            return
        for tag, value in sorted(scalars.items()):
            dxo = create_analytic_dxo(tag, float(value), AnalyticsDataType.SCALAR, global_step=int(round_index))
            send_analytic_dxo(self, dxo, fl_ctx)

    def _score_final(self, received: FLModel, fl_ctx: FLContext) -> Shareable:
        """Score the job's final model on this site's own data and keep it in the site's run
        folder: in an HE job only the sites can read it."""
        scores = self.algorithm.score(received.params)
        keep_final_model(received.params, fl_ctx)
        kept = "" if scores.metrics == scores.local_metrics else " (kept at the site)"
        self.log_info(fl_ctx, f"final model at {fl_ctx.get_identity_name()}: {scores.local_metrics}{kept}")
        return FLModelUtils.to_shareable(FLModel(params={}, metrics=scores.metrics, meta=dict(scores.meta)))


def keep_final_model(weights: dict, fl_ctx: FLContext) -> str:
    """Save a job's final model in this site's run folder (an HE job's is readable only here)."""
    run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
    path = f"{run_dir}/{FINAL_MODEL_FILE}"
    torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}, path)
    return path


def _without_dp_fix(job: str) -> str:
    return (
        f"run {job} only at hospitals whose privacy policy does not set require_dp ({job} has no DP-SGD in this "
        "bundle), or ask this site's privacy officer"
    )


def _site_job(fl_ctx: FLContext) -> SiteJob:
    """The site, job and workspace folders FLARE gives this run (none in a bare harness context)."""
    engine, job_id = fl_ctx.get_engine(), fl_ctx.get_job_id()
    workspace = engine.get_workspace() if engine is not None else None
    return SiteJob(
        site=fl_ctx.get_identity_name(),
        job_id=job_id,
        workspace=workspace.get_root_dir() if workspace is not None else None,
        run_dir=workspace.get_run_dir(job_id) if workspace is not None and job_id else None,
    )


class _SiteLog:
    """The algorithm's notes about the site's data, in the site's FLARE log."""

    def __init__(self, executor: Executor, fl_ctx: FLContext):
        self._executor, self._fl_ctx = executor, fl_ctx

    def info(self, msg: str) -> None:
        self._executor.log_info(self._fl_ctx, msg)

    def warning(self, msg: str) -> None:
        self._executor.log_warning(self._fl_ctx, msg)
