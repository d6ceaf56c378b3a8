"""Privacy accounting with Opacus accountants, on plain (noise, sample rate, steps) data.

A *release* is one Gaussian mechanism run ``steps`` times with noise multiplier ``sigma``
(noise std / sensitivity) on a Poisson sample of rate ``q`` (1.0: every record, e.g. a
whole-site update or a metric). Epsilon of any list of releases is their composition as
the chosen Opacus accountant computes it, so a ledger's figures equal Opacus's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from hospital_fl.errors import InputError

__all__ = ["Release", "epsilon_of", "noise_for_epsilon", "calibrate_noise", "poisson_schedule"]

Release = tuple[float, float, int]  # (noise multiplier, sample rate, steps)


def epsilon_of(releases: Sequence[Release], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of all ``releases`` composed (0.0 for none)."""
    releases = [(float(s), float(q), int(n)) for s, q, n in releases if int(n) > 0]
    if not releases:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = list(releases)
    return float(acc.get_epsilon(delta=delta))


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
    updates plus a noisy count, or training alongside fixed metric releases)."""
    ceiling = target_epsilon * (1 - _SAFETY)
    low, high = 0.0, 1.0
    while epsilon_of(releases_for(high), delta, accountant) > ceiling:
        low, high = high, high * 2
        if high > 1e6:
            raise InputError(
                "privacy.target_epsilon",
                target_epsilon,
                "no noise level reaches it (the releases whose noise is fixed may already spend it)",
                "raise epsilon or run fewer rounds",
            )
    while True:
        mid = (low + high) / 2
        eps = epsilon_of(releases_for(mid), delta, accountant)
        if eps > ceiling:
            low = mid
        else:
            high = mid
            if ceiling - eps <= tolerance or high - low < 1e-4:
                return high
