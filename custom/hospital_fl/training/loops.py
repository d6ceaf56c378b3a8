"""Local training and inference for CXR classifiers (pure torch + MONAI).

``train_local`` is the one training loop: plain training and DP-SGD differ only in their
``Regime`` (how batches are drawn, how a step is taken); see hospital_fl.training.dp_sgd."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from monai.transforms import RandAffine, Resize, ScaleIntensityRange

from hospital_fl.training.config import TrainConfig

__all__ = [
    "AdamWStep",
    "BatchPlan",
    "Proximal",
    "Regime",
    "ShuffledBatches",
    "StepRule",
    "TrainResult",
    "augment_batch",
    "augmenter",
    "fit_to_model",
    "get_weights",
    "plain_regime",
    "predict_proba",
    "resolve_device",
    "scheduled_lr",
    "set_weights",
    "to_tensor",
    "train_local",
]

_SCALE = ScaleIntensityRange(a_min=0.0, a_max=255.0, b_min=-1.0, b_max=1.0, clip=True)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    seconds: float
    lr_sum: float = 0.0  # summed learning rate over steps (SCAFFOLD's control update divides by it)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: got 'cuda'; no CUDA GPU is visible. Fix: use --device auto or cpu")
    return torch.device(name)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1] via MONAI intensity scaling."""
    return torch.as_tensor(_SCALE(images[:, None].astype(np.float32))).float()


@functools.lru_cache(maxsize=4)
def _resizer(size: int) -> Resize:
    return Resize((size, size), mode="bilinear")


def fit_to_model(batch: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Resize a (B, 1, H, W) batch to the square input the model expects (its
    ``image_size``), e.g. 28x28 images for the 224x224 DenseNet-121; per batch, so a
    dataset is never held in memory at the larger size."""
    size = getattr(model, "image_size", None)
    if size is None or tuple(batch.shape[-2:]) == (size, size):
        return batch
    return torch.as_tensor(_resizer(size)(batch[:, 0])).unsqueeze(1)


def get_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    # copies: numpy views would change as the model keeps training
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    state = model.state_dict()
    missing = set(state) - set(weights)
    if missing:
        raise KeyError(f"weights lack {len(missing)} model entries, e.g. {sorted(missing)[:3]}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(weights[k])).reshape(state[k].shape) for k in state})


def augmenter(seed: int) -> RandAffine:
    # Small shifts/rotations/zoom: radiographs vary in positioning, never in laterality,
    # so no flips. One affine per batch keeps augmentation cheap on CPU.
    aug = RandAffine(prob=0.8, rotate_range=0.15, translate_range=(2, 2), scale_range=0.1, padding_mode="border")
    aug.set_random_state(seed)
    return aug


def augment_batch(aug: RandAffine, batch: torch.Tensor) -> torch.Tensor:
    """One random affine for a whole (B, 1, H, W) batch: MONAI transforms are channel-first
    per sample, so the batch is passed as channels."""
    return torch.as_tensor(aug(batch[:, 0])).unsqueeze(1)


def scheduled_lr(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at ``progress`` (0..1) of the whole run: constant or cosine to 5% of lr."""
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))))


def _pos_weight(labels: torch.Tensor) -> torch.Tensor:
    pos = labels.sum(0)
    neg = labels.shape[0] - pos
    return (neg / pos.clamp(min=1)).clamp(0.05, 20.0)


@dataclass(frozen=True)
class Proximal:
    """FedProx's term mu/2 * ||w - anchor||^2 over the parameters ``anchor`` names."""

    mu: float
    params: dict[str, torch.nn.Parameter]
    anchor: dict[str, torch.Tensor]

    def penalty(self) -> torch.Tensor:
        """The term itself, added to the loss before the backward pass."""
        prox = sum(((self.params[k] - self.anchor[k]) ** 2).sum() for k in self.params if k in self.anchor)
        return 0.5 * self.mu * prox

    @torch.no_grad()
    def add_gradient(self) -> None:
        """Add the term's gradient mu * (w - anchor) to each parameter's gradient."""
        for name, p in self.params.items():
            if name in self.anchor and p.grad is not None:
                p.grad.add_(self.mu * (p - self.anchor[name]))


class BatchPlan(Protocol):
    """How a training call draws its batches.

    The learning-rate schedule advances ``units_per_batch`` of ``epoch_units`` per batch
    drawn; a batch of fewer than ``min_records`` records is skipped (no step)."""

    epoch_units: int
    units_per_batch: int
    min_records: int

    def epoch(self) -> Iterator[torch.Tensor]:
        """Record indices of each batch of one epoch."""
        ...


class StepRule(Protocol):
    """How a training call takes an optimiser step.

    ``module`` runs the forward pass, ``optimizer.param_groups`` take the scheduled
    learning rate, ``amp`` turns autocast on for the forward pass."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    amp: bool

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's logits for one batch."""
        ...

    def take(self, loss: torch.Tensor | None, prox: Proximal | None) -> torch.Tensor | None:
        """One optimiser step from ``loss`` (None: a batch with no records); returns the
        loss to report, or None."""
        ...


@dataclass(frozen=True)
class Regime:
    """How one local training call draws its batches and takes its steps: shuffled
    minibatches and AdamW (``plain_regime``), or DP-SGD's Poisson batches and noisy steps
    (hospital_fl.training.dp_sgd)."""

    batches: BatchPlan
    step: StepRule


