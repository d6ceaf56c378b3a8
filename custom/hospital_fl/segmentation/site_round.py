"""One federated segmentation round at one hospital, as a function of plain data.

Score the received global weights on the site's validation cases, then continue training
from them; send full weights (or their difference to the global weights) with the scores
and the number of training cases. Preprocessed volumes stay cached in the site's process
between rounds, so only the random crops and augmentation are redone each round.

``SegSiteAlgorithm`` is the segmentation job's site algorithm
(hospital_fl.training.site_algorithm): it validates the site's datalist when the job starts
(cases with a missing modality, mismatched shapes or spacings, an empty mask, labels outside
the scheme or an unreadable file are logged, written to ``seg_datalist_report.json`` in the
job's run folder and left out; a site with no usable training case refuses the job) and runs
``run_seg_round`` each round.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from hospital_fl.data.ingest.site_dataset import site_data_path
from hospital_fl.errors import InputError
from hospital_fl.models.seg import SegModelConfig, build_seg_model
from hospital_fl.segmentation.datalist import validate_datalist
from hospital_fl.segmentation.pipeline import (
    SegPipelineConfig,
    SegTrainConfig,
    eval_transforms,
    evaluate,
    make_loader,
    region_names,
    train_epochs,
    train_transforms,
)
from hospital_fl.training.loops import get_weights, set_weights
from hospital_fl.training.metrics import reportable_metrics
from hospital_fl.training.site_algorithm import RoundTask, SiteJob, SiteLog, SiteScores, SiteUpdate

__all__ = [
    "REPORT_FILE",
    "SegRoundOutcome",
    "SegSiteAlgorithm",
    "clear_loader_cache",
    "get_weights",
    "run_seg_round",
    "set_weights",
]

REPORT_FILE = "seg_datalist_report.json"

_MAX_LOADERS = 8  # train + validation loaders of a few co-located simulated sites
_LOADERS: OrderedDict[tuple, object] = OrderedDict()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class SegRoundOutcome:
    """What a site sends: weights (or their difference), metrics and its training-case count."""

    weights: dict[str, np.ndarray]
    metrics: dict[str, float]
    n_samples: int
    train_seconds: float
    params_type: Literal["FULL", "DIFF"] = "FULL"


def clear_loader_cache() -> None:
    """Drop the cached preprocessed volumes of this process."""
    with _LOCK:
        _LOADERS.clear()


def _case_key(cases: Sequence[Mapping]) -> tuple:
    def paths(images) -> tuple[str, ...]:
        return (str(images),) if isinstance(images, (str, Path)) else tuple(str(p) for p in images)

    return tuple((paths(c["image"]), str(c["label"])) for c in cases)


def _loader(role: str, cases, pipe_cfg: SegPipelineConfig, batch_size: int, cache_dir):
    key = (role, _case_key(cases), pipe_cfg, batch_size, str(cache_dir) if cache_dir else None)
    with _LOCK:
        if key in _LOADERS:
            _LOADERS.move_to_end(key)
            return _LOADERS[key]
    if role == "train":
        loader = make_loader(cases, train_transforms(pipe_cfg), batch_size, True, True, cache_dir=cache_dir)
    else:
        loader = make_loader(cases, eval_transforms(pipe_cfg), 1, False, True, cache_dir=cache_dir)
    with _LOCK:
        _LOADERS[key] = loader
        while len(_LOADERS) > _MAX_LOADERS:
            _LOADERS.popitem(last=False)
    return loader


def run_seg_round(
    train_cases: Sequence[Mapping],
    val_cases: Sequence[Mapping],
    global_weights: dict[str, np.ndarray],
    round_index: int,
    total_rounds: int,
    model_cfg: SegModelConfig,
    pipe_cfg: SegPipelineConfig,
    train_cfg: SegTrainConfig,
    fedprox_mu: float = 0.0,
    send_difference: bool = False,
    *,
    cache_dir: str | Path | None = None,
) -> SegRoundOutcome:
    """Score the global model at this site, then train it locally for one round.

    Args:
        train_cases / val_cases: datalists ({"image": [paths], "label": path, "case": id});
            with no validation cases the round reports only ``train_loss``.
        round_index / total_rounds: position in the federation, so the cosine learning-rate
            schedule runs over all rounds rather than restarting in each.
        fedprox_mu: FedProx proximal weight sent by the server (0: FedAvg).
        send_difference: send trained minus received weights (for robust aggregation and
            compression) instead of full weights.
        cache_dir: keep preprocessed volumes on disk rather than in memory.

    Returns:
        metrics "val_dice" (mean over regions), "val_dice_<region>" and "train_loss".
    """
    if round_index < 0 or round_index >= total_rounds:
        raise InputError(
            "round_index", round_index, f"it must lie in [0, total_rounds={total_rounds})", "count rounds from 0"
        )
    regions = region_names(pipe_cfg)
    if model_cfg.out_channels != len(regions):
        raise InputError(
            "out_channels",
            model_cfg.out_channels,
            f"the {pipe_cfg.label_scheme} label scheme has {len(regions)} regions {regions}",
            f"use out_channels={len(regions)}",
        )
    model = build_seg_model(model_cfg)
    set_weights(model, global_weights)
    metrics: dict[str, float] = {}
    if val_cases:
        scores = evaluate(model, _loader("val", val_cases, pipe_cfg, 1, cache_dir), pipe_cfg, train_cfg)
        metrics["val_dice"] = scores["mean_dice"]
        metrics.update({f"val_dice_{region}": value for region, value in scores["dice"].items()})
    cfg = dataclasses.replace(train_cfg, seed=train_cfg.seed * 1000 + round_index)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()} if fedprox_mu > 0 else None
    result = train_epochs(
        model,
        _loader("train", train_cases, pipe_cfg, cfg.batch_size, cache_dir),
        cfg,
        epoch_offset=round_index * cfg.epochs,
        total_epochs=total_rounds * cfg.epochs,
        anchor=anchor,
        fedprox_mu=fedprox_mu,
    )
    metrics["train_loss"] = result["mean_loss"]
    weights = get_weights(model)
    if send_difference:
        weights = {k: weights[k] - np.asarray(global_weights[k]).astype(weights[k].dtype) for k in weights}
    return SegRoundOutcome(
        weights=weights,
        metrics=reportable_metrics(metrics),
        n_samples=len(train_cases),
        train_seconds=result["seconds"],
        params_type="DIFF" if send_difference else "FULL",
    )


class SegSiteAlgorithm:
    """The segmentation network's part of a federated job at one site (a ``SiteAlgorithm``).

    Each round scores the received global model on the site's validation cases (Dice per
    region), trains it for ``train.epochs`` epochs of label-aware crops and sends the
    difference to the received weights (what robust rules and compression work on) with the
    number of training cases.

    Args:
        datalist: the site's datalist JSON; "{site}" is replaced by the site's name and
            "${VAR}" by the site's environment variable.
        model: the network (must match the server's initial model).
        pipeline: spacing, crop size, label scheme.
        train: local training settings.
    """

    job = "segmentation"
    dp = None  # segmentation has no DP-SGD in this bundle: a site that requires DP refuses it

    def __init__(self, datalist: str, model: SegModelConfig, pipeline: SegPipelineConfig, train: SegTrainConfig):
        self.datalist, self.model_cfg, self.pipe_cfg, self.train_cfg = datalist, model, pipeline, train
        self.cases: dict[str, list[dict]] | None = None  # "training" / "validation": the usable cases

    def load(self, job: SiteJob, log: SiteLog) -> None:
        if self.cases is not None:
            return
        if self.train_cfg.torch_threads:
            torch.set_num_threads(self.train_cfg.torch_threads)
        path = site_data_path(self.datalist, job.site)
        report = validate_datalist(path, label_scheme=self.pipe_cfg.label_scheme)
        if job.run_dir is not None:
            with open(os.path.join(job.run_dir, REPORT_FILE), "w") as f:
                json.dump(report.to_json(), f, indent=1, default=str)
        for problem in report.problems:
            log.warning(f"datalist: left out {problem.section}/{problem.case}: {problem.detail}")
        train = report.require("training", minimum=1)
        self.cases = {"training": train, "validation": report.usable.get("validation", [])}
        log.info(
            f"datalist {path}: {len(train)} training / {len(self.cases['validation'])} validation cases usable, "
            f"{len(report.problems)} left out"
        )

    def release_plan(self) -> None:
        return None

    def sample_count(self) -> int:
        return len(self._loaded()["training"])

    def train_round(self, task: RoundTask) -> SiteUpdate:
        cases = self._loaded()
        outcome = run_seg_round(
            cases["training"],
            cases["validation"],
            task.weights,
            round_index=task.round_index,
            total_rounds=max(task.total_rounds or 1, task.round_index + 1),
            model_cfg=self.model_cfg,
            pipe_cfg=self.pipe_cfg,
            train_cfg=self.train_cfg,
            fedprox_mu=task.fedprox_mu,
            send_difference=True,
        )
        return SiteUpdate(
            weights=outcome.weights,
            metrics=outcome.metrics,
            n_samples=outcome.n_samples,
            train_seconds=outcome.train_seconds,
            params_type=outcome.params_type,
            local_metrics=dict(outcome.metrics),
        )

    def score(self, weights: dict[str, np.ndarray]) -> SiteScores:
        model = build_seg_model(self.model_cfg)
        set_weights(model, weights)
        val_cases = self._loaded()["validation"]
        scores = evaluate(model, val_cases, self.pipe_cfg, self.train_cfg) if val_cases else {}
        metrics = (
            {"val_dice": scores["mean_dice"], **{f"val_dice_{r}": v for r, v in scores["dice"].items()}}
            if scores
            else {}
        )
        return SiteScores(metrics=metrics, local_metrics=dict(metrics))

    def _loaded(self) -> dict[str, list[dict]]:
        if self.cases is None:
            raise RuntimeError("the site's datalist is not loaded: call load() when the job starts")
        return self.cases
