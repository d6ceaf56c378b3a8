"""Deterministic, label-skewed split of a pooled dataset into hospitals.

Each hospital receives a Dirichlet(alpha) share of every class, so both its size and its
pneumonia prevalence differ from the others (the non-IID setting real consortia see).
Every hospital then splits its own data into train / validation / local test portions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hospital_fl.errors import InputError

__all__ = ["SplitConfig", "SitePortions", "dirichlet_site_split", "site_names"]


@dataclass(frozen=True)
class SplitConfig:
    """How the pooled data is divided into hospitals.

    Attributes:
        num_sites: number of hospitals (>= 2).
        alpha: Dirichlet concentration; smaller = stronger label skew (> 0).
        seed: makes the split reproducible.
        val_fraction / test_fraction: each site's validation and local test shares.
        min_per_class: every portion of every site holds at least this many of each class,
            so each site can compute a local AUC.
    """

    num_sites: int = 5
    alpha: float = 0.5
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    min_per_class: int = 3

    def __post_init__(self):
        if self.num_sites < 2:
            raise InputError(
                "num_sites", self.num_sites, "a federation needs at least 2 sites", "use --sites 2 or more"
            )
        if not self.alpha > 0:
            raise InputError("alpha", self.alpha, "the Dirichlet alpha must be > 0", "use e.g. --alpha 0.5")
        if not (0 < self.val_fraction < 0.5 and 0 < self.test_fraction < 0.5):
            raise InputError(
                "val_fraction/test_fraction",
                (self.val_fraction, self.test_fraction),
                "each must lie in (0, 0.5)",
                "use e.g. 0.1 and 0.2",
            )


@dataclass(frozen=True)
class SitePortions:
    """Indices into the pooled arrays for one hospital."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def site_names(num_sites: int) -> list[str]:
    """Canonical hospital names: site-1 ... site-N (FLARE client names)."""
    return [f"site-{i + 1}" for i in range(num_sites)]


def _class_shares(labels: np.ndarray, cfg: SplitConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Assign every pooled index to a site with Dirichlet class proportions."""
    per_site: list[list[np.ndarray]] = [[] for _ in range(cfg.num_sites)]
    floor = cfg.min_per_class * 6  # room for min_per_class in each of the three portions, with margin
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        spare = len(idx) - floor * cfg.num_sites
        if spare < 0:
            raise InputError(
                f"class {cls}",
                f"{len(idx)} images",
                f"at least {floor * cfg.num_sites} are needed for "
                f"{cfg.num_sites} sites with min_per_class={cfg.min_per_class}",
                "use fewer sites",
            )
        shares = rng.dirichlet(np.full(cfg.num_sites, cfg.alpha))
        counts = floor + np.floor(shares * spare).astype(int)
        counts[np.argmax(shares)] += len(idx) - counts.sum()
        for site, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            per_site[site].append(chunk)
    return [np.concatenate(chunks) for chunks in per_site]


def _stratified_portions(idx: np.ndarray, labels: np.ndarray, cfg: SplitConfig, rng) -> tuple[np.ndarray, ...]:
    train, val, test = [], [], []
    for cls in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == cls])
        n_val = max(cfg.min_per_class, round(len(members) * cfg.val_fraction))
        n_test = max(cfg.min_per_class, round(len(members) * cfg.test_fraction))
        val.append(members[:n_val])
        test.append(members[n_val : n_val + n_test])
        train.append(members[n_val + n_test :])
    return tuple(np.sort(np.concatenate(p)) for p in (train, val, test))


def dirichlet_site_split(labels: np.ndarray, cfg: SplitConfig = SplitConfig()) -> list[SitePortions]:
    """Split pooled labels into ``cfg.num_sites`` hospitals with label skew.

    Args:
        labels: (N,) integer class labels of the pooled (train + val) data.
        cfg: split settings.

    Returns:
        One SitePortions per hospital, in site-name order; portions are disjoint and
        together cover every index exactly once.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(cfg.seed)
    names = site_names(cfg.num_sites)
    return [
        SitePortions(name, *_stratified_portions(idx, labels, cfg, rng))
        for name, idx in zip(names, _class_shares(labels, cfg, rng))
    ]
