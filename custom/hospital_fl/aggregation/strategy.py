"""The server's aggregation rule as typed config, and one round's aggregation as a pure function.

``aggregate_round`` is what the FLARE aggregator (hospital_fl.flare.aggregator) and the
in-process federation both run: validate each update, drop norm outliers, drop updates that
point against the round's median update (the direction screen), then combine the rest with
the configured rule. It never raises on a site's bad update; it reports it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hospital_fl.aggregation.direction import DEFAULT_MIN_COSINE, direction_outliers, update_cosines
from hospital_fl.aggregation.robust import coordinate_median, multi_krum, norm_bounded_mean, trimmed_mean
from hospital_fl.aggregation.validation import norm_outliers, update_norm, update_problem
from hospital_fl.aggregation.weighted import weighted_mean
from hospital_fl.aggregation.weights import DEFAULT_CAP_FACTOR, bounded_weights
from hospital_fl.errors import InputError

__all__ = ["RULES", "AggregationConfig", "RoundAggregation", "aggregate_round"]

RULES = ("fedavg", "trimmed_mean", "median", "norm_bounded", "krum", "multi_krum")


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
        if self.rule == "trimmed_mean":
            return 2 * self.trim + 1
        if self.rule in ("krum", "multi_krum"):
            return max(2 * self.byzantine + 3, self.select or 1)
        return 1

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


def aggregate_round(
    cfg: AggregationConfig,
    updates: Sequence[Mapping[str, np.ndarray]],
    n_samples: Sequence[object],
    reference: Mapping[str, np.ndarray] | None = None,
    declared: Sequence[int | None] | None = None,
) -> RoundAggregation:
    """Validate, screen and combine one round's weight differences.

    Args:
        cfg: the rule.
        updates: each site's difference to the global model.
        n_samples: each site's claimed training samples (the FedAvg weight).
        reference: the global model (names, shapes, dtypes every update must match); None
            checks every update against the layout most updates share, so one site sending
            odd names or shapes cannot get the others rejected by arriving first.
        declared: per update, the image count the consortium declared for its site (None:
            none declared); bounds the site's weight (hospital_fl.aggregation.weights).

    The direction screen runs on the updates that passed the norm screen; ``cosines`` holds
    each one's cosine with their coordinate-wise median (nan where not computed).
    Weights (FedAvg, norm_bounded, multi-Krum) are the bounded claims; ``info["weight_clips"]``
    lists each bounded claim as {"index", "claimed", "allowed", "basis"}.
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
    all_norms = [norm_of.get(i, float("nan")) for i in range(len(updates))]
    bounded, clips = bounded_weights(
        [n_samples[i] for i in valid],
        [declared[i] for i in valid] if declared is not None else None,
        cfg.claim_cap,
    )
    weight_of = dict(zip(valid, bounded))
    all_weights = [weight_of.get(i, float("nan")) for i in range(len(updates))]
    clip_info = [{"index": valid[c.index], **c.as_dict()} for c in clips]
    if len(accepted) < cfg.min_updates():
        return RoundAggregation(
            None,
            accepted,
            rejected,
            all_norms,
            {
                "skipped": f"{len(accepted)} acceptable update(s); {cfg.rule} needs {cfg.min_updates()}",
                **({"weight_clips": clip_info} if clip_info else {}),
            },
            all_weights,
            all_cosines,
        )
    chosen = [updates[i] for i in accepted]
    weights = [weight_of[i] for i in accepted]
    info: dict = {"rule": cfg.rule}
    if clip_info:
        info["weight_clips"] = clip_info
    if cfg.rule == "fedavg":
        combined = weighted_mean(chosen, weights)
    elif cfg.rule == "trimmed_mean":
        combined = trimmed_mean(chosen, cfg.trim)
    elif cfg.rule == "median":
        combined = coordinate_median(chosen)
    elif cfg.rule == "norm_bounded":
        combined, info["norm_bound"] = norm_bounded_mean(chosen, weights, cfg.norm_bound)
    else:
        select = 1 if cfg.rule == "krum" else (cfg.select or len(chosen) - cfg.byzantine)
        combined, picked = multi_krum(chosen, weights, cfg.byzantine, select)
        info["selected"] = [accepted[j] for j in picked]
    return RoundAggregation(combined, accepted, rejected, all_norms, info, all_weights, all_cosines)


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
