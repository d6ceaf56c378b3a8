"""One federated round at one hospital, as a pure function of plain data.

Evaluate the received global weights on the site's own validation and test portions,
then continue training from them. Without privacy the site reports those scores and its
sample count and sends full weights. With a DP mechanism (``privacy``), the scores stay at
the site (``local_metrics``), only DP-released metrics leave it, and the update is sent
as a difference to the global weights (noised first for local client-level DP).

``CXRSiteAlgorithm`` is the chest X-ray job's site algorithm
(hospital_fl.training.site_algorithm): it loads the site's data when the job starts, keeps
its DP mechanism and SCAFFOLD control across rounds, and runs these functions each round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from hospital_fl.data.federated import SiteData, load_federated
from hospital_fl.data.ingest.labels import CXR14_FINDINGS
from hospital_fl.data.ingest.site_dataset import load_site_dataset, site_data_path, site_state_dir
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.privacy.config import DPConfig
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights, predict_proba, set_weights, train_local
from hospital_fl.training.metrics import rank_auc, reportable_metrics
from hospital_fl.training.private_site import SitePrivacy
from hospital_fl.training.scaffold import control_update, correction
from hospital_fl.training.site_algorithm import RoundTask, SiteJob, SiteLog, SiteScores, SiteUpdate

__all__ = ["CXRSiteAlgorithm", "RoundOutcome", "run_site_round", "score_global"]


@dataclass(frozen=True)
class RoundOutcome:
    """What a site sends (weights, metrics, n_samples) and what it keeps (local_metrics)."""

    weights: dict[str, np.ndarray]
    metrics: dict[str, float]
    n_samples: int
    train_seconds: float
    params_type: Literal["FULL", "DIFF"] = "FULL"
    local_metrics: dict[str, float] = field(default_factory=dict)
    # SCAFFOLD: the site's new control variate (kept) and its change (sent).
    control: dict[str, np.ndarray] | None = None
    control_delta: dict[str, np.ndarray] | None = None


def run_site_round(
    site: SiteData,
    global_weights: dict[str, np.ndarray],
    round_index: int,
    total_rounds: int,
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    fedprox_mu: float = 0.0,
    privacy: SitePrivacy | None = None,
    send_difference: bool = False,
    scaffold: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None,
) -> RoundOutcome:
    """Score the global model at this site, then train it locally for one round.

    Args:
        send_difference: send trained minus received weights (what robust aggregation and
            top-k compression work on) instead of full weights; DP always does.
        scaffold: (server control c, this site's control c_i) to run SCAFFOLD's corrected
            local training; the outcome then carries c_i's new value and its change.
    """
    model = privacy.model if privacy else build_cxr_model(model_cfg)
    set_weights(model, global_weights)
    scores = _scores(model, site, train_cfg.device)
    cfg = dataclasses.replace(train_cfg, seed=train_cfg.seed * 1000 + round_index)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()} if fedprox_mu > 0 else None
    schedule = dict(epoch_offset=round_index * cfg.epochs, total_epochs=total_rounds * cfg.epochs)
    if scaffold is not None and privacy is not None:
        raise ValueError("SCAFFOLD's control variates are not covered by the DP accounting; use FedAvg/FedProx with DP")
    if privacy and privacy.dpsgd:
        result = privacy.dpsgd.train_round(
            site.train.images, site.train.labels, cfg.seed, anchor=anchor, fedprox_mu=fedprox_mu, **schedule
        )
    else:
        control = correction(*scaffold) if scaffold is not None else None
        result = train_local(
            model,
            site.train.images,
            site.train.labels,
            cfg,
            anchor=anchor,
            fedprox_mu=fedprox_mu,
            control=control,
            **schedule,
        )
    trained = get_weights(model)
    if privacy is None:
        metrics = reportable_metrics({**scores, "train_loss": result.mean_loss})
        new_control = control_delta = None
        if scaffold is not None:
            new_control, control_delta = control_update(*scaffold, global_weights, trained, result.lr_sum)
        if send_difference:
            trained = _difference(trained, global_weights)
        return RoundOutcome(
            trained,
            metrics,
            len(site.train),
            result.seconds,
            "DIFF" if send_difference else "FULL",
            dict(metrics),
            new_control,
            control_delta,
        )
    released = privacy.released_metrics(site.train.images, site.train.labels)
    delta = _difference(trained, global_weights)
    return RoundOutcome(
        weights=privacy.privatize_update(delta),
        metrics=reportable_metrics({"train_loss": released["train_loss"], "grad_norm": released["grad_norm"]}),
        n_samples=max(1, int(round(released["n_samples"]))),
        train_seconds=result.seconds,
        params_type="DIFF",
        local_metrics={**scores, "train_loss": result.mean_loss},
    )


def _difference(trained: dict[str, np.ndarray], global_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: trained[k] - np.asarray(global_weights[k]).astype(trained[k].dtype) for k in trained}


def _scores(model, site: SiteData, device: str) -> dict[str, float]:
    return {
        "val_auc": rank_auc(predict_proba(model, site.val.images, device), site.val.labels),
        "test_auc": rank_auc(predict_proba(model, site.test.images, device), site.test.labels),
    }


def score_global(
    site: SiteData, weights: dict[str, np.ndarray], model_cfg: ModelConfig, device: str = "cpu"
) -> dict[str, float]:
    """AUC of ``weights`` on this site's validation and local test portions."""
    model = build_cxr_model(model_cfg)
    set_weights(model, weights)
    return _scores(model, site, device)


class CXRSiteAlgorithm:
    """The chest X-ray classifier's part of a federated job at one site (a ``SiteAlgorithm``).

    Each round scores the received global model on the site's validation and local test
    portions, trains it for ``train.epochs`` epochs and sends the difference to the received
    weights (what robust rules, top-k and DP work on). Under SCAFFOLD the site keeps its
    control variate between rounds and sends its change. Under DP the scores, the sample
    count and the test count stay at the site.

    Args:
        split: which images this site holds in the embedded dataset.
        model: the network (must match the server's initial model).
        train: local training settings.
        dp: the job's DP settings (mechanism "none" by default).
        num_rounds: the job's rounds, which a DP job's noise and planned spend cover.
        data_path: a MedMNIST-layout .npz instead of the embedded dataset.
        site_data: the site's own dataset folder made by ``hospital-fl ingest`` instead of the
            embedded dataset; "{site}" is replaced by the site's name and "${VAR}" by the
            site's environment variable. Consent is re-checked when the data is loaded and the
            job's use of each patient recorded in the site's workspace.
    """

    job = "chest X-ray"

    def __init__(
        self,
        split: SplitConfig,
        model: ModelConfig,
        train: TrainConfig,
        dp: DPConfig,
        num_rounds: int | None = None,
        data_path: str | None = None,
        site_data: str | None = None,
    ):
        if dp.enabled and not (isinstance(num_rounds, int) and num_rounds >= 1):
            raise InputError("num_rounds", num_rounds, "a DP job must declare its rounds", "export the job again")
        self.split_cfg, self.model_cfg, self.train_cfg, self.dp = split, model, train, dp
        self.num_rounds, self.data_path, self.site_data = num_rounds, data_path, site_data
        self.data: SiteData | None = None  # loaded when the job starts, unless set before
        self._privacy: SitePrivacy | None = None
        self._control: dict[str, np.ndarray] | None = None

    @property
    def control(self) -> dict[str, np.ndarray] | None:
        """SCAFFOLD: this site's control variate, kept across rounds (None before a SCAFFOLD round)."""
        return self._control

    def load(self, job: SiteJob, log: SiteLog) -> None:
        if self.data is not None:
            return
        if self.train_cfg.torch_threads:
            torch.set_num_threads(self.train_cfg.torch_threads)
        if not self.site_data:
            self.data = load_federated(self.split_cfg, self.data_path).site(job.site)
            return
        loaded = load_site_dataset(
            site_data_path(self.site_data, job.site),
            job.site,
            task=self.model_cfg.task,
            image_size=self.model_cfg.image_size,
            label_names=CXR14_FINDINGS,
            job_id=job.job_id or "unknown-job",
            # usage records go to the site's writable workspace; the data mount is only read
            state_dir=site_state_dir(job.workspace, job.site),
        )
        log.info(
            f"site data: {len(loaded.site.train)}/{len(loaded.site.val)}/{len(loaded.site.test)} "
            f"train/val/test images from the manifest; {len(loaded.excluded)} patients left out "
            f"for consent ({sorted(set(loaded.excluded.values()))}); use recorded in {loaded.usage_record}",
        )
        self.data = loaded.site

    def release_plan(self) -> SitePrivacy | None:
        if self.dp.enabled and self._privacy is None:  # every DP job releases metrics from this site, at least
            site = self._loaded()
            self._privacy = SitePrivacy(
                self.dp, self.model_cfg, self.train_cfg, len(site.train), self.num_rounds, site.name
            )
        return self._privacy

    def sample_count(self) -> int | None:
        # A DP site keeps its exact count to itself: the accounting does not cover it.
        return None if self.release_plan() is not None else len(self._loaded().train)

    def train_round(self, task: RoundTask) -> SiteUpdate:
        scaffold = self._scaffold_controls(task.server_control)
        outcome = run_site_round(
            self._loaded(),
            task.weights,
            round_index=task.round_index,
            total_rounds=task.total_rounds or 1,
            train_cfg=self.train_cfg,
            model_cfg=self.model_cfg,
            fedprox_mu=task.fedprox_mu,
            privacy=self.release_plan(),
            send_difference=True,
            scaffold=scaffold,
        )
        if scaffold is not None:
            self._control = outcome.control
        return SiteUpdate(
            weights=outcome.weights,
            metrics=outcome.metrics,
            n_samples=outcome.n_samples,
            train_seconds=outcome.train_seconds,
            params_type=outcome.params_type,
            local_metrics=outcome.local_metrics,
            control_delta=outcome.control_delta if scaffold is not None else None,
        )

    def score(self, weights: dict[str, np.ndarray]) -> SiteScores:
        site = self._loaded()
        scores = score_global(site, weights, self.model_cfg, self.train_cfg.device)
        if self.release_plan() is not None:  # under DP the scores and the test count stay at the site
            return SiteScores(metrics={}, local_metrics=scores, meta={"n_test": None})
        return SiteScores(metrics=scores, local_metrics=scores, meta={"n_test": len(site.test)})

    def _loaded(self) -> SiteData:
        if self.data is None:
            raise RuntimeError("the site's data is not loaded: call load() when the job starts")
        return self.data

    def _scaffold_controls(self, server_control):
        """(server control, this site's control) when the server runs SCAFFOLD, else None."""
        if server_control is None:
            return None
        if self._control is None:  # first SCAFFOLD round: which weights carry a control
            trainable = {k for k, _ in build_cxr_model(self.model_cfg).named_parameters()}
            self._control = {k: np.zeros_like(v, dtype=np.float32) for k, v in server_control.items() if k in trainable}
        return {k: np.asarray(server_control[k], dtype=np.float32) for k in self._control}, self._control
