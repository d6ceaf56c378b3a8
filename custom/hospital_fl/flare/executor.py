"""FLARE Executor that runs one CXR training round at a hospital.

With a DP mechanism the executor opens the site's privacy gate when the job starts
(policy and budget checked before anything trains; a refused job answers every task
with an error and the reason in the site's log), and records each round's releases in the site's ledger.

The executor ships with the installed package and is named by path in the job config, so a
job folder carries no code (no BYOC permission needed at hospitals). All maths lives in
hospital_fl.training.site_round; this class only converts FLARE messages to plain data.
"""

from __future__ import annotations

import numpy as np
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

from hospital_fl.data.federated import SiteData, load_federated
from hospital_fl.data.ingest.labels import CXR14_FINDINGS
from hospital_fl.data.ingest.site_dataset import load_site_dataset, site_data_path, site_state_dir
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.privacy_gate import SitePrivacyGate, open_gate, refusal_reply
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.privacy.config import DPConfig
from hospital_fl.training.private_site import SitePrivacy
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.site_round import run_site_round, score_global

__all__ = [
    "CXRTrainExecutor",
    "keep_final_model",
    "TRAIN_TASK",
    "SAMPLE_COUNT_TASK",
    "VALIDATE_TASK",
    "FINAL_MODEL_FILE",
]

TRAIN_TASK = "train"
SAMPLE_COUNT_TASK = "sample_count"  # an HE job asks for each site's aggregation weight first
VALIDATE_TASK = "validate"  # an HE job's final model, decrypted at the site: score it and keep it
FINAL_MODEL_FILE = "final_global_model.pt"


