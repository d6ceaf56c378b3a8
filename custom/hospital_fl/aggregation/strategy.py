"""The server's aggregation rule as typed config, and one round's aggregation as pure functions.

``screen_round`` is the one screening path every server mode runs (the FLARE aggregator
with a rule or with central DP, SCAFFOLD's control changes, the in-process federation):
validate each update, drop norm outliers, drop updates that point against the round's
median update (the direction screen), and bound each site's weight. ``combine_round``
then applies the configured rule from the registry (hospital_fl.aggregation.rules);
``aggregate_round`` is the two together. Nothing here raises on a site's bad update; it
reports it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hospital_fl.aggregation.direction import DEFAULT_MIN_COSINE, direction_outliers, update_cosines
from hospital_fl.aggregation.rules import RULE_REGISTRY, RULES
from hospital_fl.aggregation.validation import norm_outliers, update_norm, update_problem
from hospital_fl.aggregation.weights import DEFAULT_CAP_FACTOR, bounded_weights
from hospital_fl.errors import InputError

__all__ = [
    "RULES",
    "AggregationConfig",
    "RoundAggregation",
    "Screening",
    "aggregate_round",
    "combine_round",
    "screen_round",
]


@dataclass(frozen=True)
class AggregationConfig:
    """How the server combines the round's updates.

    Attributes:
        rule: fedavg (sample-weighted mean), trimmed_mean, median (coordinate-wise),
            norm_bounded (weighted mean of updates scaled to at most the median or
            ``norm_bound`` norm), krum or multi_krum (Blanchard et al. 2017).
        trim: values dropped per side and coordinate by trimmed_mean.
        byzantine: faulty sites Krum tolerates (needs n >= 2 * byzantine + 3 updates).
        select: updates multi_krum averages (None: n - byzantine).
        norm_bound: fixed L2 bound for norm_bounded (None: the round's median norm).
        outlier_factor: reject an update whose norm exceeds this multiple of the round's
            median norm before any rule runs (None: no norm check).
        claim_cap: k: a site without a declared image count weighs at most k x the
            round's median claimed count (hospital_fl.aggregation.weights); None leaves
            such claims unbounded. A declared count always bounds its site's weight.
        min_cosine: reject an update whose cosine similarity with the round's
            coordinate-wise median update is below this, after the norm screen (None: no
            direction check); needs 3 updates, never rejects a majority and never leaves
            fewer updates than the rule needs (hospital_fl.aggregation.direction). Catches
            a negated update of ordinary norm.
    """

    rule: str = "fedavg"
    trim: int = 1
    byzantine: int = 1
    select: int | None = None
    norm_bound: float | None = None
    outlier_factor: float | None = 10.0
    claim_cap: float | None = DEFAULT_CAP_FACTOR
    min_cosine: float | None = DEFAULT_MIN_COSINE

    def __post_init__(self):
        checks = [
            ("rule", self.rule in RULES, f"it must be one of {RULES}", "use e.g. --aggregator trimmed_mean"),
            ("trim", isinstance(self.trim, int) and self.trim >= 0, "it must be an integer >= 0", "use 1"),
            (
                "byzantine",
                isinstance(self.byzantine, int) and self.byzantine >= 0,
                "it must be an integer >= 0",
                "use 1",
            ),
            ("select", self.select is None or self.select >= 1, "it must be >= 1 or None", "leave it unset"),
            ("norm_bound", self.norm_bound is None or self.norm_bound > 0, "it must be > 0 or None", "leave it unset"),
            (
                "outlier_factor",
                self.outlier_factor is None or self.outlier_factor > 1,
                "it must be > 1 or None",
                "use 10, or None to switch the norm check off",
            ),
            (
                "claim_cap",
                self.claim_cap is None or (isinstance(self.claim_cap, (int, float)) and self.claim_cap >= 1),
                "it must be >= 1 (a multiple of the round's median claimed count)",
                f"use {DEFAULT_CAP_FACTOR:g}",
            ),
            (
                "min_cosine",
                self.min_cosine is None
                or (
                    isinstance(self.min_cosine, (int, float))
                    and not isinstance(self.min_cosine, bool)
                    and -1 <= self.min_cosine < 1
                ),
                "it must lie in [-1, 1) (a cosine similarity with the round's median update) or be None",
                f"use {DEFAULT_MIN_COSINE:g}, or None to switch the direction check off",
            ),
        ]
        for name, ok, rule, fix in checks:
            if not ok:
                raise InputError(f"aggregation.{name}", getattr(self, name), rule, fix)

    def min_updates(self) -> int:
        """Accepted updates a round needs for this rule to be defined."""
        return RULE_REGISTRY[self.rule].min_updates(self)

    def without_relative_screens(self) -> "AggregationConfig":
        """The same rule with the screens that compare a site with the round's others off
        (norm and direction): for central DP, where one site's presence must not decide
        whether another's update counts (that would multiply the sum's sensitivity)."""
        return dataclasses.replace(self, outlier_factor=None, min_cosine=None)

    def check_sites(self, num_sites: int, name: str = "min_clients") -> None:
        """Raise when even ``num_sites`` answering sites cannot satisfy the rule."""
        need = self.min_updates()
        if num_sites < need:
            what = (
                f"trimming {self.trim} per side"
                if self.rule == "trimmed_mean"
                else f"{self.rule} tolerating {self.byzantine} faulty site(s)"
            )
            raise InputError(
                name,
                num_sites,
                f"{what} needs at least {need} sites per round",
                f"lower aggregation.{'trim' if self.rule == 'trimmed_mean' else 'byzantine'}, or add sites",
            )


@dataclass(frozen=True)
class RoundAggregation:
    """One round's outcome: the combined update (None: keep the global model) and why."""

    update: dict[str, np.ndarray] | None
    accepted: list[int]
    rejected: dict[int, str]
    norms: list[float]
    info: dict = field(default_factory=dict)
    weights: list[float] = field(default_factory=list)  # per update: its bounded weight (nan: invalid)
    cosines: list[float] = field(default_factory=list)  # per update: cosine with the median update (nan: unscreened)


