"""A hospital's data profile, released to the consortium only with differential-privacy noise,
and the consortium's comparison that flags sites whose data looks shifted.

A profile is a handful of counts over the site's ingested images: the number of images,
positives per label, images per view position, images per original-size bin and an
intensity histogram in which every image contributes one unit of mass (its own normalised
histogram). Nothing per image (no pixel, no id, no size) is part of it.

Privacy. Neighbouring datasets differ by adding or removing one image. Under that relation
each count query has a known L1 sensitivity (``sensitivities``): 1 for the image count, the
view histogram, the size histogram and the intensity histogram (one image moves one unit of
mass), and K for the K label counts (one image can be positive for every label).
``release_profile`` splits the profile's epsilon between the queries by ``BUDGET_WEIGHTS``
and adds Laplace noise of scale sensitivity / (weight * epsilon) to each, so the whole
release is pure epsilon-DP (delta = 0) by sequential composition. Clamping negative counts to
0 and renormalising proportions are post-processing and keep the guarantee.

Group privacy: a patient with k images in the dataset is protected at k * epsilon, and a
site that releases its profile r times spends r * epsilon. Both belong in the site's
privacy ledger. numpy's floating-point Laplace sampler is not hardened against attacks on
the low-order bits of its output (Mironov 2012).

Comparison. ``compare_profiles`` compares each site with the pooled other sites: label
prevalence, the intensity histogram, the view mix and the size mix (the last three by total
variation distance), and flags tiny sites. Every rule accounts for the privacy noise of the
released numbers (see ``ShiftConfig``), so noise alone rarely raises a flag. One large
shifted site also moves every other site's pooled reference; a report that flags many sites
the same way usually means one large outlier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import pairwise

import numpy as np

from hospital_fl.errors import InputError
from hospital_fl.privacy.randomness import privacy_rng

__all__ = [
    "BUDGET_WEIGHTS",
    "PROFILE_FORMAT",
    "REPORT_FORMAT",
    "QUERIES",
    "FLAG_KINDS",
    "ProfileConfig",
    "NoiseScales",
    "SiteProfile",
    "ShiftConfig",
    "SiteShift",
    "ShiftReport",
    "sensitivities",
    "noise_scales",
    "exact_profile",
    "noisy_queries",
    "release_profile",
    "compare_profiles",
]

PROFILE_FORMAT = "hospital-fl-site-profile/1"
REPORT_FORMAT = "hospital-fl-shift-report/1"
QUERIES = ("n_images", "label_positives", "view_counts", "size_counts", "intensity_histogram")
# Share of the profile's epsilon per query. Label prevalence is what the consortium needs
# most; the intensity histogram has 16 bins to spread its noise over.
BUDGET_WEIGHTS: Mapping[str, float] = {
    "n_images": 0.15,
    "label_positives": 0.35,
    "view_counts": 0.10,
    "size_counts": 0.10,
    "intensity_histogram": 0.30,
}
FLAG_KINDS = ("label_shift", "covariate_shift", "view_shift", "size_shift", "tiny_site")
_VIEW_ALIASES = {"LL": "LATERAL", "RL": "LATERAL", "LAT": "LATERAL", "LATERAL": "LATERAL"}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ProfileConfig:
    """What a site profile counts and how much privacy its release spends.

    Attributes:
        epsilon: the total epsilon of one profile release (all queries together), > 0 and
            finite: the release always adds noise.
        delta: must be 0; the Laplace mechanism gives pure epsilon-DP.
        histogram_bins: bins of the intensity histogram over 0..255 (2..256).
        size_bins: lower edges, in pixels, of the bins for an image's original longer side;
            they start at 0 and increase, and the last bin is open-ended.
        views: the view-position categories; must include "OTHER", which takes every view
            not listed (and images without one). "LL", "RL" and "LAT" count as "LATERAL".
    """

    epsilon: float = 1.0
    delta: float = 0.0
    histogram_bins: int = 16
    size_bins: tuple[int, ...] = (0, 1024, 2048, 3072, 4096)
    views: tuple[str, ...] = ("PA", "AP", "LATERAL", "OTHER")

    def __post_init__(self):
        if not _is_number(self.epsilon) or not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise InputError(
                "profile epsilon",
                self.epsilon,
                "it must be a finite number > 0; a profile is never released without noise",
                "use e.g. 1.0, or exact_profile() for a local-only view",
            )
        if self.delta != 0:
            raise InputError(
                "profile delta",
                self.delta,
                "the profile release uses the Laplace mechanism, which is pure epsilon-DP",
                "use delta=0.0",
            )
        if isinstance(self.histogram_bins, bool) or not isinstance(self.histogram_bins, int):
            raise InputError("histogram_bins", self.histogram_bins, "it must be an integer", "use e.g. 16")
        if not 2 <= self.histogram_bins <= 256:
            raise InputError("histogram_bins", self.histogram_bins, "it must lie in 2..256", "use e.g. 16")
        edges = self.size_bins
        if (
            not isinstance(edges, tuple)
            or len(edges) < 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in edges)
            or edges[0] != 0
            or any(b <= a for a, b in pairwise(edges))
        ):
            raise InputError(
                "size_bins",
                edges,
                "it must be a tuple of at least 2 increasing integer edges starting at 0",
                "use e.g. (0, 1024, 2048, 3072, 4096)",
            )
        views = self.views
        if not isinstance(views, tuple) or len(set(views)) != len(views) or len(views) < 2 or "OTHER" not in views:
            raise InputError(
                "views",
                views,
                'it must be a tuple of at least 2 distinct names including "OTHER" (every image counts once)',
                'use e.g. ("PA", "AP", "LATERAL", "OTHER")',
            )


@dataclass(frozen=True)
class NoiseScales:
    """Laplace scale of each query's noise (0 everywhere for an exact profile)."""

    n_images: float = 0.0
    label_positives: float = 0.0
    view_counts: float = 0.0
    size_counts: float = 0.0
    intensity_histogram: float = 0.0


