"""Site data profiles: the DP release and the consortium's shift comparison, on real chest X-rays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hospital_fl.data.federated import load_federated
from hospital_fl.data.ingest.profile import (
    BUDGET_WEIGHTS,
    ProfileConfig,
    SiteProfile,
    exact_profile,
    noise_scales,
    noisy_queries,
    release_profile,
)
from hospital_fl.data.ingest.shift import ShiftConfig, ShiftReport, compare_profiles
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError

CFG = ProfileConfig()


@pytest.fixture(scope="module")
def fed():
    return load_federated(SplitConfig())


def _profile(images: np.ndarray, labels: np.ndarray, cfg: ProfileConfig = CFG) -> SiteProfile:
    # The embedded images carry no DICOM header: view unknown, stored at 28 x 28.
    n = len(images)
    return exact_profile(images, labels, ("pneumonia",), [""] * n, [(28, 28)] * n, cfg)


@pytest.fixture(scope="module")
def exact(fed):
    return {s.name: _profile(s.train.images, s.train.labels) for s in fed.sites}


def _release_all(profiles: dict[str, SiteProfile], seed: int) -> dict[str, SiteProfile]:
    rng = np.random.default_rng(seed)
    return {site: release_profile(p, CFG, rng) for site, p in profiles.items()}


def _flagged(report: ShiftReport, kind: str) -> set[str]:
    return {r.site for r in report.rows if kind in r.kinds}


# -- exact profile ---------------------------------------------------------------------------
def test_exact_profile_counts():
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    images[1] = 255
    images[2, :2] = 255  # half dark, half bright
    labels = np.array([[1, 0], [1, 1], [0, 0]])

    p = exact_profile(
        images, labels, ("a", "b"), ["PA", "ll", " "], [(2000, 1500), (512, 512), (4200, 100)], ProfileConfig()
    )

    assert p.n_images == 3 and p.label_positives == (2.0, 1.0)
    assert p.view_counts == (1.0, 0.0, 1.0, 1.0)  # PA, AP, LATERAL (from LL), OTHER
    assert p.size_counts == (1.0, 1.0, 0.0, 0.0, 1.0)  # longer side 512, 2000, 4200
    assert p.intensity_histogram[0] == 1.5 and p.intensity_histogram[-1] == 1.5
    assert sum(p.intensity_histogram) == pytest.approx(3.0)  # one unit of mass per image
    assert not p.noised and p.epsilon is None


def test_exact_profile_rejects_bad_input():
    images = np.zeros((2, 4, 4), dtype=np.uint8)
    with pytest.raises(InputError, match=r"labels: got \[0, 2\]; they must be 0/1 \(multi-hot\)"):
        exact_profile(images, np.array([0, 2]), ("a",), ["", ""], [(9, 9)] * 2)
    with pytest.raises(InputError, match=r"images: got 'shape \(2, 4, 4\) dtype float64'; they must be"):
        exact_profile(images.astype(float), np.array([0, 1]), ("a",), ["", ""], [(9, 9)] * 2)
    with pytest.raises(InputError, match=r"view_positions: got '1 entries'; it needs one per image \(2\)"):
        exact_profile(images, np.array([0, 1]), ("a",), [""], [(9, 9)] * 2)


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("epsilon", [0, -1.0, math.inf, math.nan, True])
def test_privacy_is_never_off(epsilon):
    with pytest.raises(InputError, match="profile epsilon: got .*a profile is never released without noise") as err:
        ProfileConfig(epsilon=epsilon)
    assert "exact_profile() for a local-only view" in str(err.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"delta": 1e-5}, "profile delta: got 1e-05; the profile release uses the Laplace mechanism"),
        ({"histogram_bins": 1}, "histogram_bins: got 1; it must lie in 2..256"),
        ({"size_bins": (0,)}, r"size_bins: got \(0,\); it must be a tuple of at least 2 increasing"),
        ({"size_bins": (0, 2048, 1024)}, "size_bins: got .*increasing integer edges starting at 0"),
        ({"views": ("PA", "AP")}, r'views: got .*including "OTHER"'),
    ],
)
def test_invalid_profile_config_raises(kwargs, message):
    with pytest.raises(InputError, match=message):
        ProfileConfig(**kwargs)


def test_invalid_shift_config_raises():
    with pytest.raises(InputError, match=r"prevalence_threshold: got 0; a threshold must lie in \(0, 1\)"):
        ShiftConfig(prevalence_threshold=0)
    with pytest.raises(InputError, match="min_images: got -5; it must be an integer >= 0"):
        ShiftConfig(min_images=-5)


# -- the release -----------------------------------------------------------------------------
def test_release_is_noisy_and_carries_only_counts(exact):
    p = exact["site-1"]

    a = release_profile(p, CFG, np.random.default_rng(1))
    b = release_profile(p, CFG, np.random.default_rng(2))

    assert a.noised and a.epsilon == 1.0
    assert a.intensity_histogram != b.intensity_histogram and a.n_images != b.n_images
    assert a.n_images != p.n_images
    assert min(a.intensity_histogram) >= 0 and min(a.view_counts) >= 0
    released = json.loads(json.dumps(a.to_dict()))
    assert set(released) == {
        "format", "noised", "mechanism", "epsilon", "delta", "label_names", "n_images", "label_positives",
        "views", "view_counts", "size_edges", "size_counts", "intensity_histogram", "noise_scales",
    }  # fmt: skip
    assert all(len(v) <= 16 for v in released.values() if isinstance(v, list))  # no per-image field
    assert SiteProfile.from_dict(released) == a


def test_release_refuses_a_noised_profile(exact):
    noised = release_profile(exact["site-1"], CFG, np.random.default_rng(0))

    with pytest.raises(InputError, match="profile: got 'already noised'; release_profile takes the exact profile"):
        release_profile(noised, CFG, np.random.default_rng(0))


def test_noise_is_unbiased_with_the_calibrated_laplace_scale(exact):
    p = exact["site-3"]
    rng = np.random.default_rng(7)
    draws = 4000
    scales = noise_scales(CFG, n_labels=1)

    noise = {q: [] for q in ("n_images", "label_positives", "intensity_histogram")}
    for _ in range(draws):
        answers = noisy_queries(p, CFG, rng)
        for q, errors in noise.items():
            errors.append(answers[q] - np.atleast_1d(getattr(p, q)))
    for query, weight_scale in (
        ("n_images", 1 / BUDGET_WEIGHTS["n_images"]),
        ("label_positives", 1 / BUDGET_WEIGHTS["label_positives"]),
        ("intensity_histogram", 1 / BUDGET_WEIGHTS["intensity_histogram"]),
    ):
        errors = np.concatenate(noise[query])
        scale = getattr(scales, query)
        # Laplace(b): mean 0, mean |x| = b; b = sensitivity (1 here) / (weight * epsilon).
        assert scale == pytest.approx(weight_scale)
        assert abs(errors.mean()) < 4 * math.sqrt(2) * scale / math.sqrt(errors.size)
        assert np.abs(errors).mean() == pytest.approx(scale, rel=0.05)


def test_label_sensitivity_grows_with_the_number_of_labels():
    assert noise_scales(CFG, n_labels=14).label_positives == pytest.approx(14 / BUDGET_WEIGHTS["label_positives"])
    assert sum(BUDGET_WEIGHTS.values()) == pytest.approx(1.0)


# -- comparison on the real federation -------------------------------------------------------
def test_exact_comparison_of_the_real_hospitals(exact):
    report = compare_profiles(exact)

    # Pneumonia shares 0.87 / 0.53 / 0.88 / 0.89 / 0.05 against the pooled others: site-3 is
    # 0.145 from its pool, just under the 0.15 threshold; the rest are further away.
    assert _flagged(report, "label_shift") == {"site-1", "site-2", "site-4", "site-5"}
    assert report.row("site-5").flags == ("label_shift: pneumonia prevalence 0.05 vs 0.79 at the other sites",)
    # Intensity histograms lie 0.02-0.07 apart (total variation): no covariate shift.
    distances = [r.intensity_distance for r in report.rows]
    assert max(distances) < 0.08 and not _flagged(report, "covariate_shift")


def test_released_comparison_flags_the_label_skewed_hospitals(exact):
    for seed in range(10):
        report = compare_profiles(_release_all(exact, seed))

        # site-5 (0.05 vs ~0.79), site-2 (0.53 vs ~0.81) and site-1 (0.87 vs ~0.54) differ by
        # far more than the threshold and the noise; sites 3 and 4 sit at the threshold.
        assert {"site-1", "site-2", "site-5"} <= _flagged(report, "label_shift")
        assert not _flagged(report, "covariate_shift")
    flag = report.row("site-5").flags[0]
    assert flag.startswith("label_shift: pneumonia prevalence 0.0") and "at the other sites" in flag
    back = ShiftReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back == report and back.flagged_sites == report.flagged_sites


def test_intensity_transform_is_flagged_and_a_resampled_copy_is_not(fed, exact):
    rng = np.random.default_rng(0)
    site4 = fed.site("site-4").train
    gamma = (255 * (site4.images / 255.0) ** 0.3).astype(np.uint8)  # strong brightening
    site2 = fed.site("site-2").train
    idx = rng.integers(0, len(site2.labels), len(site2.labels))
    profiles = dict(exact) | {
        "site-4": _profile(gamma, site4.labels),
        "site-6": _profile(site2.images[idx], site2.labels[idx]),  # bootstrap copy of site-2
    }

    for seed in range(10):
        report = compare_profiles(_release_all(profiles, seed))

        assert _flagged(report, "covariate_shift") == {"site-4"}
        assert report.row("site-4").intensity_distance > 0.5
        assert report.row("site-6").intensity_distance < 0.1


def test_tiny_sites_are_flagged(fed, exact):
    small = fed.site("site-1").train
    profiles = dict(exact) | {"site-6": _profile(small.images[:20], small.labels[:20])}

    report = compare_profiles(profiles)

    assert "tiny_site: about 20 images (fewer than 50); its shares are unreliable" in report.row("site-6").flags


def test_view_mix_shift_is_flagged():
    images = np.full((200, 8, 8), 100, dtype=np.uint8)
    labels = np.zeros(200, dtype=int)
    sizes = [(2000, 2000)] * 200
    pa = exact_profile(images, labels, ("x",), ["PA"] * 200, sizes)
    portable = exact_profile(images, labels, ("x",), ["AP"] * 150 + ["PA"] * 50, sizes)

    report = compare_profiles({"a": pa, "b": pa, "c": pa, "d": pa, "icu": portable})

    assert _flagged(report, "view_shift") == {"icu"}
    assert report.row("icu").view_distance == pytest.approx(0.75)


def test_comparison_rejects_mismatched_profiles(exact):
    other_bins = _profile(np.zeros((60, 4, 4), dtype=np.uint8), np.zeros(60), ProfileConfig(histogram_bins=8))

    with pytest.raises(InputError, match="profile of site-x: histogram_bins: got 8; it must match site-1's 16"):
        compare_profiles({"site-1": exact["site-1"], "site-x": other_bins})
    with pytest.raises(InputError, match="profiles: got '1 site\\(s\\)'; a comparison needs at least 2 sites"):
        compare_profiles({"site-1": exact["site-1"]})