@dataclass(frozen=True)
class Screening:
    """One round's screen: which updates count, why the others do not, and each one's weight.

    Lists are per update, in the order given (nan: not computed for that update)."""

    accepted: list[int]
    rejected: dict[int, str]
    norms: list[float]
    cosines: list[float]
    weights: list[float]
    weight_clips: list[dict]  # {"index", "claimed", "allowed", "basis"} per bounded claim


def screen_round(
    cfg: AggregationConfig,
    updates: Sequence[Mapping[str, np.ndarray]],
    n_samples: Sequence[object],
    reference: Mapping[str, np.ndarray] | None = None,
    declared: Sequence[int | None] | None = None,
) -> Screening:
    """Validate and screen one round's weight differences, and bound each site's weight.

    Args:
        cfg: the screens' settings (outlier_factor, min_cosine, claim_cap) and the rule
            (the direction screen never leaves fewer updates than it needs).
        updates: each site's difference to the global model.
        n_samples: each site's claimed training samples (the FedAvg weight).
        reference: the global model (names, shapes, dtypes every update must match); None
            checks every update against the layout most updates share, so one site sending
            odd names or shapes cannot get the others rejected by arriving first.
        declared: per update, the image count the consortium declared for its site (None:
            none declared); bounds the site's weight (hospital_fl.aggregation.weights).

    The direction screen runs on the updates that passed the norm screen.
    """
    rejected: dict[int, str] = {}
    ref = reference if reference is not None else _majority_layout(updates)
    for i, (u, n) in enumerate(zip(updates, n_samples)):
        problem = update_problem(u, n, ref)
        if problem:
            rejected[i] = problem
    valid = [i for i in range(len(updates)) if i not in rejected]
    norms = [update_norm(updates[i]) for i in valid]
    if cfg.outlier_factor is not None:
        median = float(np.median(norms)) if norms else 0.0
        for j in norm_outliers(norms, cfg.outlier_factor):
            rejected[valid[j]] = (
                f"its norm {norms[j]:.4g} exceeds {cfg.outlier_factor:g} x the round's median update norm {median:.4g}"
            )
    accepted = [i for i in valid if i not in rejected]
    all_cosines = [float("nan")] * len(updates)
    if cfg.min_cosine is not None and len(accepted) >= 3:
        cosines = update_cosines([updates[i] for i in accepted])
        for i, c in zip(accepted, cosines):
            all_cosines[i] = c
        flagged = direction_outliers(cosines, cfg.min_cosine)
        # Never starve the rule: Krum on 5 sites needs all 5 and weeds the outlier out itself.
        if len(accepted) - len(flagged) < cfg.min_updates():
            flagged = []
        for j in flagged:
            rejected[accepted[j]] = (
                f"its direction's cosine similarity {cosines[j]:.3f} with the round's median update is below "
                f"the floor {cfg.min_cosine:g} (it points against the other sites' updates)"
            )
        accepted = [i for i in accepted if i not in rejected]
    norm_of = dict(zip(valid, norms))
    bounded, clips = bounded_weights(
        [n_samples[i] for i in valid],
        [declared[i] for i in valid] if declared is not None else None,
        cfg.claim_cap,
    )
    weight_of = dict(zip(valid, bounded))
    return Screening(
        accepted=accepted,
        rejected=rejected,
        norms=[norm_of.get(i, float("nan")) for i in range(len(updates))],
        cosines=all_cosines,
        weights=[weight_of.get(i, float("nan")) for i in range(len(updates))],
        weight_clips=[{"index": valid[c.index], **c.as_dict()} for c in clips],
    )


