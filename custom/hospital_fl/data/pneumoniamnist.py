"""The embedded PneumoniaMNIST dataset (real pediatric chest X-rays, CC BY 4.0).

Source: MedMNIST v2 (Yang et al., Scientific Data 10, 41, 2023) derived from
Kermany et al., Cell 172(5), 2018. See NOTICE for the full attribution.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from hospital_fl.data.hashing import file_sha256
from hospital_fl.errors import InputError

__all__ = ["CXRArrays", "EMBEDDED_SHA256", "embedded_path", "load_pneumoniamnist"]

EMBEDDED_SHA256 = "cee0767f17c653c0f425cf704dbe15e225aab48ef750443d16aef21554027e39"
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CXRArrays:
    """Images (N, H, W) uint8 and binary labels (N,) int64 for one official split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def embedded_path() -> Path:
    """Path of the dataset file shipped inside the package."""
    return Path(str(resources.files("hospital_fl.data") / "assets" / "pneumoniamnist_28.npz"))


def load_pneumoniamnist(path: str | Path | None = None) -> dict[str, CXRArrays]:
    """Load the train/val/test splits, checking integrity and shapes.

    Args:
        path: an .npz in the MedMNIST layout; the embedded copy when None.

    Returns:
        {"train" | "val" | "test": CXRArrays}.

    Raises:
        InputError: the file is missing, corrupt, or lacks the MedMNIST keys.
    """
    is_embedded = path is None
    path = embedded_path() if is_embedded else Path(path)
    if not path.is_file():
        raise InputError(
            "dataset file",
            str(path),
            "it must be an existing PneumoniaMNIST .npz",
            "pass --data PATH to a MedMNIST-layout .npz, or reinstall hospital_fl to restore the embedded copy",
        )
    if is_embedded and file_sha256(path) != EMBEDDED_SHA256:
        raise InputError(
            "dataset file",
            str(path),
            f"its sha256 must be {EMBEDDED_SHA256} (the file is corrupt or was replaced)",
            "reinstall hospital_fl (pip install --force-reinstall .) to restore the embedded copy",
        )
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(
            "dataset file",
            str(path),
            f"it must be a readable .npz archive ({exc})",
            "re-download or re-export the dataset file",
        ) from exc
    out = {}
    for split in _SPLITS:
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            raise InputError(
                "dataset file",
                str(path),
                f"it must contain the keys {split}_images and {split}_labels",
                "use an .npz in the MedMNIST layout (train/val/test _images and _labels)",
            )
        if images.dtype != np.uint8:
            raise InputError(
                f"dataset file {split}_images",
                f"dtype {images.dtype}",
                "images must be uint8 grayscale (0-255)",
                "export the images as uint8, as MedMNIST does",
            )
        labels = labels.reshape(-1).astype(np.int64)
        if images.ndim != 3 or len(images) != len(labels) or not set(np.unique(labels)) <= {0, 1}:
            raise InputError(
                f"dataset file {split} split",
                f"images {images.shape}, labels {labels.shape}",
                "images must be (N, H, W) with N binary 0/1 labels",
                "use a binary 2D dataset such as PneumoniaMNIST",
            )
        out[split] = CXRArrays(images=images, labels=labels)
    return out
