"""The aggregation rules by name: how screened updates become one update.

Each rule is a function (config, updates, weights) -> (combined, info) with the number of
updates it needs; ``RULES`` is the registry's names, in the order ``--help`` lists them.
Adding a rule is one entry here (and its maths in robust.py or weighted.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hospital_fl.aggregation.robust import coordinate_median, multi_krum, norm_bounded_mean, trimmed_mean
from hospital_fl.aggregation.weighted import weighted_mean

if TYPE_CHECKING:  # the config names a rule; the rule reads its settings from the config
    from hospital_fl.aggregation.strategy import AggregationConfig

__all__ = ["Rule", "RULE_REGISTRY", "RULES"]

Updates = Sequence[Mapping[str, np.ndarray]]
Combined = tuple[dict[str, np.ndarray], dict]


@dataclass(frozen=True)
class Rule:
    """combine(cfg, updates, bounded weights) -> (update, info); min_updates(cfg) -> how many it needs."""

    combine: Callable[["AggregationConfig", Updates, Sequence[float]], Combined]
    min_updates: Callable[["AggregationConfig"], int]
    describe: str


def _fedavg(cfg, updates, weights) -> Combined:
    return weighted_mean(updates, weights), {}


def _trimmed_mean(cfg, updates, weights) -> Combined:
    return trimmed_mean(updates, cfg.trim), {}


def _median(cfg, updates, weights) -> Combined:
    return coordinate_median(updates), {}


def _norm_bounded(cfg, updates, weights) -> Combined:
    combined, bound = norm_bounded_mean(updates, weights, cfg.norm_bound)
    return combined, {"norm_bound": bound}


def _krum(select_all: bool):
    def combine(cfg, updates, weights) -> Combined:
        select = (cfg.select or len(updates) - cfg.byzantine) if select_all else 1
        combined, picked = multi_krum(updates, weights, cfg.byzantine, select)
        return combined, {"selected": list(picked)}  # indices into ``updates``

    return combine


def _one(cfg) -> int:
    return 1


def _krum_needs(cfg) -> int:
    return max(2 * cfg.byzantine + 3, cfg.select or 1)


RULE_REGISTRY: dict[str, Rule] = {
    "fedavg": Rule(_fedavg, _one, "sample-weighted mean (bounded claims)"),
    "trimmed_mean": Rule(_trimmed_mean, lambda cfg: 2 * cfg.trim + 1, "coordinate-wise mean without trim per side"),
    "median": Rule(_median, _one, "coordinate-wise median"),
    "norm_bounded": Rule(_norm_bounded, _one, "weighted mean of updates scaled to a norm bound"),
    "krum": Rule(_krum(select_all=False), _krum_needs, "the update closest to its neighbours (Krum)"),
    "multi_krum": Rule(_krum(select_all=True), _krum_needs, "weighted mean of the Krum-selected updates"),
}
RULES = tuple(RULE_REGISTRY)
