"""The embedded real sample: two contrast-enhanced T1 brain MRIs with expert tumour masks.

The volumes come from the pyradiomics project's test data (BSD-3-Clause; see
``hospital_fl/data/assets/brain_mri/NOTICE.md``), cropped to the head in-plane and to the tumour's
slices plus 3 on each side, so the package stays small (1.6 MB). Two patients are enough for a
real-data smoke test of the segmentation pipeline (read, preprocess, train a few steps, infer,
score), not to show that a model learns.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np

from hospital_fl.errors import InputError

__all__ = ["SAMPLE_CASES", "crop_to_brain", "sample_cases", "sample_dir", "write_sample_datalists"]

SAMPLE_CASES = ("brain1", "brain2")
_DESCRIPTION = (
    "real contrast-enhanced T1 brain MRI with a tumour mask (pyradiomics test data, BSD-3-Clause, cropped "
    "around the head and the tumour's slices); with only two patients in the sample, this site's single case "
    "serves for both training and validation: a smoke test of the pipeline, not a measure of accuracy"
)


def sample_dir() -> Path:
    """Folder of the shipped NRRD files inside the installed package."""
    return Path(str(resources.files("hospital_fl.data") / "assets" / "brain_mri"))


def sample_cases() -> list[dict]:
    """The two real cases as in-memory datalist cases (absolute paths inside the package)."""
    root = sample_dir()
    cases = [
        {"image": [str(root / f"{name}_image.nrrd")], "label": str(root / f"{name}_label.nrrd"), "case": name}
        for name in SAMPLE_CASES
    ]
    for case in cases:
        for f in (*case["image"], case["label"]):
            if not os.path.isfile(f):
                raise InputError(
                    "embedded brain MRI sample", f, "the file is missing from the package", "reinstall hospital_fl"
                )
    return cases


def write_sample_datalists(
    out_dir: str | os.PathLike, sites: tuple[str, ...] | list[str] = ("site-1", "site-2")
) -> dict[str, Path]:
    """One datalist per site over the embedded sample: site-1 holds brain1, site-2 brain2.

    With only two real patients, each site lists its one case under both "training" and
    "validation" (its "description" says so): validation then measures fit, not generalisation.
    Paths are absolute, pointing into the installed package. Returns {site: datalist path},
    written as ``out_dir/<site>/datalist.json``.
    """
    sites = tuple(sites)
    if not 1 <= len(sites) <= len(SAMPLE_CASES) or len(set(sites)) != len(sites):
        raise InputError(
            "sites",
            sites,
            f"the sample has {len(SAMPLE_CASES)} patients: give 1 or 2 distinct site names",
            "use ('site-1', 'site-2')",
        )
    for site in sites:
        if not isinstance(site, str) or not site or any(c in site for c in "/\\") or site in (".", ".."):
            raise InputError("site", site, "must be a plain folder name", "use names like 'site-1'")
    out = {}
    for site, case in zip(sites, sample_cases()):
        entry = {"image": case["image"], "label": case["label"]}
        datalist = {
            "description": _DESCRIPTION,
            "labels": {"0": "background", "1": "tumour"},
            "modalities": ["t1c"],
            "training": [entry],
            "validation": [entry],
        }
        path = Path(out_dir) / site / "datalist.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(datalist, indent=1) + "\n", encoding="utf-8")
        out[site] = path
    return out


def crop_to_brain(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    margin: int = 4,
    *,
    z_margin: int | None = None,
) -> tuple[Path, Path]:
    """Crop an NRRD image and its mask in-plane to the head's bounding box, plus ``margin`` voxels.

    The head is where the intensity exceeds an Otsu threshold; rows and columns where under 5% of
    the voxels do are dropped, so thin ghosting artefacts do not widen the box. The box always holds
    the whole mask. ``z_margin=None`` keeps every slice; an integer keeps the slices holding the mask
    plus ``z_margin`` on each side (the head usually fills the in-plane field of view, so only this
    makes a volume much smaller). Both volumes are cut by the same integer slices (no resampling, so
    mask values are untouched) and the origin is moved so every voxel keeps its position in patient
    space; spacing and direction are unchanged. Writes gzip NRRD files with the input names into
    ``out_dir`` and returns their paths. Needs pynrrd.
    """
    import nrrd

    if not isinstance(margin, int) or margin < 0:
        raise InputError("margin", margin, "must be a non-negative number of voxels", "use e.g. 4")
    if z_margin is not None and (not isinstance(z_margin, int) or z_margin < 0):
        raise InputError("z_margin", z_margin, "must be None or a non-negative number of slices", "use e.g. 3")
    image, image_header = nrrd.read(str(image_path))
    label, label_header = nrrd.read(str(label_path))
    if image.ndim != 3 or image.shape != label.shape:
        raise InputError(
            "label",
            (image.shape, label.shape),
            "image and mask must be 3D volumes of one shape",
            "pass a matching pair",
        )
    head = image > _otsu_threshold(image)
    box = []
    for axis in (0, 1):
        other = tuple(a for a in range(3) if a != axis)
        inside = np.flatnonzero(head.mean(axis=other) > 0.05)
        tumour = np.flatnonzero(label.any(axis=other))
        lo = min(inside[0] if inside.size else 0, tumour[0] if tumour.size else image.shape[axis])
        hi = max(inside[-1] if inside.size else image.shape[axis] - 1, tumour[-1] if tumour.size else 0)
        box.append((max(int(lo) - margin, 0), min(int(hi) + margin + 1, image.shape[axis])))
    (x0, x1), (y0, y1) = box
    z0, z1 = 0, image.shape[2]
    slices = np.flatnonzero(label.any(axis=(0, 1)))
    if z_margin is not None and slices.size:
        z0, z1 = max(int(slices[0]) - z_margin, 0), min(int(slices[-1]) + z_margin + 1, image.shape[2])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for data, header, src in ((image, image_header, image_path), (label, label_header, label_path)):
        header = {k: v for k, v in header.items() if k != "sizes"}
        directions = np.asarray(header["space directions"], dtype=float)
        header["space origin"] = np.asarray(header["space origin"], dtype=float) + directions.T @ np.array(
            [x0, y0, z0], dtype=float
        )
        header["encoding"] = "gzip"
        dst = out / Path(src).name
        nrrd.write(str(dst), data[x0:x1, y0:y1, z0:z1], header, compression_level=9)
        written.append(dst)
    return written[0], written[1]


def _otsu_threshold(volume: np.ndarray) -> float:
    """The intensity that best separates two classes (background and head) by between-class variance."""
    hist, edges = np.histogram(volume, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / w0[-1] - m0) ** 2 / (w0 * w1)
    return float(centres[np.nanargmax(between)])
