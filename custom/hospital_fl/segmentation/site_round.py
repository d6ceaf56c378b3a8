"""One federated segmentation round at one hospital, as a function of plain data.

Score the received global weights on the site's validation cases, then continue training
from them; send full weights (or their difference to the global weights) with the scores
and the number of training cases. Preprocessed volumes stay cached in the site's process
between rounds, so only the random crops and augmentation are redone each round.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from hospital_fl.errors import InputError
from hospital_fl.models.seg import SegModelConfig, build_seg_model
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

__all__ = ["SegRoundOutcome", "clear_loader_cache", "get_weights", "run_seg_round", "set_weights"]

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
