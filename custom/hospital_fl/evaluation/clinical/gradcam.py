"""Where the pneumonia classifier looks: class activation maps and how much of them lies on the lungs.

Method: Grad-CAM (MONAI's) for a network that pools its last feature map globally
(densenet121), HiResCAM for one whose head flattens it into a Linear layer (the compact
network). Grad-CAM weighs each channel by its gradient averaged over positions, which is
faithful only when the head pools: with a flattening head each position has its own weights,
and the average misplaces the evidence. HiResCAM (Draelos & Carin, 2020) keeps the gradient
per position, ReLU(sum_c dY/dA_c * A_c), which equals the logit's decomposition over positions
for such a head. ``method="auto"`` picks by the network; the report names the method used.

Target layer: Grad-CAM needs the last feature map that still has a spatial layout. It is
found by running the model once on a blank image and taking the last (B, C, H, W) output
with H, W > 1; of the modules that returned that very tensor (a Sequential and its last
child; an in-place ReLU and the norm before it) the last to run that is not a container of
another is named. For CXRClassifier this is

- ``net.net.layer_2`` for the compact network (its last residual unit: 128 x 4 x 4 at 28 x 28),
- ``net.class_layers.relu`` for densenet121 (the layer MONAI's own GradCAM example uses).

Binary head: the model has one pneumonia logit z. Grad-CAM is computed on the two-class
logits (-z, z) and explains the class the model predicted for each image (z for "pneumonia",
-z for "normal"), so a normal image's map shows the evidence for "normal", not the absence of
pneumonia evidence. Maps are the raw ReLU(sum_c w_c A_c) upsampled to the image size,
without MONAI's per-image min-max rescaling, so their mass can be compared between regions.

Measured (tests/unit/test_clinical_gradcam.py), compact network after 2 epochs, 3 seeds:
Grad-CAM's maps favoured the centre over the corners for two seeds only, HiResCAM's for all
three, in line with occlusion (occluding the centre changes the logit 3-6 times more than
occluding the corners for all three).

Region mass: the "lung" region is the central box covering ``center_fraction`` of each side
(both lung fields and the mediastinum of a centred frontal radiograph); the corners are the
four boxes of ``corner_fraction`` of each side, which hold no anatomy a diagnosis rests on
(labels, collimation edges, shoulders). Mass is compared per unit area.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.visualize import GradCAM

from hospital_fl.errors import InputError
from hospital_fl.training.loops import fit_to_model, predict_proba, to_tensor

__all__ = [
    "CAM_METHODS",
    "GradCAMSample",
    "cam_method_for",
    "RegionMass",
    "find_target_layer",
    "gradcam_maps",
    "plot_gradcam",
    "region_mass",
    "region_occlusion_effect",
    "sample_gradcam",
]


CAM_METHODS = ("auto", "gradcam", "hirescam")


def cam_method_for(model: torch.nn.Module) -> str:
    """HiResCAM for the compact network (flattening head), Grad-CAM otherwise (global pooling)."""
    return "hirescam" if getattr(model, "arch", None) == "compact" else "gradcam"


class _TwoClassLogits(torch.nn.Module):
    """(B, 1) pneumonia logit z -> (B, 2) logits (-z, z): class 0 normal, class 1 pneumonia."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        return torch.cat([-z, z], dim=1)


def _input_size(model: torch.nn.Module) -> int:
    return int(getattr(model, "image_size", 28))


