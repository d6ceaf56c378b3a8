"""Typed, frozen training settings shared by federated, centralized and local-only runs."""

from __future__ import annotations

from dataclasses import dataclass

from hospital_fl.errors import InputError

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one local training call.

    Attributes:
        epochs: local epochs per call (per FL round for federated runs).
        batch_size: images per optimiser step.
        lr: peak learning rate of AdamW (a fresh optimiser each call).
        schedule: "cosine" (decay over the whole run, federated rounds included) or "constant".
        weight_decay: AdamW weight decay.
        balance_classes: scale the positive-class loss by negatives/positives at this site,
            so each class counts equally however skewed the hospital's prevalence is.
        augment: random shifts/rotations (MONAI RandAffine) during training.
        device: "cpu", "cuda" or "auto" (cuda when available).
        amp: mixed precision on CUDA (ignored on CPU).
        seed: seeds torch for reproducible local training.
        torch_threads: CPU threads for torch at this site (0 = torch's default, all cores);
            the simulator sets it so co-located simulated sites do not oversubscribe cores.
    """

    epochs: int = 1
    batch_size: int = 64
    lr: float = 2e-3
    schedule: str = "cosine"
    weight_decay: float = 1e-4
    balance_classes: bool = True
    augment: bool = True
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    torch_threads: int = 0

    def __post_init__(self):
        checks = [
            ("epochs", self.epochs >= 1, "it must be >= 1", "use --local-epochs 1 or more"),
            ("batch_size", self.batch_size >= 2, "it must be >= 2", "use e.g. 64"),
            ("lr", 0 < self.lr < 1, "it must lie in (0, 1)", "use e.g. 0.002"),
            ("schedule", self.schedule in ("cosine", "constant"), "it must be cosine or constant", "use cosine"),
            ("weight_decay", self.weight_decay >= 0, "it must be >= 0", "use e.g. 1e-4"),
            ("torch_threads", self.torch_threads >= 0, "it must be >= 0", "use 0 for all cores"),
            ("device", self.device in ("auto", "cpu", "cuda"), "it must be auto, cpu or cuda", "use --device auto"),
        ]
        for name, ok, rule, fix in checks:
            if not ok:
                raise InputError(name, getattr(self, name), rule, fix)
