"""Privacy accounting with Opacus accountants, on plain (noise, sample rate, steps) data.

A *release* is one Gaussian mechanism run ``steps`` times with noise multiplier ``sigma``
(noise std / sensitivity) on a Poisson sample of rate ``q`` (1.0: every record, e.g. a
whole-site update or a metric). Epsilon of any list of releases is their composition as
the chosen Opacus accountant computes it, so a ledger's figures equal Opacus's own. For
the RDP accountant the per-step RDP curve of each (sigma, q) is computed by Opacus's own
function once and kept (calibration evaluates the same releases many times); the sum and
the conversion are Opacus's, in Opacus's order, so the figures are the same floats.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from hospital_fl.errors import InputError

__all__ = ["Release", "epsilon_of", "noise_for_epsilon", "calibrate_noise", "poisson_schedule"]

Release = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


def epsilon_of(releases: Sequence[Release], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of all ``releases`` composed (0.0 for none)."""
    releases = [(float(s), float(q), int(n)) for s, q, n in releases if int(n) > 0]
    if not releases:
        return 0.0
    if accountant == "rdp":
        # as RDPAccountant.get_privacy_spent: sum of compute_rdp(q, sigma, steps), then convert
        rdp = sum([_rdp_per_step(q, s) * n for s, q, n in releases])
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = list(releases)
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, sigma: float) -> np.ndarray:
    """Opacus's RDP curve of one step (compute_rdp with steps=1 multiplies by 1: exact)."""
    curve = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    curve.setflags(write=False)
    return curve


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (to Opacus's 0.01 tolerance) whose epsilon over
    ``steps`` releases at ``sample_rate`` stays at or below ``target_epsilon``."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise InputError(
            "privacy.target_epsilon",
            target_epsilon,
            f"no noise level reaches it over {steps} steps at sample rate {sample_rate:.3g} ({err})",
            "raise epsilon, or train fewer rounds/epochs",
        ) from err


def poisson_schedule(n_samples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate, optimiser steps) of ``epochs`` of Poisson-sampled DP-SGD: each step
    draws every record with probability batch/n; an epoch is 1/q steps, as in Opacus."""
    if n_samples < 1:
        raise InputError("n_samples", n_samples, "a site needs at least one training record", "check the site's data")
    q = min(1.0, batch_size / n_samples)
    return q, epochs * max(1, math.floor(1 / q))


# Calibration aims this far below the target, so that recomposing the same releases in
# another order or grouping (a ledger's per-round entries) cannot land a float above it.
_SAFETY = 1e-9


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    releases_for: Callable[[float], list[Release]],
    accountant: str = "rdp",
    tolerance: float = 0.005,
) -> float:
    """The smallest noise multiplier z (to ``tolerance`` in epsilon) such that the
    composition ``releases_for(z)`` stays within ``target_epsilon``, never above it; for
    mechanisms made of several releases, some of whose noise scales with z (e.g. clipped
    updates plus a noisy count, or training alongside fixed metric releases).

    Epsilon falls smoothly with z: false position on log epsilon (a bisection step whenever
    one side stalls) keeps a bracket whose upper end always meets the target, and returns
    it once its epsilon lies within ``tolerance`` below the target."""
    ceiling = target_epsilon * (1 - _SAFETY)
    aim = math.log(ceiling - tolerance / 2)

    def eps(z: float) -> float:
        return epsilon_of(releases_for(z), delta, accountant)

    low, e_low, high = 0.0, math.inf, 1.0
    e_high = eps(high)
    while e_high > ceiling:
        low, e_low, high = high, e_high, high * 2
        if high > 1e6:
            raise InputError(
                "privacy.target_epsilon",
                target_epsilon,
                "no noise level reaches it (the releases whose noise is fixed may already spend it)",
                "raise epsilon or run fewer rounds",
            )
        e_high = eps(high)
    last = None
    for _ in range(200):
        if ceiling - e_high <= tolerance or high - low <= 1e-9 * high:
            return high
        if math.isinf(e_low) or e_high <= 0 or last == "stall":
            mid = (low + high) / 2
        else:
            f_low, f_high = math.log(e_low) - aim, math.log(e_high) - aim
            mid = high - f_high * (high - low) / (f_high - f_low)
            mid = min(max(mid, low + 1e-3 * (high - low)), high - 1e-3 * (high - low))
        e_mid = eps(mid)
        side = "low" if e_mid > ceiling else "high"
        if side == "low":
            low, e_low = mid, e_mid
        else:
            high, e_high = mid, e_mid
        last = "stall" if side == last else side
    return high