class CXRTrainExecutor(Executor):
    """Trains the CXR classifier on this hospital's data for each "train" task.

    Each task: score the received global model on the site's validation and local test
    portions, train it for ``train["epochs"]`` epochs, and send back the difference to the
    received weights with the sample count (the aggregation weight) and the seconds spent
    training. Under FLARE's SCAFFOLD controller the site also keeps its control variate
    and returns its change.

    Args:
        split: SplitConfig fields (which images this site holds in the embedded dataset).
        model: ModelConfig fields (must match the server's initial model).
        train: TrainConfig fields (local epochs per round, optimiser, device, AMP).
        data_path: a MedMNIST-layout .npz instead of the embedded dataset.
        site_data: the site's own dataset folder made by ``hospital-fl ingest`` (manifest.json +
            images.npy) instead of the embedded dataset; "{site}" is replaced by this
            site's FLARE name and "${VAR}" by the site's environment variable. Consent is re-checked against the site's registry when the
            job starts, and the job's use of each patient is recorded at the site.
        privacy: DPConfig fields (mechanism "none" by default).
        num_rounds: the job's rounds, which a DP job's noise and planned spend cover; a
            task announcing more rounds is refused.
    """

    def __init__(
        self,
        split: dict | None = None,
        model: dict | None = None,
        train: dict | None = None,
        data_path: str | None = None,
        privacy: dict | None = None,
        num_rounds: int | None = None,
        site_data: str | None = None,
    ):
        super().__init__()
        # Kept under the argument names: FLARE's job export reads them back into the config.
        self._split, self._model, self._train, self._privacy = split, model, train, privacy
        # Validate at construction: a bad setting fails the job start, not round 1.
        self.split_cfg = SplitConfig(**(split or {}))
        self.model_cfg = ModelConfig(**(model or {}))
        self.train_cfg = TrainConfig(**(train or {}))
        self.dp_cfg = DPConfig(**(privacy or {}))
        if self.dp_cfg.enabled and not (isinstance(num_rounds, int) and num_rounds >= 1):
            raise InputError("num_rounds", num_rounds, "a DP job must declare its rounds", "export the job again")
        self.data_path = data_path
        self.site_data = site_data
        self.num_rounds = num_rounds
        self._data: SiteData | None = None
        self._site_privacy: SitePrivacy | None = None
        self._gate: SitePrivacyGate | None = None
        self._refusal: str | None = None
        self._control: dict | None = None  # SCAFFOLD: this site's control variate across rounds

    _always_serialize_args = ("split", "model", "train", "privacy", "num_rounds")

    def _site_data(self, fl_ctx: FLContext) -> SiteData:
        if self._data is None:
            if self.train_cfg.torch_threads:
                torch.set_num_threads(self.train_cfg.torch_threads)
            name = fl_ctx.get_identity_name()
            if self.site_data:
                engine = fl_ctx.get_engine()
                workspace = engine.get_workspace().get_root_dir() if engine is not None else None
                loaded = load_site_dataset(
                    site_data_path(self.site_data, name),
                    name,
                    task=self.model_cfg.task,
                    image_size=self.model_cfg.image_size,
                    label_names=CXR14_FINDINGS,
                    job_id=fl_ctx.get_job_id() or "unknown-job",
                    # usage records go to the site's writable workspace; the data mount is only read
                    state_dir=site_state_dir(workspace, name),
                )
                self.log_info(
                    fl_ctx,
                    f"site data: {len(loaded.site.train)}/{len(loaded.site.val)}/{len(loaded.site.test)} "
                    f"train/val/test images from the manifest; {len(loaded.excluded)} patients left out "
                    f"for consent ({sorted(set(loaded.excluded.values()))}); use recorded in {loaded.usage_record}",
                )
                self._data = loaded.site
            else:
                self._data = load_federated(self.split_cfg, self.data_path).site(name)
        return self._data

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._prepare(fl_ctx)

    def _prepare(self, fl_ctx: FLContext) -> None:
        """Load the site's data (re-checking consent) and open the privacy gate, before any task."""
        try:
            self._site_data(fl_ctx)
        except Exception as err:  # any failure preparing the data (a read-only or full disk too) refuses with its reason
            reason = str(err) if isinstance(err, (InputError, ValueError)) else f"{type(err).__name__}: {err}"
            self._refusal = f"site data refused this job at {fl_ctx.get_identity_name()}: {reason}"
            self.log_error(fl_ctx, self._refusal)
            return
        self._open_privacy_gate(fl_ctx)

    def _open_privacy_gate(self, fl_ctx: FLContext) -> None:
        """Before any training: the site's policy must allow the job and its budget cover it."""
        try:
            if self.dp_cfg.enabled:  # every DP job releases metrics from this site, at least
                site = self._site_data(fl_ctx)
                self._site_privacy = SitePrivacy(
                    self.dp_cfg,
                    self.model_cfg,
                    self.train_cfg,
                    len(site.train),
                    self.num_rounds,
                    site.name,
                )
            self._gate = open_gate(fl_ctx, self.dp_cfg, self._site_privacy)
        except (InputError, ValueError) as err:
            self._refusal = f"privacy gate refused this job at {fl_ctx.get_identity_name()}: {err}"
            # Answer every task with an error (not a panic, which would silence this site and
            # leave the server waiting): the server's controller then ends the job, since
            # it can no longer reach its minimum number of sites.
            self.log_error(fl_ctx, self._refusal)
            return
        if self._gate.budget is not None:
            b = self._gate.budget
            self.log_info(
                fl_ctx,
                f"privacy: {self.dp_cfg.mechanism} job plans epsilon {b.job_epsilon:.3f}; site lifetime spend "
                f"{b.spent_before:.3f} -> {b.spent_after:.3f} of {b.lifetime_epsilon} (delta {self._gate.policy.delta})",
            )

    def _scaffold_controls(self, meta: dict):
        """(server control, this site's control) when the server runs SCAFFOLD, else None."""
        c_global = meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
        if c_global is None:
            return None
        if self._control is None:  # first SCAFFOLD round: which weights carry a control
            trainable = {k for k, _ in build_cxr_model(self.model_cfg).named_parameters()}
            self._control = {k: np.zeros_like(v, dtype=np.float32) for k, v in c_global.items() if k in trainable}
        c_global = {k: np.asarray(c_global[k], dtype=np.float32) for k in self._control}
        return c_global, self._control

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (TRAIN_TASK, SAMPLE_COUNT_TASK, VALIDATE_TASK):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if self._gate is None and self._refusal is None:  # START_RUN not seen (e.g. a unit harness)
            self._prepare(fl_ctx)
        if self._refusal is not None:
            return refusal_reply(self._refusal)
        site = self._site_data(fl_ctx)
        if task_name == SAMPLE_COUNT_TASK:
            # The aggregation weight an HE job's sites apply before encrypting. A DP site
            # keeps its exact count to itself (it is not covered by the accounting).
            count = None if self._site_privacy is not None else len(site.train)
            return FLModelUtils.to_shareable(FLModel(params={}, meta={"n_samples": count}))
        if task_name == VALIDATE_TASK:
            return self._score_final(site, shareable, fl_ctx)
        received = FLModelUtils.from_shareable(shareable, fl_ctx)
        if self._site_privacy is not None and (received.total_rounds or 1) > self.num_rounds:
            self.log_error(
                fl_ctx,
                f"privacy: the server announced {received.total_rounds} rounds but the job's DP noise and the "
                f"budget check cover {self.num_rounds}; refusing to train",
            )
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if self._site_privacy is not None:
            # Checked against the caps and recorded before the round trains: nothing of it
            # leaves the site unless the whole round's releases fit the budget.
            try:
                job_epsilon = self._gate.spend_round(self._site_privacy)
            except InputError as err:
                reason = f"privacy: {site.name} refused round {received.current_round}: {err}"
                self.log_error(fl_ctx, reason)
                return refusal_reply(reason)
        scaffold = self._scaffold_controls(received.meta or {})
        outcome = run_site_round(
            site,
            received.params,
            round_index=received.current_round or 0,
            total_rounds=received.total_rounds or 1,
            train_cfg=self.train_cfg,
            model_cfg=self.model_cfg,
            fedprox_mu=float((received.meta or {}).get(AlgorithmConstants.FEDPROX_MU) or 0.0),
            privacy=self._site_privacy,
            send_difference=True,  # robust rules, top-k and DP work on differences; FLARE adds them
            scaffold=scaffold,
        )
        meta = {}
        if scaffold is not None:
            self._control = outcome.control  # this site's SCAFFOLD control, kept for the next round
            meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = outcome.control_delta
        if self._site_privacy is not None:
            # The exact spend, noise multipliers and sample rates are functions of the record
            # count: they stay in the site's log and ledger; the reply says only the job's bound.
            self.log_info(fl_ctx, f"privacy: {self._site_privacy.noise_summary()}, job epsilon so far {job_epsilon}")
            meta["privacy"] = self._site_privacy.reply_summary()
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        self.log_info(fl_ctx, f"round {received.current_round}: {site.name} kept {outcome.local_metrics}")
        reply = FLModel(
            params_type=ParamsType(outcome.params_type),
            params=outcome.weights,
            metrics=outcome.metrics,
            current_round=received.current_round,
            meta={
                FLMetaKey.NUM_STEPS_CURRENT_ROUND: outcome.n_samples,
                "n_samples": outcome.n_samples,
                "train_seconds": outcome.train_seconds,
                **meta,
            },
        )
        return FLModelUtils.to_shareable(reply)

    def _score_final(self, site: SiteData, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Score the job's final model (decrypted by the HE filter) on this site's own data and
        keep it in the site's run folder: in an HE job only the sites can read it."""
        try:
            received = FLModelUtils.from_shareable(shareable, fl_ctx)
        except ValueError as err:  # a validate task must carry the model to score
            self.log_error(fl_ctx, f"validate task without a model: {err}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        scores = score_global(site, received.params, self.model_cfg, self.train_cfg.device)
        keep_final_model(received.params, fl_ctx)
        if self._site_privacy is not None:  # under DP the scores stay at the site
            self.log_info(fl_ctx, f"final model at {site.name}: {scores} (kept at the site)")
            scores = {}
        n_test = None if self._site_privacy is not None else len(site.test)  # counts stay at a DP site
        return FLModelUtils.to_shareable(FLModel(params={}, metrics=scores, meta={"n_test": n_test}))


def keep_final_model(weights: dict, fl_ctx: FLContext) -> str:
    """Save a job's final model in this site's run folder (an HE job's is readable only here)."""
    run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
    path = f"{run_dir}/{FINAL_MODEL_FILE}"
    torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}, path)
    return path