def find_target_layer(model: torch.nn.Module) -> str:
    """Name (as in ``model.named_modules()``) of the last module producing a spatial map.

    See the module docstring for the rule and its result for each CXRClassifier arch.
    """
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: outputs.append((name, out)))
        for name, module in model.named_modules()
        if name
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            size = _input_size(model)
            model(torch.zeros(1, 1, size, size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    spatial = [(n, o) for n, o in outputs if isinstance(o, torch.Tensor) and o.ndim == 4 and min(o.shape[-2:]) > 1]
    if not spatial:
        raise InputError(
            "model", type(model).__name__, "Grad-CAM needs a module with a (B, C, H, W) output", "use a CXRClassifier"
        )
    last = spatial[-1][1]
    # several modules can return that same tensor: a container and its last child, or an
    # in-place activation and the layer before it; skip containers, keep the last to run
    same = [n for n, o in spatial if o is last]
    return [n for n in same if not any(other.startswith(n + ".") for other in same)][-1]


def _hirescam(model: torch.nn.Module, layer: str, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c dY/dA_c * A_c) at ``layer`` for logit ``cls`` of each image, upsampled to x's size."""
    captured: list[torch.Tensor] = []
    module = dict(model.named_modules())[layer]
    hook = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = _TwoClassLogits(model)(x)
    finally:
        hook.remove()
    activation = captured[-1]
    (grad,) = torch.autograd.grad(logits.gather(1, cls.reshape(-1, 1)).sum(), activation)
    cam = torch.relu((grad * activation).sum(dim=1, keepdim=True))
    return torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def gradcam_maps(
    model: torch.nn.Module,
    images: np.ndarray,
    target_layer: str | None = None,
    batch_size: int = 128,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Class activation maps of uint8 (N, H, W) images for each image's predicted class.

    Args:
        method: "gradcam", "hirescam", or "auto" (``cam_method_for`` the model).

    Returns:
        (maps, probs): maps (N, S, S) >= 0 at the model's input size S (upsampled
        bilinearly), probs (N,) the pneumonia probabilities the maps explain.
    """
    if method not in CAM_METHODS:
        raise InputError("method", method, f"it must be one of {CAM_METHODS}", "use auto")
    method = cam_method_for(model) if method == "auto" else method
    if images.ndim != 3:
        raise InputError("images", images.shape, "they must be (N, H, W) grayscale", "pass CXRArrays.images")
    layer = target_layer or find_target_layer(model)
    names = {n for n, _ in model.named_modules()}
    if layer not in names:
        raise InputError(
            "target_layer", layer, "it must name a module of the model", "omit it to find it automatically"
        )
    # MONAI registers hooks it never removes (and turns in-place activations off): work on a copy
    model = copy.deepcopy(model).cpu().eval()
    if method == "gradcam":
        cam = GradCAM(nn_module=_TwoClassLogits(model), target_layers=f"model.{layer}", postprocessing=lambda m: m)
    x = to_tensor(images)
    maps, probs = [], []
    for i in range(0, len(x), batch_size):
        xb = fit_to_model(x[i : i + batch_size], model).requires_grad_(True)
        with torch.no_grad():
            pb = torch.sigmoid(model(xb)[:, 0])
        predicted = (pb >= 0.5).long()
        if method == "hirescam":
            out = _hirescam(model, layer, xb, predicted).detach().float()
        else:
            out = torch.zeros(len(xb), *xb.shape[-2:])
            # MONAI indexes logits[:, class_idx]: one call per predicted class, never a mixed batch
            for cls in (0, 1):
                members = (predicted == cls).nonzero().reshape(-1)
                if len(members):
                    out[members] = cam(xb[members], class_idx=cls).detach()[:, 0].float()
        maps.append(out.numpy())
        probs.append(pb.numpy())
    return np.concatenate(maps), np.concatenate(probs)


@dataclass(frozen=True)
class GradCAMSample:
    """Test images with their maps: correct and incorrect predictions (threshold 0.5)."""

    indices: np.ndarray  # into the test set
    images: np.ndarray  # (K, H, W) uint8
    labels: np.ndarray  # (K,)
    probs: np.ndarray  # (K,) pneumonia probability
    maps: np.ndarray  # (K, S, S) raw maps
    target_layer: str
    method: str = "gradcam"  # gradcam or hirescam

    @property
    def correct(self) -> np.ndarray:
        return (self.probs >= 0.5) == self.labels.astype(bool)


def sample_gradcam(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    n_correct: int = 8,
    n_incorrect: int = 8,
    seed: int = 0,
    target_layer: str | None = None,
) -> GradCAMSample:
    """Grad-CAM of up to ``n_correct`` correctly and ``n_incorrect`` wrongly classified
    images drawn at random (seeded) from a test set; fewer when the set has fewer."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise InputError("labels", len(labels), f"there must be one per image ({len(images)})", "pass CXRArrays")
    layer = target_layer or find_target_layer(model)
    probs = predict_proba(model, images, device="cpu")
    correct = (probs >= 0.5) == labels.astype(bool)
    rng = np.random.default_rng(seed)
    picked = np.concatenate(
        [
            rng.permutation(np.flatnonzero(correct))[:n_correct],
            rng.permutation(np.flatnonzero(~correct))[:n_incorrect],
        ]
    ).astype(np.int64)
    method = cam_method_for(model)
    maps, cam_probs = gradcam_maps(model, images[picked], layer, method=method)
    return GradCAMSample(picked, images[picked], labels[picked], cam_probs, maps, layer, method)


@dataclass(frozen=True)
class RegionMass:
    """Per map: the share of its mass in the central (lung) box and in the four corners,
    and the per-unit-area ratio centre / corners (NaN for an all-zero map)."""

    center_share: np.ndarray
    corners_share: np.ndarray
    center_per_area: np.ndarray  # share of mass / share of area
    corners_per_area: np.ndarray

    @property
    def ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.center_per_area / self.corners_per_area


def _region_masks(
    size: tuple[int, int], center_fraction: float, corner_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    if not (0 < center_fraction < 1 and 0 < corner_fraction <= 0.5 and center_fraction + 2 * corner_fraction <= 1):
        raise InputError(
            "center_fraction/corner_fraction",
            (center_fraction, corner_fraction),
            "they must lie in (0, 1) and (0, 0.5] with center + 2 * corner <= 1 (no overlap)",
            "use 0.5 and 0.25",
        )
    h, w = size
    center = np.zeros((h, w), bool)
    ch, cw = round(h * center_fraction), round(w * center_fraction)
    top, left = (h - ch) // 2, (w - cw) // 2
    center[top : top + ch, left : left + cw] = True
    corners = np.zeros((h, w), bool)
    kh, kw = round(h * corner_fraction), round(w * corner_fraction)
    for rows in (slice(0, kh), slice(h - kh, h)):
        for cols in (slice(0, kw), slice(w - kw, w)):
            corners[rows, cols] = True
    return center, corners


def region_mass(maps: np.ndarray, center_fraction: float = 0.5, corner_fraction: float = 0.25) -> RegionMass:
    """Share of each (N, H, W) map's mass in the central box and in the corner boxes.

    Args:
        maps: non-negative maps.
        center_fraction: side of the central box as a fraction of each image side.
        corner_fraction: side of each corner box as a fraction of each image side; with
            center_fraction + 2 * corner_fraction <= 1 the regions do not overlap.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise InputError("maps", maps.shape, "they must be (N, H, W)", "pass gradcam_maps(...)[0]")
    if (maps < 0).any():
        raise InputError("maps", float(maps.min()), "maps must be non-negative", "pass raw Grad-CAM maps (after ReLU)")
    center, corners = _region_masks(maps.shape[1:], center_fraction, corner_fraction)
    total = maps.sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        c_share = np.where(total > 0, maps[:, center].sum(1) / total, np.nan)
        k_share = np.where(total > 0, maps[:, corners].sum(1) / total, np.nan)
    area = maps.shape[1] * maps.shape[2]
    return RegionMass(
        center_share=c_share,
        corners_share=k_share,
        center_per_area=c_share / (center.sum() / area),
        corners_per_area=k_share / (corners.sum() / area),
    )


def region_occlusion_effect(
    model: torch.nn.Module, images: np.ndarray, center_fraction: float = 0.5, corner_fraction: float = 0.25
) -> tuple[float, float]:
    """Mean |change of the pneumonia logit| when the central box, then the four corners, are
    set to mid-grey (0 after intensity scaling): a check of Grad-CAM that needs no gradient.
    The two regions have equal area with the defaults."""
    x = to_tensor(images)
    x = fit_to_model(x, model)
    center, corners = (torch.as_tensor(m) for m in _region_masks(tuple(x.shape[-2:]), center_fraction, corner_fraction))
    was_training = model.training
    model.cpu().eval()
    try:
        with torch.no_grad():
            base = model(x)[:, 0]
            effects = []
            for mask in (center, corners):
                occluded = x.clone()
                occluded[:, :, mask] = 0.0
                effects.append(float((model(occluded)[:, 0] - base).abs().mean()))
    finally:
        model.train(was_training)
    return effects[0], effects[1]


def plot_gradcam(sample: GradCAMSample, path: str | Path, columns: int = 8) -> Path:
    """A grid of images with their Grad-CAM overlaid (each map scaled to its own maximum),
    titled with label, probability and correct/wrong; writes a PNG."""
    from hospital_fl.evaluation.clinical._figures import plt, save_figure

    n = len(sample.indices)
    if n == 0:
        raise InputError("sample", "0 images", "there must be at least one image to plot", "sample a larger test set")
    cols = min(columns, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    size = sample.maps.shape[-1]
    for k, ax in enumerate(axes.ravel()[:n]):
        image = to_tensor(sample.images[k : k + 1])
        if image.shape[-1] != size:
            image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear")
        peak = sample.maps[k].max()
        ax.imshow(image[0, 0].numpy(), cmap="gray")
        ax.imshow(sample.maps[k] / peak if peak > 0 else sample.maps[k], cmap="jet", alpha=0.4, vmin=0, vmax=1)
        verdict = "correct" if sample.correct[k] else "WRONG"
        ax.set_title(f"y={int(sample.labels[k])} p={sample.probs[k]:.2f}\n{verdict}", fontsize=7)
    name = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM"}[sample.method]
    fig.suptitle(f"{name} ({sample.target_layer}); map explains the predicted class", fontsize=8)
    return save_figure(fig, path)