def _normalise(counts: Sequence[float]) -> tuple[float, ...]:
    total = float(sum(counts))
    if total <= 0:
        return tuple(1.0 / len(counts) for _ in counts)
    return tuple(float(c) / total for c in counts)


@dataclass(frozen=True)
class SiteProfile:
    """Counts over one site's images; ``noised`` tells a release from a local exact profile.

    Attributes:
        label_names: the K labels, in column order.
        n_images: the number of images.
        label_positives: positives per label (K).
        views / view_counts: images per view category.
        size_edges / size_counts: images per original-size bin (longer side, pixels).
        intensity_histogram: summed per-image normalised intensity histograms (sums to
            n_images before noise).
        noised: True for a differentially private release.
        epsilon: the epsilon that release spent; None for an exact profile.
        noise_scales: the Laplace scale of each query (public: it depends on epsilon only).
    """

    label_names: tuple[str, ...]
    n_images: float
    label_positives: tuple[float, ...]
    views: tuple[str, ...]
    view_counts: tuple[float, ...]
    size_edges: tuple[int, ...]
    size_counts: tuple[float, ...]
    intensity_histogram: tuple[float, ...]
    noised: bool = False
    epsilon: float | None = None
    noise_scales: NoiseScales = NoiseScales()

    def __post_init__(self):
        for name, per in (("label_positives", "label_names"), ("view_counts", "views"), ("size_counts", "size_edges")):
            if len(getattr(self, name)) != len(getattr(self, per)):
                raise InputError(
                    f"profile {name}",
                    f"{len(getattr(self, name))} values",
                    f"it needs one per entry of {per} ({len(getattr(self, per))})",
                    "build profiles with exact_profile / release_profile",
                )
        if len(self.intensity_histogram) < 2:
            raise InputError(
                "profile intensity_histogram", self.intensity_histogram, "it needs at least 2 bins", "use 16 bins"
            )
        for name in ("n_images", "label_positives", "view_counts", "size_counts", "intensity_histogram"):
            values = np.atleast_1d(np.asarray(getattr(self, name), dtype=float))
            if not np.all(np.isfinite(values)) or np.any(values < 0):
                raise InputError(
                    f"profile {name}",
                    getattr(self, name),
                    "counts must be finite and >= 0 (releases clamp noise at 0)",
                    "release profiles with release_profile",
                )
        if self.noised and (self.epsilon is None or not self.epsilon > 0):
            raise InputError("profile epsilon", self.epsilon, "a noised profile records its epsilon > 0", "set it")

    @property
    def prevalence(self) -> tuple[float, ...]:
        """Share of images positive for each label, in [0, 1]."""
        n = max(self.n_images, 1.0)
        return tuple(min(max(c / n, 0.0), 1.0) for c in self.label_positives)

    @property
    def view_mix(self) -> tuple[float, ...]:
        return _normalise(self.view_counts)

    @property
    def size_mix(self) -> tuple[float, ...]:
        return _normalise(self.size_counts)

    @property
    def intensity_distribution(self) -> tuple[float, ...]:
        return _normalise(self.intensity_histogram)

    def to_dict(self) -> dict:
        """A JSON-able dict: counts and settings only, nothing per image."""
        return {
            "format": PROFILE_FORMAT,
            "noised": self.noised,
            "mechanism": "laplace" if self.noised else "none",
            "epsilon": self.epsilon,
            "delta": 0.0,
            "label_names": list(self.label_names),
            "n_images": float(self.n_images),
            "label_positives": [float(v) for v in self.label_positives],
            "views": list(self.views),
            "view_counts": [float(v) for v in self.view_counts],
            "size_edges": [int(v) for v in self.size_edges],
            "size_counts": [float(v) for v in self.size_counts],
            "intensity_histogram": [float(v) for v in self.intensity_histogram],
            "noise_scales": asdict(self.noise_scales),
        }

    @classmethod
    def from_dict(cls, data: object, source: str = "site profile") -> SiteProfile:
        """Parse ``to_dict`` output (e.g. a profile another site sent); errors name ``source``."""
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            shown = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise InputError(f"{source} format", shown, f"it must be {PROFILE_FORMAT!r}", "send SiteProfile.to_dict()")
        try:
            scales = data["noise_scales"]
            return cls(
                label_names=tuple(str(v) for v in data["label_names"]),
                n_images=float(data["n_images"]),
                label_positives=tuple(float(v) for v in data["label_positives"]),
                views=tuple(str(v) for v in data["views"]),
                view_counts=tuple(float(v) for v in data["view_counts"]),
                size_edges=tuple(int(v) for v in data["size_edges"]),
                size_counts=tuple(float(v) for v in data["size_counts"]),
                intensity_histogram=tuple(float(v) for v in data["intensity_histogram"]),
                noised=bool(data["noised"]),
                epsilon=None if data["epsilon"] is None else float(data["epsilon"]),
                noise_scales=NoiseScales(**{f.name: float(scales[f.name]) for f in fields(NoiseScales)}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(
                source, type(err).__name__, f"a field is missing or malformed ({err})", "resend it"
            ) from None


def sensitivities(n_labels: int) -> dict[str, float]:
    """L1 sensitivity of each query when one image is added or removed."""
    return {
        "n_images": 1.0,
        "label_positives": float(n_labels),
        "view_counts": 1.0,
        "size_counts": 1.0,
        "intensity_histogram": 1.0,
    }


def noise_scales(cfg: ProfileConfig, n_labels: int) -> NoiseScales:
    """Laplace scale per query: its sensitivity over its share of ``cfg.epsilon``."""
    sens = sensitivities(n_labels)
    return NoiseScales(**{q: sens[q] / (BUDGET_WEIGHTS[q] * cfg.epsilon) for q in QUERIES})


def _view_index(view: str, views: tuple[str, ...]) -> int:
    name = str(view).strip().upper()
    if name not in views and "LATERAL" in views:
        name = _VIEW_ALIASES.get(name, name)
    return views.index(name) if name in views else views.index("OTHER")


def exact_profile(
    images: np.ndarray,
    labels: np.ndarray,
    label_names: tuple[str, ...],
    view_positions: Sequence[str],
    source_sizes: Sequence[tuple[int, int]],
    cfg: ProfileConfig = ProfileConfig(),
) -> SiteProfile:
    """The site's profile without noise: for local display only, never for release.

    Args:
        images: (N, H, W) uint8 ingested images.
        labels: (N, K) multi-hot 0/1 labels, or (N,) when K = 1.
        label_names: the K label names.
        view_positions: N view positions ("PA", "AP", "LL", "" ...).
        source_sizes: N (rows, columns) of the original images before resizing.
        cfg: the bins and categories to count.

    Returns:
        A SiteProfile with ``noised=False``.

    Raises:
        InputError: shapes, dtypes or lengths do not agree, or labels are not 0/1.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise InputError(
            "images",
            f"shape {images.shape} dtype {images.dtype}",
            "they must be (N, H, W) uint8",
            "pass ingested images",
        )
    n = len(images)
    label_names = tuple(label_names)
    labels = np.asarray(labels)
    if labels.ndim == 1 and len(label_names) == 1:
        labels = labels.reshape(-1, 1)
    if labels.shape != (n, len(label_names)):
        raise InputError(
            "labels",
            f"shape {labels.shape}",
            f"it must be (N, K) = ({n}, {len(label_names)}) to match images and label_names",
            "pass one multi-hot row per image",
        )
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise InputError("labels", np.unique(labels).tolist(), "they must be 0/1 (multi-hot)", "binarise the labels")
    for name, values in (("view_positions", view_positions), ("source_sizes", source_sizes)):
        if len(values) != n:
            raise InputError(name, f"{len(values)} entries", f"it needs one per image ({n})", "pass one per image")
    longer = np.array([max(int(r), int(c)) for r, c in source_sizes], dtype=np.int64)
    if longer.size and longer.min() <= 0:
        raise InputError("source_sizes", int(longer.min()), "image sizes must be > 0", "pass (rows, columns)")

    bins = cfg.histogram_bins
    if n:
        per_pixel = np.bincount((images.astype(np.int64) * bins >> 8).ravel(), minlength=bins)
        # Every image contributes one unit of mass: this bounds the histogram's sensitivity.
        hist = per_pixel / (images.shape[1] * images.shape[2])
    else:
        hist = np.zeros(bins)
    views = np.bincount([_view_index(v, cfg.views) for v in view_positions], minlength=len(cfg.views))
    sizes = np.bincount(np.searchsorted(cfg.size_bins, longer, side="right") - 1, minlength=len(cfg.size_bins))
    return SiteProfile(
        label_names=label_names,
        n_images=float(n),
        label_positives=tuple(float(v) for v in labels.sum(axis=0)),
        views=cfg.views,
        view_counts=tuple(float(v) for v in views),
        size_edges=cfg.size_bins,
        size_counts=tuple(float(v) for v in sizes),
        intensity_histogram=tuple(float(v) for v in hist),
    )


def _check_releasable(exact: SiteProfile, cfg: ProfileConfig) -> None:
    if exact.noised:
        raise InputError(
            "profile", "already noised", "release_profile takes the exact profile", "pass exact_profile(...) output"
        )
    layout = {
        "views": (exact.views, cfg.views),
        "size_bins": (exact.size_edges, cfg.size_bins),
        "histogram_bins": (len(exact.intensity_histogram), cfg.histogram_bins),
    }
    for name, (got, want) in layout.items():
        if got != want:
            raise InputError(
                f"profile {name}", got, f"it must match the release config ({want!r})", "use one ProfileConfig"
            )


def noisy_queries(
    exact: SiteProfile, cfg: ProfileConfig, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Each query's answer plus its Laplace noise, before any post-processing (unbiased).
    The noise comes from the OS's cryptographic source unless a test passes ``rng``."""
    _check_releasable(exact, cfg)
    rng = rng or privacy_rng()
    scales = asdict(noise_scales(cfg, len(exact.label_names)))
    out = {}
    for query in QUERIES:
        value = np.atleast_1d(np.asarray(getattr(exact, query), dtype=float))
        out[query] = value + rng.laplace(0.0, scales[query], size=value.shape)
    return out


def release_profile(exact: SiteProfile, cfg: ProfileConfig, rng: np.random.Generator | None = None) -> SiteProfile:
    """The profile a site may send to the consortium: epsilon-DP over its images.

    Args:
        exact: the site's ``exact_profile`` (never sent).
        cfg: the same config that built ``exact``; ``cfg.epsilon`` is spent in total.
        rng: left out in production: the noise then comes from the OS's cryptographic
            source (hospital_fl.privacy.randomness). Tests of the maths only pass one: a
            known seed makes the noise reproducible, hence removable.

    Returns:
        A SiteProfile with ``noised=True``, noisy counts clamped at 0 (which biases counts
        near 0 upward; ``noisy_queries`` gives the unbiased answers).
    """
    noisy = {q: np.clip(v, 0.0, None) for q, v in noisy_queries(exact, cfg, rng).items()}
    return SiteProfile(
        label_names=exact.label_names,
        n_images=float(noisy["n_images"][0]),
        label_positives=tuple(float(v) for v in noisy["label_positives"]),
        views=exact.views,
        view_counts=tuple(float(v) for v in noisy["view_counts"]),
        size_edges=exact.size_edges,
        size_counts=tuple(float(v) for v in noisy["size_counts"]),
        intensity_histogram=tuple(float(v) for v in noisy["intensity_histogram"]),
        noised=True,
        epsilon=cfg.epsilon,
        noise_scales=noise_scales(cfg, len(exact.label_names)),
    )


# -- comparison -------------------------------------------------------------------------
@dataclass(frozen=True)
class ShiftConfig:
    """When ``compare_profiles`` flags a site.

    A label is flagged when the site's prevalence differs from the pooled other sites' by
    more than ``prevalence_threshold`` (absolute) and by more than ``noise_sds`` standard
    deviations of the privacy noise in that difference (delta method on count / n).

    A distribution (intensity, view, size) is flagged when its total variation distance
    from the pooled other sites' exceeds the distance that privacy noise alone adds on
    average plus the larger of its threshold and ``noise_sds`` standard deviations of that
    noise distance. The noise distance is approximated bin by bin with Gaussian noise of the
    released scales and is conservative: clamping at 0 removes some noise it counts.

    Sampling variation is not discounted: a small site's shares are what they are, and
    ``min_images`` flags sites too small to read much into.

    Attributes:
        prevalence_threshold: absolute prevalence difference that counts as label shift.
        intensity_threshold: total variation of the intensity histogram that counts as
            covariate shift. The embedded chest X-ray hospitals lie 0.02-0.07 from the
            pool of the others; site-5's 0.07 comes from its label mix (within either
            class it lies at most 0.04 away).
        view_threshold / size_threshold: total variation of the view and size mixes.
        noise_sds: how many noise standard deviations a difference must exceed.
        min_images: sites with fewer (released) images are flagged as tiny.
    """

    prevalence_threshold: float = 0.15
    intensity_threshold: float = 0.10
    view_threshold: float = 0.20
    size_threshold: float = 0.20
    noise_sds: float = 2.0
    min_images: int = 50

    def __post_init__(self):
        for name in ("prevalence_threshold", "intensity_threshold", "view_threshold", "size_threshold"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < 1:
                raise InputError(name, value, "a threshold must lie in (0, 1)", "use e.g. 0.15")
        if not _is_number(self.noise_sds) or not 0 <= self.noise_sds < math.inf:
            raise InputError("noise_sds", self.noise_sds, "it must be a finite number >= 0", "use 2.0")
        if isinstance(self.min_images, bool) or not isinstance(self.min_images, int) or self.min_images < 0:
            raise InputError("min_images", self.min_images, "it must be an integer >= 0", "use e.g. 50")


@dataclass(frozen=True)
class SiteShift:
    """One site's row of the shift report.

    Attributes:
        site: the site name.
        n_images: its released image count.
        prevalence / others_prevalence: per label, at the site and at the pooled others.
        intensity_distance / view_distance / size_distance: total variation distance of the
            site's distribution from the pooled others'.
        flags: one line per finding, each starting with a FLAG_KINDS entry and a colon.
    """

    site: str
    n_images: float
    prevalence: dict[str, float]
    others_prevalence: dict[str, float]
    intensity_distance: float
    view_distance: float
    size_distance: float
    flags: tuple[str, ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of its flags, e.g. ("label_shift", "tiny_site")."""
        return tuple(dict.fromkeys(f.split(":", 1)[0] for f in self.flags))

    def to_dict(self) -> dict:
        return asdict(self) | {"flags": list(self.flags)}


@dataclass(frozen=True)
class ShiftReport:
    """Per-site rows, in the order the profiles were given."""

    rows: tuple[SiteShift, ...]
    config: ShiftConfig

    @property
    def flagged_sites(self) -> tuple[str, ...]:
        return tuple(r.site for r in self.rows if r.flags)

    def row(self, site: str) -> SiteShift:
        for r in self.rows:
            if r.site == site:
                return r
        raise InputError("site", site, f"it must be one of {[r.site for r in self.rows]}", "use a reported site")

    def to_dict(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "config": asdict(self.config),
            "flagged_sites": list(self.flagged_sites),
            "sites": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: object, source: str = "shift report") -> ShiftReport:
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            shown = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise InputError(f"{source} format", shown, f"it must be {REPORT_FORMAT!r}", "pass ShiftReport.to_dict()")
        try:
            rows = tuple(SiteShift(**(r | {"flags": tuple(r["flags"])})) for r in data["sites"])
            return cls(rows, ShiftConfig(**data["config"]))
        except (KeyError, TypeError) as err:
            raise InputError(
                source, type(err).__name__, f"a field is missing or malformed ({err})", "resend it"
            ) from None


def _tv(p: Sequence[float], q: Sequence[float]) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def _tv_noise(n_bins: int, sd_site: float, n_site: float, sd_others: float, n_others: float) -> tuple[float, float]:
    """Mean and sd of the total variation that Gaussian-approximated noise alone adds."""
    # Per-bin noise in the difference of proportions; |Gaussian| has mean s*sqrt(2/pi).
    s = math.hypot(sd_site / max(n_site, 1.0), sd_others / max(n_others, 1.0))
    mean = 0.5 * n_bins * s * math.sqrt(2 / math.pi)
    sd = 0.5 * math.sqrt(n_bins) * s * math.sqrt(1 - 2 / math.pi)
    return mean, sd


def _check_comparable(profiles: Mapping[str, SiteProfile]) -> None:
    if len(profiles) < 2:
        raise InputError(
            "profiles", f"{len(profiles)} site(s)", "a comparison needs at least 2 sites", "pass every site's profile"
        )
    first_site, first = next(iter(profiles.items()))
    for site, p in profiles.items():
        for name in ("label_names", "views", "size_edges"):
            if getattr(p, name) != getattr(first, name):
                raise InputError(
                    f"profile of {site}: {name}",
                    getattr(p, name),
                    f"it must match {first_site}'s {getattr(first, name)!r}",
                    "release every site's profile with the same ProfileConfig and labels",
                )
        if len(p.intensity_histogram) != len(first.intensity_histogram):
            raise InputError(
                f"profile of {site}: histogram_bins",
                len(p.intensity_histogram),
                f"it must match {first_site}'s {len(first.intensity_histogram)}",
                "release every site's profile with the same ProfileConfig",
            )


def _distribution_shift(
    kind: str,
    what: str,
    threshold: float,
    site: SiteProfile,
    others: list[SiteProfile],
    counts: str,
    noise_sds: float,
) -> tuple[float, str | None]:
    own = np.asarray(getattr(site, counts), dtype=float)
    pooled = np.sum([getattr(o, counts) for o in others], axis=0)
    distance = _tv(_normalise(own), _normalise(pooled))
    sd_site = math.sqrt(2) * getattr(site.noise_scales, counts)
    sd_others = math.sqrt(sum(2 * getattr(o.noise_scales, counts) ** 2 for o in others))
    mean, sd = _tv_noise(len(own), sd_site, own.sum(), sd_others, pooled.sum())
    if distance > mean + max(threshold, noise_sds * sd):
        return distance, (
            f"{kind}: {what} differs from the other sites' by total variation {distance:.2f} "
            f"(threshold {threshold:.2f} above the {mean:.2f} privacy noise adds)"
        )
    return distance, None


def compare_profiles(profiles: Mapping[str, SiteProfile], cfg: ShiftConfig = ShiftConfig()) -> ShiftReport:
    """Compare each site's profile with the pooled profiles of all other sites.

    Args:
        profiles: {site name: its released profile}; exact profiles compare without
            noise allowance.
        cfg: the flagging rules.

    Returns:
        A ShiftReport with one row per site.

    Raises:
        InputError: fewer than 2 sites, or profiles built with different labels or bins.
    """
    _check_comparable(profiles)
    rows = []
    for site, p in profiles.items():
        others = [o for s, o in profiles.items() if s != site]
        flags: list[str] = []
        n_others = sum(o.n_images for o in others)
        pooled_pos = np.sum([o.label_positives for o in others], axis=0)
        others_prev = np.clip(pooled_pos / max(n_others, 1.0), 0.0, 1.0)
        var_n_others = sum(2 * o.noise_scales.n_images**2 for o in others)
        var_c_others = sum(2 * o.noise_scales.label_positives**2 for o in others)
        for j, label in enumerate(p.label_names):
            own, ref = p.prevalence[j], float(others_prev[j])
            # Delta method: Var(c/n) ~ (Var c + p^2 Var n) / n^2.
            var_own = (2 * p.noise_scales.label_positives**2 + own**2 * 2 * p.noise_scales.n_images**2) / max(
                p.n_images, 1.0
            ) ** 2
            var_ref = (var_c_others + ref**2 * var_n_others) / max(n_others, 1.0) ** 2
            diff = abs(own - ref)
            if diff > cfg.prevalence_threshold and diff > cfg.noise_sds * math.sqrt(var_own + var_ref):
                flags.append(f"label_shift: {label} prevalence {own:.2f} vs {ref:.2f} at the other sites")
        distances = {}
        for kind, what, threshold, counts in (
            ("covariate_shift", "intensity histogram", cfg.intensity_threshold, "intensity_histogram"),
            ("view_shift", "view-position mix", cfg.view_threshold, "view_counts"),
            ("size_shift", "original-size mix", cfg.size_threshold, "size_counts"),
        ):
            distances[counts], flag = _distribution_shift(kind, what, threshold, p, others, counts, cfg.noise_sds)
            if flag:
                flags.append(flag)
        if p.n_images < cfg.min_images:
            flags.append(
                f"tiny_site: about {p.n_images:.0f} images (fewer than {cfg.min_images}); its shares are unreliable"
            )
        rows.append(
            SiteShift(
                site=site,
                n_images=float(p.n_images),
                prevalence=dict(zip(p.label_names, p.prevalence)),
                others_prevalence={name: float(v) for name, v in zip(p.label_names, others_prev)},
                intensity_distance=distances["intensity_histogram"],
                view_distance=distances["view_counts"],
                size_distance=distances["size_counts"],
                flags=tuple(flags),
            )
        )
    return ShiftReport(tuple(rows), cfg)
