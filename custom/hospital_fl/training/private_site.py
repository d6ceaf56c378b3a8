"""Everything privacy does at one site during one job, on plain data (no FLARE).

``SitePrivacy`` runs the mechanisms that hospital_fl.privacy.release_plan calibrates for the
job: DP-SGD (sample-level) or local client-level noise for training, and the Gaussian
release of monitoring metrics. It says what the job will release over all rounds (for the
budget check before training) and what each round released (for the ledger after it).

The job's ``target_epsilon`` is the total of everything it releases at the site (see the
plan). Every noise and sampling draw comes from the OS's cryptographic source
(hospital_fl.privacy.randomness); nothing here takes a seed. What the site tells the server
about its privacy (``reply_summary``) is a function of the job config only: the sample
rates, the calibrated noise multipliers and the exact spend are functions of the record
count, so they stay at the site.
"""

from __future__ import annotations

import numpy as np

from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.privacy.accounting import Release
from hospital_fl.privacy.client_dp import privatize_local
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.metrics_release import poisson_sample, release_metrics
from hospital_fl.privacy.release_plan import SiteReleasePlan, plan_site_releases
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.dp_sgd import DPSGDTrainer
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
        self.plan: SiteReleasePlan = plan_site_releases(
            dp, n_samples, train_cfg.batch_size, train_cfg.epochs, total_rounds, site
        )
        self.dp, self.model_cfg, self.total_rounds = dp, model_cfg, total_rounds
        self.n_samples = n_samples
        self.metrics_rate, self.metrics_noise = self.plan.metrics_rate, self.plan.metrics_noise
        self.client_noise = self.plan.client_noise
        model = build_cxr_model(model_cfg)
        self.dpsgd = (
            DPSGDTrainer(model, n_samples, train_cfg, dp, total_rounds, plan=self.plan.dpsgd)
            if self.plan.dpsgd
            else None
        )
        self.model = self.dpsgd.model if self.dpsgd else model

    def planned_releases(self) -> dict[str, Release]:
        """Everything the job releases from this site's data over all its rounds."""
        return self.plan.planned_releases()

    def round_releases(self) -> dict[str, Release]:
        """What one round releases (recorded in the ledger after each round)."""
        return self.plan.round_releases()

    def noise_summary(self) -> dict:
        """The calibrated mechanisms, for the site's own log and benchmarks (never sent)."""
        return self.plan.noise_summary()

    def reply_summary(self) -> dict:
        """What a reply tells the server about the site's privacy (job config only)."""
        return self.plan.reply_summary()

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
