"""Personalization: a hospital's own copy of the global model, and whether it is worth it.

- ``personalize``: copy the global model and fine-tune the copy on the site's training data
  for K epochs with the package's one training loop (training.loops.train_local); the
  global model is left untouched.
- keep_local_normalization (FedBN-style): before fine-tuning, the copy takes every
  normalization layer's parameters and buffers (BatchNorm, InstanceNorm, GroupNorm,
  LayerNorm) from the site's local model and everything else from the global model, so
  intensity statistics particular to a hospital's scanners stay local. The compact
  CXRClassifier's InstanceNorm layers have no parameters (affine=False), so for it this
  variant changes nothing; densenet121's GroupNorm layers do carry parameters.
- select_on_validation: the site keeps its fine-tuned copy only when it scores a higher AUC
  than the global model on the site's validation portion, and the global model otherwise (a
  site's choice on its own held-out data; its test portion is never looked at).
- ``personalization_summary``: from per-site AUCs of the global, personalized, local-only
  and centralized models, where personalization helps and by how much.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from hospital_fl.errors import InputError
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import TrainResult, predict_proba, train_local
from hospital_fl.training.metrics import rank_auc

__all__ = [
    "PersonalizationConfig",
    "PersonalizationSummary",
    "PersonalizedModel",
    "SitePersonalization",
    "normalization_keys",
    "personalization_summary",
    "personalize",
    "with_local_normalization",
]

NORMALIZATION_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
MODEL_KINDS = ("global", "personalized", "local_only", "centralized")


@dataclass(frozen=True)
class PersonalizationConfig:
    """How a site personalizes the global model.

    Attributes:
        epochs: fine-tuning epochs on the site's training data (0: no fine-tuning, e.g.
            only local normalization).
        keep_local_normalization: take normalization layers from the site's local model.
        train: the training settings of the fine-tuning (its ``epochs`` is replaced).
        select_on_validation: keep the fine-tuned copy only when its validation AUC beats
            the global model's (needs the site's validation data).
    """

    epochs: int = 1
    keep_local_normalization: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    select_on_validation: bool = False

    def __post_init__(self):
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise InputError("epochs", self.epochs, "it must be an integer >= 0", "use e.g. 1 or 2 fine-tuning epochs")


@dataclass(frozen=True)
class PersonalizedModel:
    model: torch.nn.Module
    local_keys: tuple[str, ...]  # state-dict entries taken from the site's local model
    train: TrainResult | None  # None when epochs == 0
    kept_global: bool = False  # select_on_validation chose the global model
    validation_aucs: tuple[float, float] | None = None  # (global, fine-tuned) with select_on_validation


def normalization_keys(model: torch.nn.Module) -> tuple[str, ...]:
    """State-dict entries (parameters and buffers) of the model's normalization layers."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, NORMALIZATION_TYPES):
            prefix = f"{name}." if name else ""
            keys += [prefix + k for k in module.state_dict()]
    return tuple(keys)


def with_local_normalization(
    global_model: torch.nn.Module, local_model: torch.nn.Module
) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """A copy of ``global_model`` whose normalization entries come from ``local_model``.

    Returns:
        (the copy, the state-dict keys taken from the local model).

    Raises:
        InputError: the two models do not share one architecture.
    """
    g_state, l_state = global_model.state_dict(), local_model.state_dict()
    mismatched = sorted(
        k
        for k in set(g_state) | set(l_state)
        if k not in g_state or k not in l_state or g_state[k].shape != l_state[k].shape
    )
    if mismatched:
        raise InputError(
            "local_model",
            f"{len(mismatched)} entries differ from the global model's, e.g. {mismatched[:3]}",
            "the local and global models must share one architecture",
            "train the local model with the same ModelConfig as the federated job",
        )
    merged = copy.deepcopy(global_model)
    keys = normalization_keys(merged)
    merged.load_state_dict({**g_state, **{k: l_state[k] for k in keys}})
    return merged, keys