@dataclass
class ShuffledBatches:
    """Each epoch a fresh permutation of the records from ``generator`` cut into
    ``batch_size`` batches; a last batch of one record is skipped (BatchNorm cannot
    train on one)."""

    n_records: int
    batch_size: int
    generator: torch.Generator
    min_records: int = 2

    @property
    def epoch_units(self) -> int:
        return self.n_records

    @property
    def units_per_batch(self) -> int:
        return self.batch_size

    def epoch(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n_records, generator=self.generator)
        for i in range(0, len(order), self.batch_size):
            yield order[i : i + self.batch_size]


class AdamWStep:
    """AdamW on every parameter of ``model``, the FedProx term in the loss, and AMP's
    gradient scaler when ``cfg.amp`` runs on CUDA."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
        self.module = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp = cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch)

    def take(self, loss: torch.Tensor | None, prox: Proximal | None) -> torch.Tensor | None:
        if loss is None:
            raise ValueError("AdamWStep takes no step without records (ShuffledBatches never draws an empty batch)")
        if prox is not None:
            loss = loss + prox.penalty()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss


def plain_regime(model: torch.nn.Module, n_records: int, cfg: TrainConfig, device: torch.device) -> Regime:
    """Non-private training: shuffled minibatches seeded by ``cfg.seed`` and AdamW steps."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return Regime(ShuffledBatches(n_records, cfg.batch_size, gen), AdamWStep(model, cfg, device))


def train_local(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    anchor: dict[str, torch.Tensor] | None = None,
    fedprox_mu: float = 0.0,
    epoch_offset: int = 0,
    total_epochs: int | None = None,
    control: dict[str, torch.Tensor] | None = None,
    regime: Regime | None = None,
) -> TrainResult:
    """Train ``model`` in place on one site's data for ``cfg.epochs`` epochs.

    The one training loop: the learning-rate schedule, augmentation, input resizing and
    loss are the same for every regime; only how batches are drawn and how a step is taken
    change (``regime``), as Opacus's make_private swaps the sampler and the optimiser.

    Args:
        model: the network (its weights are the starting point).
        images: uint8 (N, H, W).
        labels: (N,) binary or (N, K) multi-label targets.
        cfg: training settings.
        anchor: the received global weights; with ``fedprox_mu > 0`` a proximal term
            mu/2 * ||w - anchor||^2 keeps the site close to it (FedProx).
        fedprox_mu: the proximal weight, sent by the server with each round (0: FedAvg).
        epoch_offset / total_epochs: where this call sits in the whole run, so a federated
            round continues the same learning-rate schedule a centralized run would follow.
        control: SCAFFOLD's correction (global minus local control variate) per parameter;
            after every optimiser step each parameter moves by -lr * correction.
        regime: batches and steps; None: ``plain_regime`` (built after the model moves to
            ``cfg.device``). A regime's step must update ``model``'s own parameters.

    Returns:
        The steps taken (empty DP-SGD batches included), the mean reported loss and the
        summed learning rate over steps.
    """
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    if fedprox_mu < 0:
        raise ValueError(f"fedprox_mu must be >= 0, got {fedprox_mu}")
    x = to_tensor(images)
    y = torch.as_tensor(labels, dtype=torch.float32).reshape(len(labels), -1)
    model.to(device).train()
    if regime is None:
        regime = plain_regime(model, len(x), cfg, device)
    batches, step = regime.batches, regime.step
    pos_weight = _pos_weight(y).to(device) if cfg.balance_classes else None
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    aug = augmenter(cfg.seed) if cfg.augment else None
    params = dict(model.named_parameters())
    prox = None
    if anchor is not None and fedprox_mu > 0:
        prox = Proximal(fedprox_mu, params, {k: v.detach().to(device) for k, v in anchor.items()})
    if control is not None:
        control = {k: v.to(device) for k, v in control.items()}
    losses, lr_sum, steps = [], 0.0, 0
    total = (total_epochs or cfg.epochs) * batches.epoch_units
    done = epoch_offset * batches.epoch_units
    for _ in range(cfg.epochs):
        for idx in batches.epoch():
            for group in step.optimizer.param_groups:
                group["lr"] = scheduled_lr(cfg, done / total)
            done += batches.units_per_batch
            if len(idx) < batches.min_records:
                continue
            loss = None
            if len(idx) > 0:
                xb = fit_to_model(x[idx], model)
                if aug is not None:
                    xb = augment_batch(aug, xb)
                xb, yb = xb.to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
                with torch.autocast(device.type, enabled=step.amp):
                    loss = loss_fn(step.forward(xb).float(), yb)
            reported = step.take(loss, prox)
            lr_now = step.optimizer.param_groups[0]["lr"]
            if control is not None:
                with torch.no_grad():
                    for k, c in control.items():
                        params[k].add_(c, alpha=-lr_now)
            lr_sum += lr_now
            steps += 1
            if reported is not None:
                losses.append(float(reported.detach()))
    model.cpu()
    return TrainResult(
        steps=steps,
        mean_loss=float(np.mean(losses)) if losses else float("nan"),
        seconds=time.perf_counter() - start,
        lr_sum=lr_sum,
    )


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module, images: np.ndarray, device: str = "auto", batch_size: int = 512
) -> np.ndarray:
    """Sigmoid probabilities, (N,) for one output or (N, K) for several."""
    dev = resolve_device(device)
    model.to(dev).eval()
    x = to_tensor(images)
    out = [
        torch.sigmoid(model(fit_to_model(x[i : i + batch_size], model).to(dev)).float()).cpu()
        for i in range(0, len(x), batch_size)
    ]
    model.cpu()
    probs = torch.cat(out).numpy()
    return probs[:, 0] if probs.shape[1] == 1 else probs
