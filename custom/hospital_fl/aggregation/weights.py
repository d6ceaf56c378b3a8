"""Bounded aggregation weights: a site's claimed sample count never buys more than it is allowed.

FedAvg weights a site's update by the number of training images it *claims*. A site that
lies (claims 100x its images) would otherwise outweigh every honest hospital together.
Each claim is therefore bounded before it becomes a weight:

- by the image count the consortium declared for that hospital (site_configs, carried in
  the server's kit) when there is one: weight = min(claim, declared);
- otherwise by ``cap_factor`` (k) times the median claim of the round:
  weight = min(claim, k x median). One liar moves the median of five claims by at most one
  rank, so its weight stays within k times a typical honest site's.

k = 3 is the default: the smallest whole k at which the demo's honest, Dirichlet(0.5)-
skewed hospitals (up to 9.7x the median) lose at most 0.005 AUC in every seed measured;
k = 2 cost 0.0066 on one seed (docs/security/bounded-weights.md has the figures). Every
bound that bites is returned as a clip (site index, claimed, allowed, basis) so the server
can record it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hospital_fl.errors import InputError

__all__ = ["DEFAULT_CAP_FACTOR", "DECLARED_IMAGES_FILE", "WeightClip", "bounded_weights", "check_declared_counts"]

DEFAULT_CAP_FACTOR = 3.0
# In a kit's local/ folder: {site: image count the consortium declared for it} (the server's
# kit: every hospital that declared one; a hospital's kit: its own).
DECLARED_IMAGES_FILE = "hospital_fl_declared_images.json"


@dataclass(frozen=True)
class WeightClip:
    """One claim that was bounded: ``index`` into the round's claims."""

    index: int
    claimed: float
    allowed: float
    basis: str  # "declared" (the consortium's count) or "median" (k x the round's median claim)

    def as_dict(self) -> dict:
        return {"claimed": self.claimed, "allowed": self.allowed, "basis": self.basis}


def bounded_weights(
    claims: Sequence[float],
    declared: Sequence[float | None] | None = None,
    cap_factor: float | None = DEFAULT_CAP_FACTOR,
) -> tuple[list[float], list[WeightClip]]:
    """The weight each claim is allowed, and the clips that bit.

    Args:
        claims: each site's claimed training samples (positive numbers; validate first).
        declared: per site, the image count the consortium declared for it, or None where
            none was declared (None for the whole argument: none at all).
        cap_factor: k in min(claim, k x median claim) for sites without a declared count;
            None leaves those claims unbounded (the unbounded FedAvg weights).

    Returns:
        (weights, clips): one weight per claim, and a WeightClip for each bounded claim.
    """
    claims = [float(c) for c in claims]
    declared = list(declared) if declared is not None else [None] * len(claims)
    if len(declared) != len(claims):
        raise ValueError(f"need one declared count per claim, got {len(declared)} for {len(claims)} claims")
    if cap_factor is not None and not cap_factor >= 1:
        raise InputError("aggregation.claim_cap", cap_factor, "it must be >= 1 or None", "use 3")
    weights, clips = [], []
    # Declared counts first, so a declared site's bounded claim (not its lie) enters the median.
    first = [c if d is None else min(c, float(d)) for c, d in zip(claims, declared)]
    cap = cap_factor * float(np.median(first)) if (cap_factor is not None and first) else None
    for i, (claim, bound, d) in enumerate(zip(claims, first, declared)):
        allowed, basis = bound, "declared"
        if d is None and cap is not None and claim > cap:
            allowed, basis = cap, "median"
        if allowed < claim:
            clips.append(WeightClip(i, claim, allowed, basis))
        weights.append(allowed)
    return weights, clips


def check_declared_counts(counts: object, source: str) -> dict[str, int]:
    """A {site: declared image count} mapping read from ``source``, checked."""
    if not isinstance(counts, dict):
        raise InputError(source, type(counts).__name__, "it must map site names to image counts", "provision again")
    for site, n in counts.items():
        if not isinstance(site, str) or isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InputError(
                f"{source}: {site}",
                n,
                "a declared image count must be a positive integer",
                "set declared_images in the hospital's site_configs file and provision again",
            )
    return dict(counts)
