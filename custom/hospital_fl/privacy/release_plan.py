"""What a DP job releases from one site's records, calibrated before any training.

Pure planning on plain numbers (record count, batch size, epochs, rounds): no model, no
data. ``plan_dp_sgd`` fixes DP-SGD's Poisson sample rate, its optimiser steps and the
smallest noise multiplier whose composition with the job's other releases meets the
target; ``plan_site_releases`` does the same for everything one job releases at a site
(training and the monitoring metrics). The training side (hospital_fl.training.private_site)
runs the mechanisms these plans describe; the ledger records their releases.

The job's ``target_epsilon`` is the total of everything it releases at the site: the
metric releases are calibrated to their share first, then the training noise is the
smallest whose composition with them stays within the target, never a little more.
"""

from __future__ import annotations

from dataclasses import dataclass

from hospital_fl.errors import InputError
from hospital_fl.privacy.accounting import Release, calibrate_noise, noise_for_epsilon, poisson_schedule
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.metrics_release import RELEASES_PER_ROUND, metrics_sample_rate

__all__ = ["DPSGDPlan", "SiteReleasePlan", "plan_dp_sgd", "plan_site_releases"]


@dataclass(frozen=True)
class DPSGDPlan:
    """Sample-level DP-SGD over a whole job: every step draws each record with
    probability ``sample_rate`` and adds noise of ``noise_multiplier`` x the clip norm."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    total_rounds: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.total_rounds

    def release(self, rounds: int) -> Release:
        """The training release of ``rounds`` rounds."""
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round * rounds)


def plan_dp_sgd(
    n_samples: int,
    batch_size: int,
    epochs: int,
    dp: DPConfig,
    total_rounds: int,
    alongside: tuple[Release, ...] = (),
) -> DPSGDPlan:
    """DP-SGD's schedule and noise for a job of ``total_rounds`` x ``epochs`` local epochs.

    Args:
        n_samples: the site's training records (the sample rate is batch_size / n).
        batch_size: the expected Poisson batch.
        epochs: local epochs per round (an epoch is 1/q steps, as in Opacus).
        dp: target epsilon, delta and accountant.
        total_rounds: rounds in the job, so the noise covers all of them.
        alongside: the job's other releases from the same records over all its rounds
            (the metric releases); the training noise is the smallest whose composition
            with them stays within ``dp.target_epsilon``.
    """
    q, steps_per_round = poisson_schedule(n_samples, batch_size, epochs)
    steps = steps_per_round * total_rounds
    noise = calibrate_noise(dp.target_epsilon, dp.delta, lambda z: [(z, q, steps), *alongside], dp.accountant)
    return DPSGDPlan(noise, q, steps_per_round, total_rounds)


@dataclass(frozen=True)
class SiteReleasePlan:
    """The calibrated mechanisms of one job at one site, and what they release.

    ``dpsgd`` is set under mechanism "sample", ``client_noise`` under "client-local"; the
    metric releases (three per round) run under every DP mechanism."""

    dp: DPConfig
    total_rounds: int
    metrics_noise: float
    metrics_rate: float
    dpsgd: DPSGDPlan | None = None
    client_noise: float | None = None

    def releases(self, rounds: int) -> dict[str, Release]:
        """What ``rounds`` rounds release, by mechanism."""
        out: dict[str, Release] = {}
        if self.dpsgd:
            out["sample"] = self.dpsgd.release(rounds)
        if self.client_noise is not None:
            out["client-local"] = (self.client_noise, 1.0, rounds)
        out["metrics"] = (self.metrics_noise, self.metrics_rate, RELEASES_PER_ROUND * rounds)
        return out

    def planned_releases(self) -> dict[str, Release]:
        """Everything the job releases from this site's data over all its rounds."""
        return self.releases(self.total_rounds)

    def round_releases(self) -> dict[str, Release]:
        """What one round releases (recorded in the ledger after each round)."""
        return self.releases(1)

    def noise_summary(self) -> dict:
        """The calibrated mechanisms, for the site's own log and benchmarks: the sample rates
        and noise multipliers determine the record count, so this never leaves the site."""
        return {
            "mechanism": self.dp.mechanism,
            "delta": self.dp.delta,
            "training_noise_multiplier": self.dpsgd.noise_multiplier if self.dpsgd else self.client_noise,
            "sample_rate": self.dpsgd.sample_rate if self.dpsgd else 1.0,
            "metrics_noise_multiplier": self.metrics_noise,
            "metrics_sample_rate": self.metrics_rate,
        }

    def reply_summary(self) -> dict:
        """What a reply tells the server about the site's privacy: the mechanism and the
        job's bound (its total epsilon at ``delta``), all from the job config; none of it
        depends on the record count."""
        return {
            "mechanism": self.dp.mechanism,
            "delta": self.dp.delta,
            "accountant": self.dp.accountant,
            "epsilon_bound": self.dp.target_epsilon,
        }


def plan_site_releases(
    dp: DPConfig, n_samples: int, batch_size: int, epochs: int, total_rounds: int, site: str
) -> SiteReleasePlan:
    """Calibrate every mechanism a DP job runs at ``site``: the metrics first, at their
    share; training then takes what remains of the total.

    Raises:
        InputError: ``dp`` has no mechanism ("none"), delta is not below 1/n, or no noise
            level reaches the target.
    """
    if not dp.enabled:
        raise InputError("privacy.mechanism", dp.mechanism, "a site's DP plan needs a DP mechanism", "use sample")
    dp.check_delta_for(n_samples, f"site {site}")
    metrics_rate = metrics_sample_rate(n_samples)
    metrics_noise = noise_for_epsilon(
        dp.metrics_budget, dp.delta, metrics_rate, RELEASES_PER_ROUND * total_rounds, dp.accountant
    )
    metrics = ((metrics_noise, metrics_rate, RELEASES_PER_ROUND * total_rounds),)
    dpsgd = (
        plan_dp_sgd(n_samples, batch_size, epochs, dp, total_rounds, alongside=metrics)
        if dp.mechanism == "sample"
        else None
    )
    client_noise = (
        calibrate_noise(dp.target_epsilon, dp.delta, lambda z: [(z, 1.0, total_rounds), *metrics], dp.accountant)
        if dp.mechanism == "client-local"
        else None
    )
    return SiteReleasePlan(dp, total_rounds, metrics_noise, metrics_rate, dpsgd, client_noise)
