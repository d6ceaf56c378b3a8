"""Adversary: whoever holds the job config (its ``seed``: the server, any site, the job's
author) regenerates the DP noise the way seeded generators made it and subtracts it.

Each mechanism runs for real (SitePrivacy, CentralClientDP, Opacus DP-SGD, the metric
release). A control shows the attack recovers a release exactly when the noise is seeded;
against the shipped mechanisms the recovery error is of the order of the noise std, the
noise still has its configured std, and two runs with the same seed draw different noise.
Tolerances sit tens of standard errors away, so the statistics cannot flake.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.privacy.central import CentralClientDP
from hospital_fl.privacy.client_dp import central_dp_mean, clip_update, privatize_local
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.metrics_release import release_metrics
from hospital_fl.training import dp_sgd as dp_sgd_module
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.dp_sgd import DPSGDTrainer
from hospital_fl.training.loops import get_weights
from hospital_fl.training.private_site import SitePrivacy

SEED = 0  # the seed in every job folder under jobs/
TRAIN = TrainConfig(epochs=1, device="cpu", seed=SEED, augment=False)


def _flat(update: dict) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in update.values()])


def _update(seed: int = 1) -> dict[str, np.ndarray]:
    """A site's real-shaped update (the CXR model's weights), with a norm above the clip."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in get_weights(build_cxr_model()).items()}


def _replayed_gaussian(update: dict, std: float, seed: int) -> np.ndarray:
    """The noise a generator seeded from the job config would have added, key by key."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.ravel(rng.normal(0.0, std, np.shape(v))) for v in update.values()])


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


# -- client-level local DP ------------------------------------------------------------------
def test_local_client_noise_cannot_be_replayed_from_the_job_seed():
    privacy = SitePrivacy(DPConfig("client-local", 8.0), ModelConfig(), TRAIN, 200, 3, "site-1")
    update = _update()
    clipped = _flat(clip_update(update, privacy.dp.clip_norm)[0])
    std = privacy.client_noise * privacy.dp.clip_norm

    # Control: with a seeded generator (the old way) the adversary recovers the update exactly.
    seeded, _ = privatize_local(update, privacy.dp.clip_norm, privacy.client_noise, np.random.default_rng(SEED))
    assert _rms(_flat(seeded) - _replayed_gaussian(update, std, SEED) - clipped) < 1e-5 * std

    released = _flat(privacy.privatize_update(update))
    recovered = released - _replayed_gaussian(update, std, SEED)
    assert _rms(recovered - clipped) > 0.5 * std  # ~ sqrt(2) std: nothing removed
    assert np.std(released - clipped) == pytest.approx(std, rel=0.05)  # 187k coordinates: SE 0.2%
    again = _flat(privacy.privatize_update(update))
    same_seed = _flat(
        SitePrivacy(DPConfig("client-local", 8.0), ModelConfig(), TRAIN, 200, 3, "site-1").privatize_update(update)
    )
    assert _rms(again - released) > std and _rms(same_seed - released) > std


# -- central client-level DP ----------------------------------------------------------------
def test_a_site_cannot_strip_central_noise_to_read_another_sites_update():
    dp = DPConfig("client-central", 3.0, adaptive_clip=False)
    mine, theirs = _update(1), _update(2)
    m = 2
    clip = dp.clip_norm
    mine_c, theirs_c = _flat(clip_update(mine, clip)[0]), _flat(clip_update(theirs, clip)[0])

    def attack(noisy_mean: dict, std: float) -> np.ndarray:
        """Site 1 knows its own update and the seed: the other's = m * (mean - noise) - mine."""
        return m * (_flat(noisy_mean) - _replayed_gaussian(mine, std, SEED)) - mine_c

    central = CentralClientDP(dp, num_rounds=4)
    std = central.noise_multiplier * clip / m
    seeded, _ = central_dp_mean([mine, theirs], clip, central.noise_multiplier, np.random.default_rng(SEED))
    assert _rms(attack(seeded, std) - theirs_c) < 1e-5 * m * std  # control: the old way gives it away

    noisy, _ = central.combine([mine, theirs])
    assert _rms(attack(noisy, std) - theirs_c) > 0.5 * m * std
    assert np.std(_flat(noisy) - (mine_c + theirs_c) / m) == pytest.approx(std, rel=0.05)
    fresh, _ = CentralClientDP(dp, num_rounds=4).combine([mine, theirs])
    assert _rms(_flat(fresh) - _flat(noisy)) > std


