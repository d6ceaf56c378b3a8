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

The consortium's comparison of released profiles is hospital_fl.data.ingest.shift.
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
    "QUERIES",
    "ProfileConfig",
    "NoiseScales",
    "SiteProfile",
    "sensitivities",
    "noise_scales",
    "exact_profile",
    "noisy_queries",
    "release_profile",
]

PROFILE_FORMAT = "hospital-fl-site-profile/1"
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
_VIEW_ALIASES = {"LL": "LATERAL", "RL": "LATERAL", "LAT": "LATERAL", "LATERAL": "LATERAL"}


def is_number(value: object) -> bool:
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
        if not is_number(self.epsilon) or not math.isfinite(self.epsilon) or self.epsilon <= 0:
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


def normalise(counts: Sequence[float]) -> tuple[float, ...]:
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
        return normalise(self.view_counts)

    @property
    def size_mix(self) -> tuple[float, ...]:
        return normalise(self.size_counts)

    @property
    def intensity_distribution(self) -> tuple[float, ...]:
        return normalise(self.intensity_histogram)

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
