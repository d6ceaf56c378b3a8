"""MONAI preprocessing, training and scoring for 3D brain-tumour segmentation.

A case is ``{"image": [path per MRI modality], "label": path, "case": id}``; the modality files
are stacked as channels. Preprocessing: reorient to RAS, resample to a common voxel spacing,
z-score each modality over its non-zero voxels. Training draws label-aware random crops
(a set fraction centred on tumour) so small tumours are seen every epoch; scoring runs
sliding-window inference over the whole preprocessed volume and reports Dice and HD95 (mm)
per region.

Voxel spacing is a federation-wide setting: the network learns at a physical scale, so every
site must resample to the same spacing whatever its scanners produce. The default
(1, 1, 2) mm keeps clinical MRI at its in-plane resolution and does not invent slices:
a 256x256x25 volume at 0.78x0.78x6.5 mm becomes 200x200x79 (about 13 MB per modality,
0.4 s to load and resample on two CPU cores), whereas 1 mm isotropic interpolates its 25
slices into 157 (2x the memory and sliding-window time for no real detail). With the default crop
(64, 64, 32) a training crop then covers a 64 mm cube. BraTS volumes (1 mm isotropic) lose
every other slice at this default; GPU sites training on them can set (1, 1, 1) federation-wide.

One module (~550 lines): the MONAI transforms, the training step and the scoring share one
configuration and must agree on spacing, crop and label scheme.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor, PersistentDataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.metrics import DiceMetric, compute_hausdorff_distance
from monai.transforms import (
    AsDiscreted,
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)

from hospital_fl.errors import InputError
from hospital_fl.models.seg import SegModelConfig
from hospital_fl.training.loops import resolve_device, scheduled_lr

__all__ = [
    "SegPipelineConfig",
    "SegTrainConfig",
    "eval_transforms",
    "evaluate",
    "make_loader",
    "peak_step_memory",
    "region_names",
    "seg_loss",
    "train_epochs",
    "train_transforms",
]

_SCHEMES = {"binary": ("tumour",), "brats": ("TC", "WT", "ET")}
_KEYS = ["image", "label"]


def _numbers(values, cast) -> tuple | None:
    try:
        out = tuple(cast(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if all(o == v for o, v in zip(out, values)) else None


@dataclass(frozen=True)
class SegPipelineConfig:
    """Preprocessing and cropping, identical at every site of a federation.

    Attributes:
        label_scheme: "binary" (any label > 0 is tumour; one channel) or "brats"
            (labels 1/2/4 to overlapping TC, WT, ET channels).
        spacing: voxel spacing in mm to resample to, or None to keep each file's own
            (only sensible when every site's scans share one spacing).
        roi_size: training crop and sliding-window size in voxels; each side a multiple of 8
            (both networks downsample three times).
        num_crops: crops drawn per case per step.
        pos_fraction: share of crops centred on a tumour voxel (the rest on background).
        augment: random flips on all three axes and intensity scale/shift during training.
    """

    label_scheme: str = "binary"
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 2.0)
    roi_size: tuple[int, int, int] = (64, 64, 32)
    num_crops: int = 2
    pos_fraction: float = 0.5
    augment: bool = True

    def __post_init__(self):
        # lists (from JSON job configs) become tuples, so the config stays hashable
        spacing = self.spacing if self.spacing is None else _numbers(self.spacing, float)
        roi = _numbers(self.roi_size, int)
        spacing_ok = spacing is None or (len(spacing) == 3 and all(0 < s <= 20 for s in spacing))
        roi_ok = roi is not None and len(roi) == 3 and all(s >= 8 and s % 8 == 0 for s in roi)
        if spacing_ok and roi_ok:
            object.__setattr__(self, "spacing", spacing)
            object.__setattr__(self, "roi_size", roi)
        checks = [
            (
                "label_scheme",
                self.label_scheme in _SCHEMES,
                f"it must be one of {tuple(_SCHEMES)}",
                "use binary for a tumour mask or brats for BraTS labels 1/2/4",
            ),
            (
                "spacing",
                spacing_ok,
                "it must be three spacings in (0, 20] mm, or None",
                "use e.g. (1.0, 1.0, 2.0)",
            ),
            (
                "roi_size",
                roi_ok,
                "each side must be a multiple of 8 and >= 8 (the networks downsample three times)",
                "use e.g. (64, 64, 32) on CPU or (128, 128, 128) on a GPU",
            ),
            ("num_crops", self.num_crops >= 1, "it must be >= 1", "use e.g. 2"),
            ("pos_fraction", 0.0 <= self.pos_fraction <= 1.0, "it must lie in [0, 1]", "use e.g. 0.5"),
        ]
        for name, ok, rule, fix in checks:
            if not ok:
                raise InputError(name, getattr(self, name), rule, fix)


@dataclass(frozen=True)
class SegTrainConfig:
    """Settings of one local segmentation training call (one FL round at a site).

    Attributes:
        epochs: local epochs per call.
        lr: peak AdamW learning rate; short federated rounds restart the optimiser each
            round, so a higher rate than BraTS' 1e-4 with a cosine decay over the whole run.
        schedule: "cosine" (decay to 5% over the whole run, federated rounds included) or "constant".
        weight_decay: AdamW weight decay.
        batch_size: cases per step (each contributes ``num_crops`` crops).
        loss: "dice" (soft Dice) or "dicece" (Dice + per-channel binary cross-entropy).
        device: "cpu", "cuda" or "auto".
        amp: mixed precision (only on CUDA).
        sw_batch_size: sliding windows per forward pass when scoring (4 is ~3x faster on CPU than 1).
        overlap: sliding-window overlap when scoring.
        seed: seeds crops, augmentation and shuffling.
        steps_per_epoch: cap on steps per epoch (None: every case once), for CPU sites.
        torch_threads: CPU threads for torch at this site (0 = torch's default); applied by the executor.
    """

    epochs: int = 1
    lr: float = 2e-3
    schedule: str = "cosine"
    weight_decay: float = 1e-5
    batch_size: int = 1
    loss: str = "dicece"
    device: str = "auto"
    amp: bool = True
    sw_batch_size: int = 4
    overlap: float = 0.25
    seed: int = 0
    steps_per_epoch: int | None = None
    torch_threads: int = 0

    def __post_init__(self):
        checks = [
            ("epochs", self.epochs >= 1, "it must be >= 1", "use 1 or more"),
            ("lr", 0 < self.lr < 1, "it must lie in (0, 1)", "use e.g. 0.002"),
            ("schedule", self.schedule in ("cosine", "constant"), "it must be cosine or constant", "use cosine"),
            ("weight_decay", self.weight_decay >= 0, "it must be >= 0", "use e.g. 1e-5"),
            ("batch_size", self.batch_size >= 1, "it must be >= 1", "use 1 on CPU"),
            ("loss", self.loss in ("dice", "dicece"), "it must be dice or dicece", "use dicece"),
            ("device", self.device in ("auto", "cpu", "cuda"), "it must be auto, cpu or cuda", "use auto"),
            ("sw_batch_size", self.sw_batch_size >= 1, "it must be >= 1", "use e.g. 4"),
            ("overlap", 0.0 <= self.overlap < 1.0, "it must lie in [0, 1)", "use e.g. 0.25"),
            (
                "steps_per_epoch",
                self.steps_per_epoch is None or self.steps_per_epoch >= 1,
                "it must be >= 1 or None",
                "use None for every case once per epoch",
            ),
            ("torch_threads", self.torch_threads >= 0, "it must be >= 0", "use 0 for all cores"),
        ]
        for name, ok, rule, fix in checks:
            if not ok:
                raise InputError(name, getattr(self, name), rule, fix)


def region_names(cfg: SegPipelineConfig) -> tuple[str, ...]:
    """Names of the output channels, in order."""
    return _SCHEMES[cfg.label_scheme]


def _preprocess(cfg: SegPipelineConfig) -> list:
    if cfg.label_scheme == "binary":
        to_regions = AsDiscreted(keys="label", threshold=0.5)  # integer labels: > 0.5 is > 0
    else:
        to_regions = ConvertToMultiChannelBasedOnBratsClassesd(keys="label")
    steps = [
        LoadImaged(keys=_KEYS, image_only=True),  # a list of modality files is stacked as channels
        EnsureChannelFirstd(keys=_KEYS),
        EnsureTyped(keys=_KEYS, dtype=torch.float32),
        to_regions,
        EnsureTyped(keys="label", dtype=torch.float32),
        Orientationd(keys=_KEYS, axcodes="RAS", labels=None),
    ]
    if cfg.spacing is not None:
        steps.append(Spacingd(keys=_KEYS, pixdim=cfg.spacing, mode=("bilinear", "nearest")))
    steps.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    return steps


def train_transforms(cfg: SegPipelineConfig) -> Compose:
    """Preprocessing, label-aware random crops and (optionally) augmentation.

    Each case yields ``num_crops`` crops of ``roi_size``; the loader's collate stacks them.
    """
    steps = _preprocess(cfg) + [
        SpatialPadd(keys=_KEYS, spatial_size=cfg.roi_size),
        RandCropByPosNegLabeld(
            keys=_KEYS,
            label_key="label",
            spatial_size=cfg.roi_size,
            pos=cfg.pos_fraction,
            neg=1.0 - cfg.pos_fraction,
            num_samples=cfg.num_crops,
        ),
    ]
    if cfg.augment:
        steps += [RandFlipd(keys=_KEYS, prob=0.5, spatial_axis=axis) for axis in (0, 1, 2)]
        steps += [
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
    return Compose(steps + [EnsureTyped(keys=_KEYS, dtype=torch.float32)])


def eval_transforms(cfg: SegPipelineConfig) -> Compose:
    """Preprocessing only: whole volumes for sliding-window scoring (metadata kept for mm spacing)."""
    return Compose(_preprocess(cfg) + [EnsureTyped(keys=_KEYS, dtype=torch.float32)])


def _check_cases(cases: Sequence[Mapping]) -> list[dict]:
    cases = list(cases)
    if not cases:
        raise InputError("cases", cases, "at least one case is needed", "pass a non-empty datalist")
    for case in cases:
        if not isinstance(case, Mapping) or "image" not in case or "label" not in case:
            raise InputError(
                "cases",
                case,
                'each case must be a dict with "image" (modality paths) and "label" (mask path)',
                "build cases with hospital_fl.segmentation.datalist",
            )
    return [dict(c) for c in cases]


def make_loader(
    cases: Sequence[Mapping],
    transforms: Compose,
    batch_size: int,
    shuffle: bool,
    cache: bool,
    *,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> DataLoader:
    """A single-process MONAI loader over ``cases``.

    ``cache`` keeps every case's deterministic preprocessing (everything before the first
    random transform) in memory, about 4 bytes per voxel per channel of image and label;
    ``cache_dir`` keeps it on disk instead, for sites with more cases than memory.
    """
    data = _check_cases(cases)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        dataset = PersistentDataset(data=data, transform=transforms, cache_dir=cache_dir)
    elif cache:
        dataset = CacheDataset(data=data, transform=transforms, cache_rate=1.0, num_workers=1, progress=False)
    else:
        dataset = Dataset(data=data, transform=transforms)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0, generator=generator)


class _DiceBCE(torch.nn.Module):
    # MONAI's DiceCELoss applies softmax cross-entropy to multi-channel outputs, which is
    # wrong for overlapping sigmoid regions (TC inside WT); BCE per channel is what fits.
    def __init__(self):
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.bce = torch.nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.bce(logits, target)


def seg_loss(name: str) -> torch.nn.Module:
    """Sigmoid loss over independent region channels: "dice" or "dicece" (Dice + BCE).

    Dice is pooled over the batch, so a crop without tumour does not make the loss undefined.
    """
    if name == "dice":
        return DiceLoss(sigmoid=True, batch=True)
    if name == "dicece":
        return _DiceBCE()
    raise InputError("loss", name, "it must be dice or dicece", "use dicece")


def _plain(t: torch.Tensor) -> torch.Tensor:
    # MetaTensor tracks metadata through every op: costly inside the network
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def _seed_loader(loader: DataLoader, seed: int) -> None:
    transform = getattr(loader.dataset, "transform", None)
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed)
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(seed)


def train_epochs(
    model: torch.nn.Module,
    loader: DataLoader,
    cfg: SegTrainConfig,
    *,
    epoch_offset: int = 0,
    total_epochs: int | None = None,
    anchor: dict[str, torch.Tensor] | None = None,
    fedprox_mu: float = 0.0,
) -> dict:
    """Train ``model`` in place for ``cfg.epochs`` epochs over a loader from ``make_loader``.

    Args:
        epoch_offset / total_epochs: where this call sits in the whole run, so a federated
            round continues the learning-rate schedule a centralized run would follow.
        anchor / fedprox_mu: FedProx's proximal term mu/2 * ||w - anchor||^2 towards the
            received global weights (mu = 0: FedAvg).

    Returns:
        {"mean_loss", "steps", "seconds"}.
    """
    if fedprox_mu < 0:
        raise InputError("fedprox_mu", fedprox_mu, "it must be >= 0", "use 0 for FedAvg or e.g. 0.01")
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    _seed_loader(loader, cfg.seed)
    per_epoch = len(loader) if cfg.steps_per_epoch is None else min(len(loader), cfg.steps_per_epoch)
    total = max(1, (total_epochs or cfg.epochs) * per_epoch)
    seen = epoch_offset * per_epoch
    model.to(device).train()
    loss_fn = seg_loss(cfg.loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    params = dict(model.named_parameters())
    if anchor is not None and fedprox_mu > 0:
        anchor = {k: v.detach().to(device) for k, v in anchor.items()}
    losses = []
    for _ in range(cfg.epochs):
        for step, batch in enumerate(loader):
            if step >= per_epoch:
                break
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(cfg, seen / total)  # reads only cfg.lr and cfg.schedule
            seen += 1
            x = _plain(batch["image"]).to(device, non_blocking=True)
            y = _plain(batch["label"]).to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if anchor is not None and fedprox_mu > 0:
                prox = sum(((params[k] - anchor[k]) ** 2).sum() for k in params if k in anchor)
                loss = loss + 0.5 * fedprox_mu * prox
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
    model.cpu()
    return {
        "mean_loss": float(np.mean(losses)) if losses else float("nan"),
        "steps": len(losses),
        "seconds": time.perf_counter() - start,
    }


def _voxel_spacing(image: torch.Tensor, cfg: SegPipelineConfig) -> list[tuple[float, ...]] | None:
    if isinstance(image, MetaTensor):
        affine = image.affine.reshape(-1, 4, 4).double()
        return [tuple(float(s) for s in torch.linalg.norm(a[:3, :3], dim=0)) for a in affine]
    return [cfg.spacing] * image.shape[0] if cfg.spacing is not None else None


def _hd95(pred: torch.Tensor, label: torch.Tensor, spacing) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty masks warn; they are reported as None
        return compute_hausdorff_distance(pred, label, include_background=True, percentile=95, spacing=spacing)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    cases_or_loader: Sequence[Mapping] | DataLoader,
    pipe_cfg: SegPipelineConfig,
    train_cfg: SegTrainConfig,
) -> dict:
    """Score ``model`` on whole preprocessed volumes by sliding-window inference.

    Dice treats an empty label with an empty prediction as 1 (BraTS convention), so it is
    always defined. HD95 (mm) is undefined when the prediction or the label of a region is
    empty: such cases are left out of that region's mean and counted in ``hd95_undefined``;
    a region with no defined case reports None.

    Returns:
        {"dice": {region: float}, "hd95": {region: float | None},
         "hd95_undefined": {region: int}, "mean_dice": float, "cases": int}.
    """
    if isinstance(cases_or_loader, torch.utils.data.DataLoader):
        loader = cases_or_loader
    else:
        loader = make_loader(cases_or_loader, eval_transforms(pipe_cfg), 1, False, False)
    regions = region_names(pipe_cfg)
    device = resolve_device(train_cfg.device)
    use_amp = train_cfg.amp and device.type == "cuda"
    model.to(device).eval()
    dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
    hd_values: list[list[float]] = [[] for _ in regions]
    undefined = [0] * len(regions)
    cases = 0
    for batch in loader:
        image = batch["image"]
        spacing = _voxel_spacing(image, pipe_cfg)
        with torch.autocast(device.type, enabled=use_amp):
            logits = sliding_window_inference(
                _plain(image).to(device),
                pipe_cfg.roi_size,
                train_cfg.sw_batch_size,
                model,
                overlap=train_cfg.overlap,
                mode="gaussian",
            )
        pred = (torch.sigmoid(_plain(logits).float()) > 0.5).float().cpu()
        label = _plain(batch["label"]).float()
        if pred.shape[1] != len(regions) or label.shape[1] != len(regions):
            raise InputError(
                "out_channels",
                pred.shape[1],
                f"the {pipe_cfg.label_scheme} label scheme has {len(regions)} regions {regions}",
                f"build the model with out_channels={len(regions)}",
            )
        dice(pred, label)
        for b in range(pred.shape[0]):
            hd = _hd95(pred[b : b + 1], label[b : b + 1], spacing[b] if spacing else None)[0]
            for r, value in enumerate(hd.tolist()):
                if math.isfinite(value):
                    hd_values[r].append(value)
                else:
                    undefined[r] += 1
        cases += pred.shape[0]
    model.cpu()
    if cases == 0:
        raise InputError("cases", 0, "at least one case is needed to score", "pass a non-empty validation datalist")
    per_region = dice.aggregate().reshape(-1).tolist()
    return {
        "dice": dict(zip(regions, (float(d) for d in per_region))),
        "hd95": {r: (float(np.mean(v)) if v else None) for r, v in zip(regions, hd_values)},
        "hd95_undefined": dict(zip(regions, undefined)),
        "mean_dice": float(np.mean(per_region)),
        "cases": cases,
    }


_STEP_PROBE = """
import json, resource, sys, time
import torch
from hospital_fl.models.seg import SegModelConfig, build_seg_model
from hospital_fl.segmentation.pipeline import seg_loss
args = json.loads(sys.argv[1])
cfg = SegModelConfig(**args["model"])
model = build_seg_model(cfg).train()
gen = torch.Generator().manual_seed(0)
x = torch.randn(args["batch"], cfg.in_channels, *args["roi"], generator=gen)
y = (torch.rand(args["batch"], cfg.out_channels, *args["roi"], generator=gen) > 0.9).float()
loss_fn = seg_loss(args["loss"])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
loss_fn(model(x), y).backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kb": base, "peak_kb": peak, "seconds": seconds}))
"""


def peak_step_memory(
    model_cfg: SegModelConfig,
    roi: tuple[int, int, int] = (128, 128, 128),
    *,
    batch_size: int = 1,
    loss: str = "dicece",
    timeout_s: float = 600.0,
) -> dict:
    """Host memory of one training step (forward + backward) on a random ``roi`` crop, on CPU.

    Measured in a fresh interpreter, whose peak resident set (``ru_maxrss``) is not inflated
    by whatever ran before in this process.

    Returns:
        {"roi", "batch_size", "peak_rss_mb" (the whole process), "step_rss_mb" (the peak's rise
        during the step: activations and gradients), "seconds" (one step)}.
    """
    roi = tuple(int(s) for s in roi)
    if len(roi) != 3 or any(s < 8 or s % 8 for s in roi):
        raise InputError("roi", roi, "each side must be a multiple of 8 and >= 8", "use e.g. (128, 128, 128)")
    args = {"model": asdict(model_cfg), "roi": list(roi), "batch": batch_size, "loss": loss}
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", _STEP_PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the memory probe failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "roi": roi,
        "batch_size": batch_size,
        "peak_rss_mb": probe["peak_kb"] / 1024,
        "step_rss_mb": (probe["peak_kb"] - probe["base_kb"]) / 1024,
        "seconds": probe["seconds"],
    }
