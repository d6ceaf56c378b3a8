"""Decathlon-style datalists for 3D segmentation: load them, and check every case before training.

A datalist is the JSON that MONAI's ``load_decathlon_datalist`` reads::

    {"labels": {"0": "background", "1": "tumour"},          # optional
     "modalities": ["t1c"],                                 # optional, names in channel order
     "training": [{"image": "a.nii.gz" | ["t1.nii.gz", "t2.nii.gz"], "label": "a_seg.nii.gz"}],
     "validation": [...], "test": [...]}                    # optional sections

Relative paths are relative to the datalist's folder (or a given ``base_dir``). In memory a case is
``{"image": [absolute paths], "label": absolute path, "case": id}``.

A hospital's datalist is written by hand or by an export script, so some cases are always wrong: a
missing modality, a mask on another grid, a mask from another labelling convention. Training on them
fails late (deep inside a FLARE round) or silently (a mask shifted against its image). Validation
reads every file once, lists each bad case with its reason, and keeps the good ones: a bad case is
listed, never loses the others.

One module (~550 lines): loading a datalist and checking every case against it are one
contract; most lines are the per-case checks and their error texts.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from hospital_fl.errors import InputError

__all__ = [
    "LABEL_SCHEMES",
    "LABEL_NAMES",
    "SECTIONS",
    "CaseProblem",
    "DatalistReport",
    "DatalistRules",
    "load_datalist",
    "validate_datalist",
]

# Allowed mask values. BraTS 2018-2020: 1 necrotic / non-enhancing tumour core, 2 peritumoural
# oedema, 4 GD-enhancing tumour (3 is unused in those releases).
LABEL_SCHEMES: dict[str, tuple[int, ...]] = {"binary": (0, 1), "brats": (0, 1, 2, 4)}
LABEL_NAMES: dict[str, dict[str, str]] = {
    "binary": {"0": "background", "1": "tumour"},
    "brats": {
        "0": "background",
        "1": "necrotic / non-enhancing tumour core",
        "2": "peritumoural oedema",
        "4": "GD-enhancing tumour",
    },
}
SECTIONS = ("training", "validation", "test")
# Sections whose masks supervise or score the model: an empty mask there is a problem.
_SUPERVISED = ("training", "validation")
_IMAGE_SUFFIXES = (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".npy", ".npz")
_MASK_TAG = re.compile(r"[_\-.](seg|segmentation|label|labels|mask)$", re.IGNORECASE)


@dataclass(frozen=True)
class CaseProblem:
    """Why one case of a datalist cannot be used.

    Attributes:
        section: "training", "validation" or "test".
        case: the case id.
        file: the file at fault ("" when the case as a whole is).
        reason: a short code: missing_file, unreadable, not_3d, modality_count, shape_mismatch,
            spacing_mismatch, unexpected_labels or empty_mask.
        detail: one sentence naming the value, the rule and the fix.
    """

    section: str
    case: str
    file: str
    reason: str
    detail: str


@dataclass(frozen=True)
class DatalistRules:
    """What a usable case must satisfy.

    Attributes:
        label_scheme: key of LABEL_SCHEMES the mask values must belong to.
        modalities: image channels each case must have; None takes the datalist's "modalities"
            length, and no count is checked when neither is known.
        spacing_tolerance: largest relative difference between the voxel spacings of a case's
            files (header rounding differs between exporters; a real mismatch is far larger).
        check_labels: check the mask values and that training/validation masks are not empty.
        allow_empty_masks: keep training/validation cases whose mask is empty. Off by default:
            a foreground-weighted crop sampler has no foreground to sample there, and Dice on an
            empty mask is undefined, so such a case is reported and left out.
    """

    label_scheme: str = "binary"
    modalities: int | None = None
    spacing_tolerance: float = 1e-3
    check_labels: bool = True
    allow_empty_masks: bool = False

    def __post_init__(self):
        if self.label_scheme not in LABEL_SCHEMES:
            raise InputError(
                "label_scheme", self.label_scheme, f"must be one of {sorted(LABEL_SCHEMES)}", "use 'binary' or 'brats'"
            )
        if self.modalities is not None and (
            isinstance(self.modalities, bool) or not isinstance(self.modalities, int) or self.modalities < 1
        ):
            raise InputError(
                "modalities", self.modalities, "must be a positive integer or None", "pass e.g. modalities=4"
            )
        if not (isinstance(self.spacing_tolerance, (int, float)) and 0 <= self.spacing_tolerance < 0.5):
            raise InputError(
                "spacing_tolerance",
                self.spacing_tolerance,
                "must be a relative tolerance in [0, 0.5)",
                "use e.g. 1e-3",
            )

    @property
    def allowed_labels(self) -> tuple[int, ...]:
        return LABEL_SCHEMES[self.label_scheme]


@dataclass(frozen=True)
class DatalistReport:
    """The outcome of validating one datalist.

    Attributes:
        path: the datalist file.
        usable: section -> the cases that passed every check (in-memory case dicts).
        problems: one entry per problem found; a case with any problem is not in ``usable``.
        geometry: section -> case id -> {"shape", "spacing" (mm), "channels"} of each usable case,
            as read from the headers (e.g. to pick a common target spacing).
    """

    path: str
    usable: dict[str, list[dict]]
    problems: list[CaseProblem] = field(default_factory=list)
    geometry: dict[str, dict[str, dict]] = field(default_factory=dict)

    def excluded(self, section: str) -> list[str]:
        """Ids of the cases of ``section`` left out, in order of first problem."""
        return list(dict.fromkeys(p.case for p in self.problems if p.section == section))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``json.dump`` or embedding in a site report)."""
        return {
            "path": self.path,
            "counts": {
                s: {"usable": len(cases), "excluded": len(self.excluded(s))} for s, cases in self.usable.items()
            },
            "usable": {s: [dict(c) for c in cases] for s, cases in self.usable.items()},
            "geometry": self.geometry,
            "problems": [
                {"section": p.section, "case": p.case, "file": p.file, "reason": p.reason, "detail": p.detail}
                for p in self.problems
            ],
        }

    def summary(self) -> str:
        """A few lines for a terminal: usable counts per section, then every problem."""
        counts = ", ".join(
            f"{s} {len(cases)}/{len(cases) + len(self.excluded(s))} usable"
            for s, cases in self.usable.items()
            if cases or self.excluded(s)
        )
        lines = [f"datalist {self.path}: {counts or 'no cases'}; {len(self.problems)} problem(s)"]
        lines += [f"  - {p.section}/{p.case} [{p.reason}] {p.detail}" for p in self.problems]
        return "\n".join(lines)

    def require(self, section: str = "training", minimum: int = 1) -> list[dict]:
        """The usable cases of ``section``; InputError when fewer than ``minimum`` remain."""
        cases = self.usable.get(section, [])
        if len(cases) >= minimum:
            return cases
        excluded = self.excluded(section)
        found = [f"{p.case} [{p.reason}]" for p in self.problems if p.section == section]
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise InputError(
            f"datalist {self.path} section {section!r}",
            f"{len(cases)} usable of {len(cases) + len(excluded)} listed",
            f"at least {minimum} usable case(s) are needed"
            + (f"; problems: {', '.join(found[:5])}{more}" if found else "; the section lists no cases"),
            "fix or remove those cases (the report's summary() explains each), or add cases",
        )


