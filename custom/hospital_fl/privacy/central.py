"""Central client-level DP at the server: clip each site's update, average, add noise.

Stateful only in the adaptive clip norm; the maths is in client_dp. The noise multiplier
is calibrated so that all rounds (updates plus the adaptive-clipping count) compose to the
job's target epsilon; the guarantee covers each site's whole dataset, and sites must trust
the server, which sees their raw updates. Each round's noise is drawn from the OS's
cryptographic source (hospital_fl.privacy.randomness): no seed, so no site holding the job
config can subtract it from the global model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hospital_fl.privacy.accounting import calibrate_noise, epsilon_of
from hospital_fl.privacy.client_dp import COUNT_NOISE_RATIO, adapt_clip_norm, central_dp_mean, client_level_releases
from hospital_fl.privacy.config import DPConfig

__all__ = ["CentralClientDP"]


class CentralClientDP:
    def __init__(self, dp: DPConfig, num_rounds: int):
        if dp.mechanism != "client-central":
            raise ValueError(f"CentralClientDP runs mechanism client-central, got {dp.mechanism}")
        self.dp, self.num_rounds = dp, num_rounds
        self.noise_multiplier = calibrate_noise(
            dp.target_epsilon,
            dp.delta,
            lambda z: client_level_releases(z, num_rounds, dp.adaptive_clip),
            dp.accountant,
        )
        self.clip_norm = dp.clip_norm
        self.rounds_done = 0

    def combine(self, updates: Sequence[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], dict]:
        """The noisy mean of the round's clipped updates, and what the round did."""
        used_clip = self.clip_norm
        mean, norms = central_dp_mean(updates, used_clip, self.noise_multiplier)
        if self.dp.adaptive_clip:
            self.clip_norm = adapt_clip_norm(
                used_clip,
                norms,
                self.dp.target_quantile,
                self.dp.clip_learning_rate,
                self.noise_multiplier * COUNT_NOISE_RATIO,
            )
        self.rounds_done += 1
        return mean, {"clip_norm": used_clip, "update_norms": norms, "next_clip_norm": self.clip_norm}

    def epsilon_spent(self) -> float:
        releases = client_level_releases(self.noise_multiplier, self.rounds_done, self.dp.adaptive_clip)
        return epsilon_of(releases, self.dp.delta, self.dp.accountant)
