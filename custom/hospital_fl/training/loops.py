"""Local training and inference for CXR classifiers (pure torch + MONAI)."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import RandAffine, Resize, ScaleIntensityRange

from hospital_fl.training.config import TrainConfig

__all__ = [
    "TrainResult",
    "augment_batch",
    "augmenter",
    "resolve_device",
    "to_tensor",
    "fit_to_model",
    "train_local",
    "predict_proba",
    "get_weights",
    "set_weights",
    "scheduled_lr",
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
) -> TrainResult:
    """Train ``model`` in place on one site's data for ``cfg.epochs`` epochs.

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
    """
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = to_tensor(images)
    y = torch.as_tensor(labels, dtype=torch.float32).reshape(len(labels), -1)
    model.to(device).train()
    pos_weight = _pos_weight(y).to(device) if cfg.balance_classes else None
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    aug = augmenter(cfg.seed) if cfg.augment else None
    if fedprox_mu < 0:
        raise ValueError(f"fedprox_mu must be >= 0, got {fedprox_mu}")
    if anchor is not None and fedprox_mu > 0:
        anchor = {k: v.detach().to(device) for k, v in anchor.items()}
    params = dict(model.named_parameters())
    if control is not None:
        control = {k: v.to(device) for k, v in control.items()}
    losses, lr_sum = [], 0.0
    total = (total_epochs or cfg.epochs) * len(x)
    seen = epoch_offset * len(x)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(cfg, seen / total)
            seen += cfg.batch_size
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:
                continue
            xb = fit_to_model(x[idx], model)
            if aug is not None:
                xb = augment_batch(aug, xb)
            xb, yb = xb.to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                loss = loss_fn(model(xb).float(), yb)
            if anchor is not None and fedprox_mu > 0:
                prox = sum(((params[k] - anchor[k]) ** 2).sum() for k in params if k in anchor)
                loss = loss + 0.5 * fedprox_mu * prox
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr_now = optimizer.param_groups[0]["lr"]
            if control is not None:
                with torch.no_grad():
                    for k, c in control.items():
                        params[k].add_(c, alpha=-lr_now)
            lr_sum += lr_now
            losses.append(float(loss.detach()))
    model.cpu()
    return TrainResult(
        steps=len(losses),
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