def load_datalist(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> dict:
    """Read a datalist and normalise its sections to in-memory cases with absolute paths.

    Returns the datalist's top-level keys as written ("labels", "modalities", "description", ...)
    with "training", "validation" and "test" always present as lists of
    ``{"image": [abs paths], "label": abs path, "case": id}``. Files are not opened here.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            "datalist", str(path), "the file does not exist", "pass the path of a decathlon-style JSON datalist"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError("datalist", str(path), f"is not valid JSON ({exc})", "fix the JSON syntax") from exc
    if not isinstance(raw, dict):
        raise InputError(
            "datalist",
            str(path),
            f"the top level is a {type(raw).__name__}, not an object",
            'write {"training": [...]}',
        )
    if "training" not in raw:
        raise InputError(
            f"datalist {path}",
            sorted(raw),
            'a "training" section is required',
            'add "training": [{"image": ..., "label": ...}, ...]',
        )
    _check_header(path, raw)
    base = Path(base_dir) if base_dir is not None else path.parent
    base = Path(os.path.abspath(base))
    out = {k: v for k, v in raw.items() if k not in SECTIONS}
    for section in SECTIONS:
        entries = raw.get(section, [])
        if not isinstance(entries, list):
            raise InputError(
                f"datalist {path} section {section!r}",
                type(entries).__name__,
                "must be a list of cases",
                f'write "{section}": [{{"image": ..., "label": ...}}, ...]',
            )
        cases, seen = [], {}
        for i, entry in enumerate(entries):
            case = _case_from_entry(path, section, i, entry, base)
            n = seen[case["case"]] = seen.get(case["case"], 0) + 1
            if n > 1:
                case["case"] = f"{case['case']}-{n}"
            cases.append(case)
        out[section] = cases
    return out


def validate_datalist(
    path: str | os.PathLike,
    *,
    label_scheme: str = "binary",
    modalities: int | None = None,
    spacing_tolerance: float = 1e-3,
    base_dir: str | os.PathLike | None = None,
    check_labels: bool = True,
    allow_empty_masks: bool = False,
) -> DatalistReport:
    """Read every file of every case and report which cases can be trained on.

    Per case: every file exists and is readable (header and voxels; a corrupt file is reported with
    the reader's message, not raised); every file is one 3D volume on the same grid (same shape,
    spacing within ``spacing_tolerance``, read from the header through MONAI's readers); the image
    channels number ``modalities`` (or the datalist's "modalities" length) when known; the mask
    values belong to ``label_scheme``; training/validation masks are not empty (see DatalistRules).
    A folder as image is read as a DICOM series (MONAI's ITKReader when itk is installed, otherwise
    its PydicomReader). A structurally broken datalist (see load_datalist) raises InputError.
    """
    datalist = load_datalist(path, base_dir)
    named = datalist.get("modalities")
    if modalities is not None and named is not None and len(named) != modalities:
        raise InputError(
            "modalities",
            modalities,
            f"the datalist {path} names {len(named)} modalities {named}",
            "pass the count the datalist names, or fix its 'modalities' list",
        )
    rules = DatalistRules(
        label_scheme=label_scheme,
        modalities=modalities if modalities is not None else (len(named) if named else None),
        spacing_tolerance=spacing_tolerance,
        check_labels=check_labels,
        allow_empty_masks=allow_empty_masks,
    )
    cache: dict[str, _Volume | str] = {}  # a file listed in several sections is read once
    usable: dict[str, list[dict]] = {}
    geometry: dict[str, dict[str, dict]] = {}
    problems: list[CaseProblem] = []
    for section in SECTIONS:
        usable[section], geometry[section] = [], {}
        for case in datalist[section]:
            found = _check_case(section, case, rules, cache)
            problems += found
            if not found:
                usable[section].append(case)
                first = cache[case["image"][0]]
                geometry[section][case["case"]] = {
                    "shape": list(first.shape),
                    "spacing": [round(s, 6) for s in first.spacing],
                    "channels": sum(cache[f].channels for f in case["image"]),
                }
    return DatalistReport(path=str(Path(os.path.abspath(path))), usable=usable, problems=problems, geometry=geometry)


# ----------------------------------------------------------------------------- datalist structure


def _check_header(path: Path, raw: dict) -> None:
    names = raw.get("modalities")
    if names is not None and not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
        raise InputError(
            f"datalist {path} 'modalities'", names, "must be a non-empty list of names", 'write e.g. ["t1c", "flair"]'
        )
    labels = raw.get("labels")
    if labels is not None and not (
        isinstance(labels, dict) and all(isinstance(k, str) and k.lstrip("-").isdigit() for k in labels)
    ):
        raise InputError(
            f"datalist {path} 'labels'",
            labels,
            "must map label values to names",
            'write {"0": "background", "1": "tumour"}',
        )


def _case_from_entry(path: Path, section: str, i: int, entry: object, base: Path) -> dict:
    where = f"datalist {path} {section}[{i}]"
    fix = 'write each case as {"image": "img.nii.gz" or ["t1.nii.gz", ...], "label": "seg.nii.gz"}'
    if not isinstance(entry, dict):
        raise InputError(where, entry, "a case must be an object with 'image' and 'label'", fix)
    missing = [k for k in ("image", "label") if k not in entry]
    if missing:
        raise InputError(where, sorted(entry), f"a case needs 'image' and 'label' (missing {missing})", fix)
    image, label = entry["image"], entry["label"]
    images = [image] if isinstance(image, str) else image
    if not (isinstance(images, list) and images and all(isinstance(p, str) and p for p in images)):
        raise InputError(f"{where} 'image'", image, "must be a path or a non-empty list of paths", fix)
    if not (isinstance(label, str) and label):
        raise InputError(f"{where} 'label'", label, "must be one path", fix)
    case_id = entry.get("case") if isinstance(entry.get("case"), str) and entry.get("case") else _case_id(label)
    return {"image": [_absolute(base, p) for p in images], "label": _absolute(base, label), "case": case_id}


def _absolute(base: Path, p: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(p)))


def _case_id(label: str) -> str:
    """The mask's file name without extension and without a trailing _seg/_label/_mask tag."""
    name = Path(label.rstrip("/\\")).name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _MASK_TAG.sub("", name) or name


# ----------------------------------------------------------------------------- per-case checks


@dataclass(frozen=True)
class _Volume:
    shape: tuple[int, ...]  # spatial
    channels: int
    spacing: tuple[float, ...]
    values: tuple[float, ...] | None  # distinct voxel values (masks only)


def _check_case(section: str, case: dict, rules: DatalistRules, cache: dict) -> list[CaseProblem]:
    cid = case["case"]

    def problem(file: str, reason: str, detail: str) -> CaseProblem:
        return CaseProblem(section, cid, file, reason, detail)

    files = [*case["image"], case["label"]]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        return [
            problem(
                f, "missing_file", f"{_role(case, f)} {f} does not exist. Fix: restore the file or correct its path"
            )
            for f in missing
        ]

    found: list[CaseProblem] = []
    volumes: dict[str, _Volume] = {}
    for f in files:
        got = _cached_read(cache, f, want_values=f == case["label"] and rules.check_labels)
        if isinstance(got, str):
            found.append(
                problem(
                    f,
                    "unreadable",
                    f"{_role(case, f)} {f} cannot be read: {got}. Fix: re-export the file "
                    "(NIfTI, NRRD or a DICOM series folder) or remove the case",
                )
            )
        else:
            volumes[f] = got
    if found:
        return found

    for f, v in volumes.items():
        is_label = f == case["label"]
        if len(v.shape) != 3 or (is_label and v.channels != 1):
            shape = (*v.shape, v.channels) if v.channels > 1 else v.shape
            found.append(
                problem(
                    f,
                    "not_3d",
                    f"{_role(case, f)} {f} has shape {shape}; "
                    + ("a mask must be one 3D volume" if is_label else "each image file must be a 3D volume")
                    + " (channels as separate files or a 4th NIfTI axis). Fix: export a 3D volume",
                )
            )
    if found:
        return found

    ref_file = case["image"][0]
    ref = volumes[ref_file]
    for f in files[1:]:
        v = volumes[f]
        if v.shape != ref.shape:
            found.append(
                problem(
                    f,
                    "shape_mismatch",
                    f"{_role(case, f)} {f} has shape {v.shape} but {Path(ref_file).name} has {ref.shape}; all files "
                    "of a case must share one voxel grid. Fix: resample it onto the first image's grid "
                    "(nearest neighbour for a mask)",
                )
            )
        elif not _close(v.spacing, ref.spacing, rules.spacing_tolerance):
            found.append(
                problem(
                    f,
                    "spacing_mismatch",
                    f"{_role(case, f)} {f} has spacing {_mm(v.spacing)} mm but {Path(ref_file).name} has "
                    f"{_mm(ref.spacing)} mm (tolerance {rules.spacing_tolerance:g} relative); all files of a case "
                    "must share one voxel grid. Fix: resample it onto the first image's grid, or correct its header",
                )
            )

    channels = sum(volumes[f].channels for f in case["image"])
    if rules.modalities is not None and channels != rules.modalities:
        found.append(
            problem(
                "",
                "modality_count",
                f"the case has {channels} image channel(s) ({len(case['image'])} file(s)) but {rules.modalities} "
                "are required. Fix: list every modality of the case, in the datalist's order",
            )
        )

    label = volumes[case["label"]]
    if rules.check_labels and label.values is not None:
        allowed = set(rules.allowed_labels)
        extra = [x for x in label.values if x not in allowed]
        if extra:
            found.append(
                problem(
                    case["label"],
                    "unexpected_labels",
                    f"mask values {_values(label.values)} include {_values(extra)}; the {rules.label_scheme!r} scheme "
                    f"allows {_values(sorted(allowed))}. Fix: {_label_fix(rules.label_scheme, extra)}",
                )
            )
        elif section in _SUPERVISED and not rules.allow_empty_masks and not any(x != 0 for x in label.values):
            found.append(
                problem(
                    case["label"],
                    "empty_mask",
                    f"mask {case['label']} has no foreground voxel; {section} cases need a tumour to sample "
                    "and score. Fix: check the export, move the case to 'test', or pass allow_empty_masks=True",
                )
            )
    return found


def _role(case: dict, f: str) -> str:
    if f == case["label"]:
        return "label"
    return f"image {case['image'].index(f) + 1}/{len(case['image'])}"


def _close(a: tuple[float, ...], b: tuple[float, ...], tol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(abs(x), abs(y)) for x, y in zip(a, b))


def _mm(spacing: tuple[float, ...]) -> str:
    return "x".join(f"{s:.4g}" for s in spacing)


def _values(values) -> str:
    return "{" + ", ".join(f"{int(v)}" if float(v).is_integer() else f"{v:g}" for v in values) + "}"


def _label_fix(scheme: str, extra) -> str:
    if scheme == "binary":
        return "merge the tumour classes into 1 (e.g. label > 0), or validate with label_scheme='brats'"
    if 3 in extra:
        return (
            "these masks number classes 1-3 (BraTS 2023 / Decathlon convention); relabel them to the "
            "BraTS 2018-2020 values {1, 2, 4} or binarise them and use label_scheme='binary'"
        )
    return "relabel the mask to the scheme's values"


# ----------------------------------------------------------------------------- reading


@lru_cache(maxsize=1)
def _loader():
    """MONAI's LoadImage with its default readers, picked by suffix (a folder is a DICOM series)."""
    from monai.transforms import LoadImage

    with warnings.catch_warnings():  # readers whose optional GPU codecs are absent warn at construction
        warnings.simplefilter("ignore")
        return LoadImage(image_only=False, dtype=None)


def _cached_read(cache: dict, path: str, *, want_values: bool) -> _Volume | str:
    got = cache.get(path)
    if got is None or (want_values and isinstance(got, _Volume) and got.values is None):
        got = cache[path] = _read(path, want_values=want_values)
    return got


def _read(path: str, *, want_values: bool) -> _Volume | str:
    """Header and voxels of one file, or the reader's error message."""
    try:
        img, meta = _loader()(path)
        data = np.asarray(img)
        channel_dim = meta.get("original_channel_dim")
        if isinstance(channel_dim, (int, np.integer)) and not isinstance(channel_dim, bool) and data.ndim > 1:
            channels = int(data.shape[channel_dim])
            shape = tuple(int(s) for i, s in enumerate(data.shape) if i != channel_dim % data.ndim)
        else:
            channels, shape = 1, tuple(int(s) for s in data.shape)
        affine = np.asarray(meta["affine"], dtype=float)
        rank = affine.shape[0] - 1
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:rank, :rank], axis=0))
        values = tuple(float(v) for v in np.unique(data)) if want_values else None
        if values is not None and any(np.isnan(values)):
            return "the mask contains NaN"
        return _Volume(shape=shape, channels=channels, spacing=spacing, values=values)
    except Exception as exc:  # any reader failure (corrupt, truncated, unknown format) is a finding
        message = " ".join(str(exc).split())
        return f"{type(exc).__name__}: {message[:300]}"
