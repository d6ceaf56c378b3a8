"""3D brain-tumour segmentation networks built from MONAI.

- ``segresnet``: MONAI SegResNet with the BraTS layout (blocks_down (1, 2, 2, 4), blocks_up
  (1, 1, 1)); BraTS uses 16 initial filters, the default here is 8 so a CPU site can train.
- ``unet``: MONAI residual UNet, channels (8, 16, 32, 64) scaled by ``init_filters / 8``.

Both downsample three times (inputs divisible by 8) and output one logit per region (sigmoid,
not softmax: BraTS regions TC/WT/ET overlap). Normalisation is GroupNorm (SegResNet) or
InstanceNorm (UNet), never BatchNorm, whose statistics would differ between hospitals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets import SegResNet, UNet

from hospital_fl.errors import InputError

__all__ = ["SegModelConfig", "SegNetwork", "build_seg_model"]

_ARCHS = ("segresnet", "unet")


@dataclass(frozen=True)
class SegModelConfig:
    """Settings of a segmentation network.

    Attributes:
        arch: "segresnet" or "unet".
        in_channels: MRI modalities stacked as channels (1 here; 4 for BraTS T1/T1ce/T2/FLAIR).
        out_channels: sigmoid regions (1 for a binary tumour mask; 3 for BraTS TC/WT/ET).
        init_filters: width of the first level; a multiple of 8 (SegResNet's GroupNorm uses 8 groups).
        dropout: dropout probability (0 disables it).
    """

    arch: str = "segresnet"
    in_channels: int = 1
    out_channels: int = 1
    init_filters: int = 8
    dropout: float = 0.0

    def __post_init__(self):
        checks = [
            ("arch", self.arch in _ARCHS, f"it must be one of {_ARCHS}", "use segresnet or unet"),
            ("in_channels", self.in_channels >= 1, "it must be >= 1", "use the number of MRI modalities, e.g. 1"),
            (
                "out_channels",
                self.out_channels >= 1,
                "it must be >= 1",
                "use 1 for a binary tumour mask or 3 for BraTS TC/WT/ET",
            ),
            (
                "init_filters",
                self.init_filters >= 8 and self.init_filters % 8 == 0,
                "it must be a positive multiple of 8",
                "use 8 on CPU or 16 (the BraTS setting) on a GPU",
            ),
            ("dropout", 0.0 <= self.dropout < 1.0, "it must lie in [0, 1)", "use 0.0 or e.g. 0.2"),
        ]
        for name, ok, rule, fix in checks:
            if not ok:
                raise InputError(name, getattr(self, name), rule, fix)


class SegNetwork(torch.nn.Module):
    """A segmentation network constructible from plain arguments (what FLARE configs name by path).

    Maps (B, in_channels, X, Y, Z) volumes, each side divisible by 8, to (B, out_channels, X, Y, Z) logits.
    """

    def __init__(
        self,
        arch: str = "segresnet",
        in_channels: int = 1,
        out_channels: int = 1,
        init_filters: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        cfg = SegModelConfig(arch, in_channels, out_channels, init_filters, dropout)
        # read back by FLARE's job export
        self.arch, self.in_channels, self.out_channels = arch, in_channels, out_channels
        self.init_filters, self.dropout = init_filters, dropout
        self.net = _build_net(cfg)

    _always_serialize_args = ("arch", "in_channels", "out_channels", "init_filters", "dropout")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_seg_model(cfg: SegModelConfig = SegModelConfig()) -> SegNetwork:
    """Build an untrained segmentation network from its config."""
    return SegNetwork(cfg.arch, cfg.in_channels, cfg.out_channels, cfg.init_filters, cfg.dropout)


def _build_net(cfg: SegModelConfig) -> torch.nn.Module:
    if cfg.arch == "segresnet":
        return SegResNet(
            spatial_dims=3,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            init_filters=cfg.init_filters,
            blocks_down=(1, 2, 2, 4),
            blocks_up=(1, 1, 1),
            dropout_prob=cfg.dropout or None,
        )
    scale = cfg.init_filters // 8
    return UNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=tuple(c * scale for c in (8, 16, 32, 64)),
        strides=(2, 2, 2),
        num_res_units=2,
        norm="instance",
        dropout=cfg.dropout,
    )
