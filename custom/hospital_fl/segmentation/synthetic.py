"""A synthetic, non-IID segmentation federation for benchmarks: random spheres, not patient data.

Two real patients cannot show a federated model learning, so benchmarks of the training loop use
MONAI's ``create_test_image_3d`` volumes (bright spheres in noise, the mask marking the spheres).
Sites differ the way scanners and referral patterns do: each site has its own noise level,
intensity scale and offset, lesion count and lesion size (see ``site_profile``). Everything is
drawn from ``seed``, so the same arguments write the same volumes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hospital_fl.errors import InputError
from hospital_fl.segmentation.datalist import LABEL_NAMES, LABEL_SCHEMES

__all__ = ["SYNTHETIC_DESCRIPTION", "SiteProfile", "SyntheticConfig", "site_profile", "write_synthetic_federation"]

SYNTHETIC_DESCRIPTION = "synthetic volumes (MONAI create_test_image_3d), not patient data"
_VAL_FRACTION = 0.25


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic site's volumes differ from the others'.

    Attributes:
        num_objs: spheres per volume (lesion burden).
        radius: (min, max) sphere radius as a fraction of the smallest volume side.
        noise_max: uniform background noise level, before rescaling to [0, 1].
        scale / offset: intensity transform applied after rescaling (scanner gain and bias).
    """

    num_objs: int
    radius: tuple[float, float]
    noise_max: float
    scale: float
    offset: float


# Three contrasting sites; further sites cycle through them with more noise.
_PROFILES = (
    SiteProfile(num_objs=5, radius=(0.06, 0.16), noise_max=0.05, scale=1.0, offset=0.0),
    SiteProfile(num_objs=9, radius=(0.04, 0.10), noise_max=0.20, scale=1.8, offset=0.2),
    SiteProfile(num_objs=2, radius=(0.10, 0.22), noise_max=0.35, scale=0.6, offset=0.1),
)


