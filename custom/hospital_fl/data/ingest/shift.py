"""The consortium's comparison of released site profiles: which sites' data looks shifted.

``compare_profiles`` compares each site with the pooled other sites: label
prevalence, the intensity histogram, the view mix and the size mix (the last three by total
variation distance), and flags tiny sites. Every rule accounts for the privacy noise of the
released numbers (see ``ShiftConfig``), so noise alone rarely raises a flag. One large
shifted site also moves every other site's pooled reference; a report that flags many sites
the same way usually means one large outlier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from hospital_fl.data.ingest.profile import SiteProfile, is_number, normalise
from hospital_fl.errors import InputError

__all__ = ["REPORT_FORMAT", "FLAG_KINDS", "ShiftConfig", "SiteShift", "ShiftReport", "compare_profiles"]

REPORT_FORMAT = "hospital-fl-shift-report/1"
FLAG_KINDS = ("label_shift", "covariate_shift", "view_shift", "size_shift", "tiny_site")


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
            if not is_number(value) or not 0 < value < 1:
                raise InputError(name, value, "a threshold must lie in (0, 1)", "use e.g. 0.15")
        if not is_number(self.noise_sds) or not 0 <= self.noise_sds < math.inf:
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
    distance = _tv(normalise(own), normalise(pooled))
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
