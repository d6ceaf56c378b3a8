"""Chest X-ray classifiers built from MONAI networks.

- ``compact``: a small residual MONAI Classifier for 28x28 inputs (demo default).
- ``densenet121``: MONAI DenseNet-121, the CheXNet-style production network at 224x224.

Heads: ``pneumonia`` (one logit, binary) or ``chestxray14`` (14 logits, multi-label BCE).
Normalisation layers are GroupNorm/InstanceNorm, never BatchNorm: batch statistics differ
between hospitals with different prevalence, and averaging them across sites hurts the
global model (and BatchNorm is incompatible with per-sample DP-SGD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets import Classifier, DenseNet121

from hospital_fl.data.findings import CHESTXRAY14_FINDINGS
from hospital_fl.errors import InputError

__all__ = ["CHESTXRAY14_FINDINGS", "CXRClassifier", "ModelConfig", "build_cxr_model", "num_outputs"]

_TASK_OUTPUTS = {"pneumonia": 1, "chestxray14": len(CHESTXRAY14_FINDINGS)}
_ARCHS = ("compact", "densenet121")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "compact"
    task: str = "pneumonia"
    image_size: int = 28

    def __post_init__(self):
        if self.arch not in _ARCHS:
            raise InputError("arch", self.arch, f"it must be one of {_ARCHS}", "use --arch compact or densenet121")
        if self.task not in _TASK_OUTPUTS:
            raise InputError(
                "task", self.task, f"it must be one of {tuple(_TASK_OUTPUTS)}", "use pneumonia or chestxray14"
            )
        if self.image_size < 16:
            raise InputError(
                "image_size", self.image_size, "it must be >= 16 pixels", "use 28 (compact) or 224 (densenet121)"
            )


def num_outputs(task: str) -> int:
    return _TASK_OUTPUTS[task]


class CXRClassifier(torch.nn.Module):
    """A CXR network constructible from plain arguments (what FLARE configs name by path)."""

    def __init__(self, arch: str = "compact", task: str = "pneumonia", image_size: int = 28):
        super().__init__()
        self.arch, self.task, self.image_size = arch, task, image_size  # read back by FLARE's job export
        self.net = _build_net(ModelConfig(arch=arch, task=task, image_size=image_size))

    _always_serialize_args = ("arch", "task", "image_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_cxr_model(cfg: ModelConfig = ModelConfig()) -> CXRClassifier:
    """Build an untrained classifier that maps (B, 1, S, S) images to (B, outputs) logits."""
    return CXRClassifier(cfg.arch, cfg.task, cfg.image_size)


def _build_net(cfg: ModelConfig) -> torch.nn.Module:
    out = num_outputs(cfg.task)
    if cfg.arch == "densenet121":
        # CheXNet layout; MONAI's DenseNet uses BatchNorm by default, so swap in GroupNorm.
        return DenseNet121(spatial_dims=2, in_channels=1, out_channels=out, norm=("group", {"num_groups": 32}))
    return Classifier(
        in_shape=(1, cfg.image_size, cfg.image_size),
        classes=out,
        channels=(32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=1,
        norm="instance",
        dropout=0.1,
    )