def site_profile(index: int) -> SiteProfile:
    """The profile of the site at 0-based ``index``."""
    base = _PROFILES[index % len(_PROFILES)]
    extra = 0.05 * (index // len(_PROFILES))
    return SiteProfile(base.num_objs, base.radius, base.noise_max + extra, base.scale, base.offset)


@dataclass(frozen=True)
class SyntheticConfig:
    """What write_synthetic_federation generates (see its docstring)."""

    sites: int = 3
    cases_per_site: tuple[int, ...] | int = (12, 8, 5)
    shape: tuple[int, int, int] = (64, 64, 64)
    seed: int = 0
    label_scheme: str = "binary"
    modalities: int = 1

    def __post_init__(self):
        if isinstance(self.sites, bool) or not isinstance(self.sites, int) or self.sites < 1:
            raise InputError("sites", self.sites, "must be a positive integer", "use e.g. sites=3")
        counts = self.counts
        if len(counts) != self.sites:
            raise InputError(
                "cases_per_site",
                self.cases_per_site,
                f"needs one count per site ({self.sites})",
                f"give {self.sites} counts, or one integer for all sites",
            )
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in counts):
            raise InputError(
                "cases_per_site",
                self.cases_per_site,
                "each site needs at least 2 cases (1 training, 1 validation)",
                "use counts >= 2",
            )
        if len(self.shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 16 for s in self.shape):
            raise InputError("shape", self.shape, "must be 3 integers, each >= 16", "use e.g. (64, 64, 64)")
        if self.label_scheme not in LABEL_SCHEMES:
            raise InputError(
                "label_scheme", self.label_scheme, f"must be one of {sorted(LABEL_SCHEMES)}", "use 'binary' or 'brats'"
            )
        if isinstance(self.modalities, bool) or not isinstance(self.modalities, int) or not 1 <= self.modalities <= 8:
            raise InputError("modalities", self.modalities, "must be an integer in 1..8", "use e.g. modalities=1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError("seed", self.seed, "must be a non-negative integer", "use e.g. seed=0")

    @property
    def counts(self) -> tuple[int, ...]:
        if isinstance(self.cases_per_site, int):
            return (self.cases_per_site,) * self.sites
        return tuple(self.cases_per_site)


def write_synthetic_federation(
    out_dir: str | os.PathLike,
    *,
    sites: int = 3,
    cases_per_site: tuple[int, ...] | int = (12, 8, 5),
    shape: tuple[int, int, int] = (64, 64, 64),
    seed: int = 0,
    label_scheme: str = "binary",
    modalities: int = 1,
) -> dict[str, Path]:
    """Write a synthetic segmentation federation as NIfTI volumes plus decathlon-style datalists.

    Layout: ``out_dir/site-N/imagesTr/site-N_caseKKK_000M.nii.gz`` (one file per modality, float32),
    ``out_dir/site-N/labelsTr/site-N_caseKKK.nii.gz`` (uint8), ``out_dir/site-N/datalist.json``
    (about 75% training, 25% validation, at least one of each) and ``out_dir/pooled.json``, the
    centralised baseline: every site's training cases and the union of their validation cases.
    Paths in the datalists are relative to their own file, so the folder can be moved. Voxels are
    1 mm isotropic. Under "brats" the masks use {0, 1, 2, 4}; extra modalities are other contrasts
    of the same spheres (different gamma and noise). Returns {"site-1": path, ..., "pooled": path}.
    """
    import nibabel as nib
    from monai.data.synthetic import create_test_image_3d

    cfg = SyntheticConfig(sites, cases_per_site, tuple(shape), seed, label_scheme, modalities)
    out = Path(out_dir)
    classes = len(LABEL_SCHEMES[cfg.label_scheme]) - 1
    header = {
        "description": SYNTHETIC_DESCRIPTION,
        "labels": LABEL_NAMES[cfg.label_scheme],
        "modalities": [f"synthetic{m}" for m in range(cfg.modalities)],
    }
    affine = np.eye(4)
    written: dict[str, Path] = {}
    pooled: dict[str, list[dict]] = {"training": [], "validation": []}
    for s, n_cases in enumerate(cfg.counts):
        site = f"site-{s + 1}"
        profile = site_profile(s)
        root = out / site
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        entries = []
        for k in range(n_cases):
            case = f"{site}_case{k:03d}"
            rs = np.random.RandomState(np.random.SeedSequence([cfg.seed, s, k]).generate_state(1)[0])
            images, label = _case_volumes(create_test_image_3d, cfg, profile, classes, rs)
            image_paths = []
            for m, image in enumerate(images):
                rel = f"imagesTr/{case}_{m:04d}.nii.gz"
                nib.save(nib.Nifti1Image(image, affine), str(root / rel))
                image_paths.append(rel)
            nib.save(nib.Nifti1Image(label, affine), str(root / f"labelsTr/{case}.nii.gz"))
            entries.append({"image": image_paths, "label": f"labelsTr/{case}.nii.gz"})
        n_val = max(1, round(n_cases * _VAL_FRACTION))
        split = {"training": entries[: n_cases - n_val], "validation": entries[n_cases - n_val :]}
        written[site] = _write_json(root / "datalist.json", {**header, **split})
        for section, cases in split.items():
            pooled[section] += [
                {"image": [f"{site}/{p}" for p in e["image"]], "label": f"{site}/{e['label']}"} for e in cases
            ]
    written["pooled"] = _write_json(out / "pooled.json", {**header, **pooled})
    return written


def _case_volumes(create, cfg: SyntheticConfig, profile: SiteProfile, classes: int, rs: np.random.RandomState):
    """One case: its modality images (float32) and its mask (uint8) on one grid."""
    side = min(cfg.shape)
    rad_min = max(1, int(profile.radius[0] * side))
    rad_max = max(rad_min + 1, int(profile.radius[1] * side))
    image, label = create(
        *cfg.shape,
        num_objs=profile.num_objs,
        rad_max=rad_max,
        rad_min=rad_min,
        noise_max=profile.noise_max,
        num_seg_classes=classes,
        random_state=rs,
    )
    if cfg.label_scheme == "brats":
        label = np.where(label == 3, 4, label)  # BraTS 2018-2020 numbering: no 3, enhancing is 4
    images = []
    for m in range(cfg.modalities):
        contrast = (
            image if m == 0 else np.clip(image, 0, 1) ** (1.0 + 0.5 * m) + rs.uniform(0, profile.noise_max, image.shape)
        )
        images.append((contrast * profile.scale + profile.offset).astype(np.float32))
    return images, label.astype(np.uint8)


def _write_json(path: Path, datalist: dict) -> Path:
    path.write_text(json.dumps(datalist, indent=1) + "\n", encoding="utf-8")
    return path
