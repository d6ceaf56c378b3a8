"""The federated view of a dataset: which images each hospital holds, plus the held-out test.

Official train + val are pooled and divided among hospitals; the official test split is
never given to any hospital and serves as the global held-out evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from hospital_fl.data.pneumoniamnist import CXRArrays, load_pneumoniamnist
from hospital_fl.data.splits import SitePortions, SplitConfig, dirichlet_site_split
from hospital_fl.errors import InputError

__all__ = ["SiteData", "FederatedDataset", "load_federated"]


@dataclass(frozen=True)
class SiteData:
    """One hospital's train / validation / local test arrays."""

    name: str
    train: CXRArrays
    val: CXRArrays
    test: CXRArrays

    @property
    def positive_fraction(self) -> float:
        return float(self.train.labels.mean())


@dataclass(frozen=True)
class FederatedDataset:
    sites: tuple[SiteData, ...]
    held_out_test: CXRArrays
    split: SplitConfig

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def site(self, name: str) -> SiteData:
        for s in self.sites:
            if s.name == name:
                return s
        raise InputError(
            "site name",
            name,
            f"it must be one of {self.site_names}",
            "use a FLARE client name that matches the split (site-1 ... site-N) or change --sites",
        )

    def pooled(self, portion: str) -> CXRArrays:
        """All hospitals' ``portion`` ("train" | "val" | "test") together (centralized baseline)."""
        parts = [getattr(s, portion) for s in self.sites]
        return CXRArrays(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def _take(arrays: CXRArrays, idx: np.ndarray) -> CXRArrays:
    return CXRArrays(arrays.images[idx], arrays.labels[idx])


@lru_cache(maxsize=4)
def _load_cached(path: str | None) -> dict[str, CXRArrays]:
    return load_pneumoniamnist(path)


def load_federated(split: SplitConfig = SplitConfig(), data_path: str | Path | None = None) -> FederatedDataset:
    """Load the dataset and divide it into hospitals, deterministically from ``split``."""
    raw = _load_cached(None if data_path is None else str(data_path))
    pool = CXRArrays(
        np.concatenate([raw["train"].images, raw["val"].images]),
        np.concatenate([raw["train"].labels, raw["val"].labels]),
    )
    portions: list[SitePortions] = dirichlet_site_split(pool.labels, split)
    sites = tuple(SiteData(p.name, _take(pool, p.train), _take(pool, p.val), _take(pool, p.test)) for p in portions)
    return FederatedDataset(sites=sites, held_out_test=raw["test"], split=split)
