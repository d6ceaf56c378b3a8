"""Everything privacy does at one site during one job, on plain data (no FLARE).

``SitePrivacy`` holds the job's calibrated mechanisms: DP-SGD (sample-level) or local
client-level noise for training, and the Gaussian release of monitoring metrics. It says
what the job will release over all rounds (for the budget check before training) and
what each round released (for the ledger after it).
"""

from __future__ import annotations

import numpy as np

from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.privacy.accounting import Release, noise_for_epsilon
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
        seed: seeds the noise of client-level and metric releases.
    """

    def __init__(
        self,
        dp: DPConfig,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        n_samples: int,
        total_rounds: int,
        site: str,
        seed: int,
    ):
        if not dp.enabled:
            raise ValueError("SitePrivacy needs a DP mechanism; mechanism 'none' has no privacy to run")
        dp.check_delta_for(n_samples, f"site {site}")
        self.dp, self.model_cfg, self.total_rounds = dp, model_cfg, total_rounds
        model = build_cxr_model(model_cfg)
        self.rng = np.random.default_rng(seed)
        self.dpsgd = DPSGDTrainer(model, n_samples, train_cfg, dp, total_rounds) if dp.mechanism == "sample" else None
        self.model = self.dpsgd.model if self.dpsgd else model
        self.client_noise = (
            noise_for_epsilon(dp.target_epsilon, dp.delta, 1.0, total_rounds, dp.accountant)
            if dp.mechanism == "client-local"
            else None
        )
        self.n_samples = n_samples
        self.metrics_rate = metrics_sample_rate(n_samples)
        self.metrics_noise = noise_for_epsilon(
            dp.metrics_epsilon, dp.delta, self.metrics_rate, RELEASES_PER_ROUND * total_rounds, dp.accountant
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
        return {
            "mechanism": self.dp.mechanism,
            "delta": self.dp.delta,
            "training_noise_multiplier": self.dpsgd.noise_multiplier if self.dpsgd else self.client_noise,
            "sample_rate": self.dpsgd.sample_rate if self.dpsgd else 1.0,
            "metrics_noise_multiplier": self.metrics_noise,
            "metrics_sample_rate": self.metrics_rate,
        }

    def privatize_update(self, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Local client-level DP on the round's update; other mechanisms send it as is
        (DP-SGD already noised the training; central DP is the server's job)."""
        if self.client_noise is None:
            return delta
        noisy, _ = privatize_local(delta, self.dp.clip_norm, self.client_noise, self.rng)
        return noisy

    def released_metrics(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Noisy sample count, mean loss and mean gradient norm of the trained model, from
        a Poisson sample of the site's records."""
        # A plain copy: the Opacus hooks on the training network do not compose with torch.func.
        probe = build_cxr_model(self.model_cfg)
        probe.load_state_dict(self.model.state_dict())
        idx = poisson_sample(len(images), self.metrics_rate, self.rng)
        losses, norms = per_record_loss_and_grad_norm(probe, images[idx], labels[idx])
        return release_metrics(losses, norms, self.metrics_noise, self.rng, self.metrics_rate)
