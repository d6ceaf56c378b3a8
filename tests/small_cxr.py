"""A small MedMNIST-layout .npz cut from the embedded chest X-rays, for federated runs that
must finish in seconds (each site trains on ~200 images instead of ~2,500)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hospital_fl.data.pneumoniamnist import embedded_path

SIZES = {"train": 500, "val": 100, "test": 100}


def write_small_cxr(path: Path, seed: int = 0) -> Path:
    """A random subset of the embedded dataset (``SIZES`` images per split) at ``path``."""
    rng = np.random.default_rng(seed)
    arrays = {}
    with np.load(embedded_path()) as full:
        for split, n in SIZES.items():
            idx = rng.choice(len(full[f"{split}_labels"]), n, replace=False)
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = (
                full[f"{split}_images"][idx],
                full[f"{split}_labels"][idx],
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path