# -- metric releases ------------------------------------------------------------------------
def test_the_noisy_sample_count_cannot_be_denoised_from_the_seed():
    n, z = 200, 2.0  # every record sampled (q = 1): released count = n + N(0, z^2)
    losses, norms = np.full(n, 0.5), np.full(n, 1.0)

    def replayed_count_noise() -> float:
        rng = np.random.default_rng(SEED)
        rng.random(n)  # the Poisson sample drawn first
        return float(rng.normal(0.0, z))

    seeded = release_metrics(losses, norms, z, _seeded_after_sample(n))
    assert abs(seeded["n_samples"] - replayed_count_noise() - n) < 1e-9  # control

    released = [release_metrics(losses, norms, z)["n_samples"] for _ in range(2000)]
    errors = np.asarray(released) - replayed_count_noise() - n
    assert np.sqrt(np.mean(errors**2)) > 0.5 * z
    assert np.std(released) == pytest.approx(z, rel=0.15)  # 2000 draws: SE ~1.6%
    assert len(set(released)) == len(released)


def _seeded_after_sample(n: int) -> np.random.Generator:
    """The old metric stream: seeded, with the Poisson sample drawn before the noise."""
    rng = np.random.default_rng(SEED)
    rng.random(n)
    return rng


def test_site_metric_release_differs_between_runs_with_the_same_seed(tiny_site):
    images, labels = tiny_site
    releases = []
    for _ in range(2):
        torch.manual_seed(SEED)  # the same model, so the same per-record losses: only noise differs
        privacy = SitePrivacy(DPConfig("sample", 8.0), ModelConfig(), TRAIN, len(images), 2, "site-1")
        releases.append(privacy.released_metrics(images, labels))
    assert releases[0] != releases[1]


@pytest.fixture(scope="module")
def tiny_site():
    rng = np.random.default_rng(3)
    return rng.integers(0, 255, (64, 28, 28), dtype=np.uint8), rng.integers(0, 2, (64, 1)).astype(np.float32)


# -- DP-SGD (Opacus) ------------------------------------------------------------------------
class _ZeroInput(torch.nn.Module):
    """Multiplies the input by 0: every per-record gradient is 0, so a step moves the
    weights by the DP noise alone and the noise can be read off the update."""

    def forward(self, x):
        return x * 0.0


class _SumOut(torch.nn.Module):
    def forward(self, x):
        return x.sum(1, keepdim=True)


def _noise_probe() -> torch.nn.Module:
    return torch.nn.Sequential(_ZeroInput(), torch.nn.Flatten(), torch.nn.Linear(784, 64, bias=False), _SumOut())


def test_dp_sgd_noise_and_sampling_are_not_the_seeds(tiny_site, monkeypatch):
    images, labels = tiny_site
    n, lr = len(images), 0.1
    dp = DPConfig("sample", 8.0, optimizer="sgd", learning_rate=lr, momentum=0.0)
    cfg = TrainConfig(epochs=1, batch_size=n, device="cpu", augment=False, schedule="constant", seed=SEED)
    made = []
    real = dp_sgd_module.privacy_torch_generator
    monkeypatch.setattr(dp_sgd_module, "privacy_torch_generator", lambda *a: made.append(real(*a)) or made[-1])

    def one_round() -> tuple[np.ndarray, float]:
        trainer = DPSGDTrainer(_noise_probe(), n, cfg, dp, total_rounds=1)
        assert trainer.sample_rate == 1.0 and trainer.steps_per_round == 1  # one step, every record
        start = get_weights(trainer.model)
        trainer.train_round(images, labels, seed=SEED)
        moved = get_weights(trainer.model)
        std = trainer.noise_multiplier * dp.max_grad_norm
        # w1 = w0 - lr * noise / n (mean reduction): the noise in units of its std
        return np.concatenate([np.ravel(start[k] - moved[k]) * n / (lr * std) for k in start]).astype(np.float64), std

    xi, std = one_round()
    assert np.std(xi) == pytest.approx(1.0, rel=0.1)  # 50k coordinates: SE 0.3%

    # The old noise stream: torch.Generator seeded with seed + 1, one normal per parameter.
    old = torch.Generator().manual_seed(SEED + 1)
    replay = torch.normal(0.0, 1.0, (64, 784), generator=old).numpy().ravel()
    assert _rms(xi - replay) > 0.5

    xi_again, _ = one_round()
    assert _rms(xi_again - xi) > 0.5  # same seed, same data, same start: fresh noise
    # Both the noise and the Poisson sampler got a generator per round, none keyed by the seed.
    assert len(made) == 4
    keys = {g.initial_seed() for g in made}
    assert len(keys) == 4 and not keys & {SEED, SEED + 1}