def combine_round(
    cfg: AggregationConfig, updates: Sequence[Mapping[str, np.ndarray]], screening: Screening
) -> RoundAggregation:
    """The screened updates combined with the configured rule (None when too few remain)."""
    accepted = screening.accepted
    clip_info = {"weight_clips": screening.weight_clips} if screening.weight_clips else {}
    outcome = dict(
        accepted=accepted,
        rejected=screening.rejected,
        norms=screening.norms,
        weights=screening.weights,
        cosines=screening.cosines,
    )
    if len(accepted) < cfg.min_updates():
        skipped = f"{len(accepted)} acceptable update(s); {cfg.rule} needs {cfg.min_updates()}"
        return RoundAggregation(None, info={"skipped": skipped, **clip_info}, **outcome)
    combined, details = RULE_REGISTRY[cfg.rule].combine(
        cfg, [updates[i] for i in accepted], [screening.weights[i] for i in accepted]
    )
    if "selected" in details:  # indices into the accepted updates -> into ``updates``
        details["selected"] = [accepted[j] for j in details["selected"]]
    return RoundAggregation(combined, info={"rule": cfg.rule, **clip_info, **details}, **outcome)


def aggregate_round(
    cfg: AggregationConfig,
    updates: Sequence[Mapping[str, np.ndarray]],
    n_samples: Sequence[object],
    reference: Mapping[str, np.ndarray] | None = None,
    declared: Sequence[int | None] | None = None,
) -> RoundAggregation:
    """Validate, screen and combine one round's weight differences (``screen_round`` then
    ``combine_round``). Weights (FedAvg, norm_bounded, multi-Krum) are the bounded claims;
    ``info["weight_clips"]`` lists each bounded claim as {"index", "claimed", "allowed", "basis"}.
    """
    return combine_round(cfg, updates, screen_round(cfg, updates, n_samples, reference, declared))


def _majority_layout(updates: Sequence[Mapping[str, np.ndarray]]) -> Mapping[str, np.ndarray] | None:
    """An update with the most common (name, shape, dtype) layout of the round."""

    def layout(u):
        try:
            return tuple(sorted((k, np.shape(v), str(np.asarray(v).dtype)) for k, v in u.items()))
        except (AttributeError, TypeError):  # not a mapping of arrays: never the majority's layout
            return None

    keys = [layout(u) for u in updates]
    counts = Counter(k for k in keys if k)
    if not counts:
        return None
    best = counts.most_common(1)[0][0]
    return updates[keys.index(best)]