def personalize(
    global_model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: PersonalizationConfig = PersonalizationConfig(),
    local_model: torch.nn.Module | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> PersonalizedModel:
    """A site's personalized copy of the global model (the global model is not modified).

    Args:
        global_model: the federated model.
        images / labels: the site's training data (uint8 (N, H, W), (N,)).
        cfg: epochs, local normalization, training settings.
        local_model: the site's local-only model (needed with keep_local_normalization).
        validation: the site's validation (images, labels) (needed with select_on_validation).
    """
    if cfg.select_on_validation and validation is None:
        raise InputError(
            "validation",
            None,
            "select_on_validation compares the models on the site's validation data",
            "pass (val images, val labels), or set select_on_validation=False",
        )
    if cfg.keep_local_normalization:
        if local_model is None:
            raise InputError(
                "local_model",
                None,
                "keep_local_normalization takes the normalization layers from the site's local model",
                "pass the site's local-only model, or set keep_local_normalization=False",
            )
        model, local_keys = with_local_normalization(global_model, local_model)
    else:
        model, local_keys = copy.deepcopy(global_model), ()
    result = None
    if cfg.epochs > 0:
        result = train_local(model, images, labels, dataclasses.replace(cfg.train, epochs=cfg.epochs))
    if not cfg.select_on_validation:
        return PersonalizedModel(model=model, local_keys=local_keys, train=result)
    val_images, val_labels = validation
    aucs = tuple(rank_auc(predict_proba(m, val_images, cfg.train.device), val_labels) for m in (global_model, model))
    if aucs[1] > aucs[0]:
        return PersonalizedModel(model, local_keys, result, kept_global=False, validation_aucs=aucs)
    return PersonalizedModel(copy.deepcopy(global_model), (), result, kept_global=True, validation_aucs=aucs)


@dataclass(frozen=True)
class SitePersonalization:
    site: str
    aucs: dict[str, float]  # {global, personalized, local_only, centralized}
    gain: float  # personalized - global AUC
    verdict: str  # "helps" | "hurts" | "no clear change"
    best: str  # the model kind with the highest AUC at this site

    def line(self) -> str:
        a = self.aucs
        return (
            f"{self.site}: personalization {self.verdict} ({self.gain:+.3f} AUC: global {a['global']:.3f} -> "
            f"personalized {a['personalized']:.3f}; local-only {a['local_only']:.3f}, "
            f"centralized {a['centralized']:.3f}; best here: {self.best})"
        )


@dataclass(frozen=True)
class PersonalizationSummary:
    sites: tuple[SitePersonalization, ...]
    min_gain: float

    @property
    def helped(self) -> tuple[str, ...]:
        return tuple(s.site for s in self.sites if s.verdict == "helps")

    @property
    def hurt(self) -> tuple[str, ...]:
        return tuple(s.site for s in self.sites if s.verdict == "hurts")

    def to_dict(self) -> dict:
        return {
            "min_gain": self.min_gain,
            "helped": list(self.helped),
            "hurt": list(self.hurt),
            "sites": [dataclasses.asdict(s) for s in self.sites],
        }

    def markdown(self) -> str:
        return "\n".join(f"- {s.line()}" for s in self.sites)


def personalization_summary(
    site_aucs: Mapping[str, Mapping[str, float]], min_gain: float = 0.01
) -> PersonalizationSummary:
    """Where personalization helps, per site.

    Args:
        site_aucs: {site: {"global", "personalized", "local_only", "centralized": AUC}} on
            the site's own test data.
        min_gain: AUC change below which the verdict is "no clear change" (a few hundred
            test images cannot resolve smaller differences).

    Raises:
        InputError: a site lacks one of the four AUCs, or an AUC is not in [0, 1].
    """
    if not 0 <= min_gain < 1:
        raise InputError("min_gain", min_gain, "it must lie in [0, 1)", "use e.g. 0.01")
    rows = []
    for site, aucs in site_aucs.items():
        missing = [k for k in MODEL_KINDS if k not in aucs]
        if missing:
            raise InputError(f"AUCs of {site}", sorted(aucs), f"each site needs {list(MODEL_KINDS)}", f"add {missing}")
        values = {k: float(aucs[k]) for k in MODEL_KINDS}
        bad = {k: v for k, v in values.items() if not 0 <= v <= 1}
        if bad:
            raise InputError(f"AUCs of {site}", bad, "an AUC must lie in [0, 1]", "pass AUCs, not percentages or NaN")
        gain = values["personalized"] - values["global"]
        verdict = "helps" if gain >= min_gain else "hurts" if gain <= -min_gain else "no clear change"
        rows.append(SitePersonalization(site, values, gain, verdict, max(values, key=values.get)))
    return PersonalizationSummary(tuple(rows), float(min_gain))
