"""Faulty or malicious site behaviour for the robustness benchmark (pure numpy).

Model-poisoning attacks rewrite the update a site sends (a weight difference); the
data-poisoning attack trains on flipped labels. Used only by benchmarks and tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hospital_fl.data.federated import SiteData
from hospital_fl.errors import InputError

__all__ = ["ATTACKS", "Attack", "poison_update", "poison_site", "claimed_samples"]

ATTACKS = ("scale", "sign_flip", "random", "label_flip", "inflate")


@dataclass(frozen=True)
class Attack:
    """One attacking site.

    Attributes:
        kind: scale (update x ``factor``), sign_flip (the update negated), random (i.i.d.
            N(0, ``noise_std``) values of the update's shapes), label_flip (trains on 1 - y)
            or inflate (the update negated, an ordinary norm, while the site claims
            ``claim_factor`` x its training images, so FedAvg would weight it that much).
        site_index: which site attacks.
        factor: the scale attack's multiplier.
        noise_std: the random attack's standard deviation.
        claim_factor: the inflate attack's multiplier of the claimed sample count.
    """

    kind: str
    site_index: int = 0
    factor: float = 50.0
    noise_std: float = 1.0
    claim_factor: int = 100

    def __post_init__(self):
        if self.kind not in ATTACKS:
            raise InputError("attack", self.kind, f"it must be one of {ATTACKS}", "use e.g. scale")


def poison_update(attack: Attack, update: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The update the attacker sends instead of its honest ``update``."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in update.items():
        v = np.asarray(v)
        if v.dtype.kind != "f" or attack.kind == "label_flip":
            out[k] = v
        elif attack.kind == "scale":
            out[k] = (v * attack.factor).astype(v.dtype)
        elif attack.kind in ("sign_flip", "inflate"):
            out[k] = -v
        else:
            out[k] = rng.normal(0.0, attack.noise_std, v.shape).astype(v.dtype)
    return out


def claimed_samples(attack: Attack | None, site_index: int, n_samples: int) -> int:
    """The training sample count site ``site_index`` claims (inflated by the inflate attack)."""
    if attack is not None and attack.kind == "inflate" and site_index == attack.site_index:
        return int(n_samples) * int(attack.claim_factor)
    return int(n_samples)


def poison_site(attack: Attack, site: SiteData) -> SiteData:
    """The data the attacker trains on (labels flipped for label_flip, else unchanged)."""
    if attack.kind != "label_flip":
        return site
    flipped = dataclasses.replace(site.train, labels=(1 - site.train.labels).astype(site.train.labels.dtype))
    return dataclasses.replace(site, train=flipped)
