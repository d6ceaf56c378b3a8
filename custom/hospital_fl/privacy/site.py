"""Everything privacy does at one site during one job, on plain data (no FLARE).

``SitePrivacy`` holds the job's calibrated mechanisms: DP-SGD (sample-level) or local
client-level noise for training, and the Gaussian release of monitoring metrics. It says
what the job will release over all rounds (for the budget check before training) and
what each round released (for the ledger after it).

The job's ``target_epsilon`` is the total of everything it releases at the site: the
metric releases are calibrated to their share first, then the training noise is the
smallest whose composition with them stays within the target. Every noise and sampling
draw comes from the OS's cryptographic source (hospital_fl.privacy.randomness); nothing
here takes a seed. What the site tells the server about its privacy (``reply_summary``) is
a function of the job config only: the sample rates, the calibrated noise multipliers and
the exact spend are functions of the record count, so they stay at the site.
"""

from __future__ import annotations

import numpy as np

from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.privacy.accounting import Release, calibrate_noise, noise_for_epsilon
from hospital_fl.privacy.client_dp import privatize_local
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.dp_sgd import DPSGDTrainer
from hospital_fl.privacy.metrics_release import (
    RELEASES_PER_ROUND,
    metrics_sample_rate,
    poisson_sample,
    release_metrics,
)
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.per_sample import per_record_loss_and_grad_norm

__all__ = ["SitePrivacy"]


class SitePrivacy:
    """The DP mechanisms of one job at one site.

    Args:
        dp: the job's privacy settings (mechanism must not be "none").
        model_cfg: the site's network, built here; under DP-SGD it is wrapped once and kept
            for the whole job.
        train_cfg: local training settings (batch size and epochs set the sample rate).
        n_samples: the site's training records.
        total_rounds: rounds in the job.
        site: the site name (for error messages).
    """

    def __init__(
        self,
        dp: DPConfig,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        n_samples: int,
        total_rounds: int,
        site: str,
    ):
        if not dp.enabled:
            raise ValueError("SitePrivacy needs a DP mechanism; mechanism 'none' has no privacy to run")
        dp.check_delta_for(n_samples, f"site {site}")
        self.dp, self.model_cfg, self.total_rounds = dp, model_cfg, total_rounds
        model = build_cxr_model(model_cfg)
        self.n_samples = n_samples
        # Metrics first, at their share; training then takes what remains of the total.
        self.metrics_rate = metrics_sample_rate(n_samples)
        self.metrics_noise = noise_for_epsilon(
            dp.metrics_budget, dp.delta, self.metrics_rate, RELEASES_PER_ROUND * total_rounds, dp.accountant
        )
        metrics = ((self.metrics_noise, self.metrics_rate, RELEASES_PER_ROUND * total_rounds),)
        self.dpsgd = (
            DPSGDTrainer(model, n_samples, train_cfg, dp, total_rounds, alongside=metrics)
            if dp.mechanism == "sample"
            else None
        )
        self.model = self.dpsgd.model if self.dpsgd else model
        self.client_noise = (
            calibrate_noise(
                dp.target_epsilon, dp.delta, lambda z: [(z, 1.0, total_rounds), *metrics], dp.accountant
            )
            if dp.mechanism == "client-local"
            else None
        )

    def _releases(self, rounds: int) -> dict[str, Release]:
        out: dict[str, Release] = {}
        if self.dpsgd:
            noise, rate, _ = self.dpsgd.planned_release()
            out["sample"] = (noise, rate, self.dpsgd.steps_per_round * rounds)
        if self.client_noise is not None:
            out["client-local"] = (self.client_noise, 1.0, rounds)
        out["metrics"] = (self.metrics_noise, self.metrics_rate, RELEASES_PER_ROUND * rounds)
        return out

    def planned_releases(self) -> dict[str, Release]:
        """Everything the job releases from this site's data over all its rounds."""
        return self._releases(self.total_rounds)

    def round_releases(self) -> dict[str, Release]:
        """What one round releases (recorded in the ledger after each round)."""
        return self._releases(1)

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

    def privatize_update(self, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Local client-level DP on the round's update; other mechanisms send it as is
        (DP-SGD already noised the training; central DP is the server's job)."""
        if self.client_noise is None:
            return delta
        noisy, _ = privatize_local(delta, self.dp.clip_norm, self.client_noise)
        return noisy

    def released_metrics(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Noisy sample count, mean loss and mean gradient norm of the trained model, from
        a Poisson sample of the site's records."""
        # A plain copy: the Opacus hooks on the training network do not compose with torch.func.
        probe = build_cxr_model(self.model_cfg)
        probe.load_state_dict(self.model.state_dict())
        idx = poisson_sample(len(images), self.metrics_rate)
        losses, norms = per_record_loss_and_grad_norm(probe, images[idx], labels[idx])
        return release_metrics(losses, norms, self.metrics_noise, sample_rate=self.metrics_rate)
