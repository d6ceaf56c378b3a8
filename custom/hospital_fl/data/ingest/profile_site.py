"""A site's profile computed from its ingested dataset (consented patients only)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from hospital_fl.data.ingest.manifest import load_images
from hospital_fl.data.ingest.profile import ProfileConfig, SiteProfile, exact_profile, release_profile
from hospital_fl.data.ingest.site_dataset import consented_records

__all__ = ["profile_site"]


def profile_site(
    site_dir: str | Path,
    cfg: ProfileConfig = ProfileConfig(),
    today: dt.date | None = None,
) -> tuple[SiteProfile, SiteProfile]:
    """(exact profile for local display, DP release for the consortium).

    The release's Laplace noise comes from the OS's cryptographic source, never a seed:
    noise drawn from a known seed would be removable.
    """
    manifest, keep, _ = consented_records(site_dir, today=today)
    images = load_images(site_dir, manifest)
    rows = np.array([r.row for r in keep], dtype=np.int64)
    exact = exact_profile(
        np.asarray(images[rows]),
        manifest.label_matrix()[rows],
        manifest.label_names,
        [r.view_position for r in keep],
        [(r.source_rows, r.source_columns) for r in keep],
        cfg,
    )
    return exact, release_profile(exact, cfg)
