"""Sample-level DP-SGD for the CXR classifiers, through Opacus.

The Opacus GradSampleModule wraps the network once per job and lives across all rounds:
each round loads the received global weights into the wrapped network and trains it, and
what leaves the site is the inner network's state dict, with the names every site and the
server share (no ``_module.`` prefix, nothing rebuilt). Each optimiser step draws a
Poisson sample (rate q = batch/n), clips every record's gradient to ``max_grad_norm`` and
adds Gaussian noise calibrated so the whole job (all rounds x local epochs), composed with
the job's other releases from the same records (the metric releases), meets its target
epsilon: the target is the total, never a little more.

The Poisson sample and the noise come from generators keyed from the OS's cryptographic
source at every round (hospital_fl.privacy.randomness), never from the job's seed, which
only drives augmentation; the noise is Opacus's ``secure_mode`` sum of Gaussians.

FedProx under DP: the proximal term's gradient mu*(w - w_global) does not depend on any
record, so it is added after clipping and noising (post-processing, no privacy cost).
Class balancing is off under DP: a loss weight computed from the site's label counts
would be an unaccounted function of its data.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator

from hospital_fl.errors import InputError
from hospital_fl.privacy.accounting import Release, calibrate_noise, poisson_schedule
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.randomness import privacy_torch_generator
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import (
    TrainResult,
    augment_batch,
    augmenter,
    fit_to_model,
    resolve_device,
    scheduled_lr,
    to_tensor,
)

__all__ = ["DPSGDTrainer", "make_dp_valid"]


def make_dp_valid(model: torch.nn.Module) -> torch.nn.Module:
    """The model with layers DP-SGD cannot handle replaced (BatchNorm -> GroupNorm), or an
    error naming what is left."""
    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise InputError(
            "model",
            type(model).__name__,
            f"DP-SGD cannot train it: {problems[0]}",
            "use a GroupNorm/InstanceNorm model",
        )
    return model


class DPSGDTrainer:
    """DP-SGD training of one model at one site for a whole job.

    Args:
        model: the site's network (kept, wrapped, for every round of the job).
        n_samples: the site's training records (sets the sample rate).
        train_cfg: batch size (the expected Poisson batch), epochs per round, optimiser.
        dp: target epsilon, delta, clip norm, accountant.
        total_rounds: rounds in the job, so noise covers all of them.
        alongside: the job's other releases from the same records over all its rounds (the
            metric releases); the training noise is the smallest whose composition with
            them stays within ``dp.target_epsilon``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        n_samples: int,
        train_cfg: TrainConfig,
        dp: DPConfig,
        total_rounds: int,
        alongside: tuple[Release, ...] = (),
    ):
        self.dp, self.train_cfg = dp, train_cfg
        self.sample_rate, self.steps_per_round = poisson_schedule(n_samples, train_cfg.batch_size, train_cfg.epochs)
        self.total_steps = self.steps_per_round * total_rounds
        q, steps = self.sample_rate, self.total_steps
        self.noise_multiplier = calibrate_noise(
            dp.target_epsilon, dp.delta, lambda z: [(z, q, steps), *alongside], dp.accountant
        )
        self.n_samples = n_samples
        self.module = GradSampleModule(make_dp_valid(model), loss_reduction="mean")

    @property
    def model(self) -> torch.nn.Module:
        """The plain network inside the wrapper: its state dict is what sites exchange."""
        return self.module._module

    def planned_release(self) -> Release:
        return (self.noise_multiplier, self.sample_rate, self.total_steps)

    def round_release(self) -> Release:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)

    def train_round(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        seed: int,
        anchor: dict[str, torch.Tensor] | None = None,
        fedprox_mu: float = 0.0,
        epoch_offset: int = 0,
        total_epochs: int | None = None,
    ) -> TrainResult:
        """One round of local DP-SGD; exactly ``steps_per_round`` noisy steps.

        ``seed`` drives augmentation only: sampling and noise come from the OS."""
        if len(images) != self.n_samples:
            raise ValueError(f"the site's data changed within the job: {len(images)} records, planned {self.n_samples}")
        cfg = self.train_cfg
        start = time.perf_counter()
        device = resolve_device(cfg.device)
        x = to_tensor(images)
        y = torch.as_tensor(labels, dtype=torch.float32).reshape(len(labels), -1)
        self.module.to(device).train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        named = dict(self.model.named_parameters())
        if anchor is not None and fedprox_mu > 0:
            anchor = {k: v.detach().to(device) for k, v in anchor.items()}
        if self.dp.optimizer == "sgd":
            base = torch.optim.SGD(params, lr=self.dp.learning_rate, momentum=self.dp.momentum)
        else:
            base = torch.optim.AdamW(params, lr=self.dp.learning_rate, weight_decay=cfg.weight_decay)
        schedule = dataclasses.replace(cfg, lr=self.dp.learning_rate)
        optimizer = DPOptimizer(
            base,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            expected_batch_size=max(1, round(self.sample_rate * self.n_samples)),
            loss_reduction="mean",
            generator=privacy_torch_generator(device),
            secure_mode=True,  # a sum of Gaussians: resists floating-point attacks on one draw
        )
        sampler = UniformWithReplacementSampler(
            num_samples=self.n_samples, sample_rate=self.sample_rate, generator=privacy_torch_generator()
        )
        aug = augmenter(seed) if cfg.augment else None
        loss_fn = torch.nn.BCEWithLogitsLoss()
        total = (total_epochs or cfg.epochs) * len(sampler)
        step = epoch_offset * len(sampler)
        losses = []
        for _ in range(cfg.epochs):
            for idx in sampler:
                for group in optimizer.param_groups:
                    group["lr"] = scheduled_lr(schedule, step / total)
                step += 1
                optimizer.zero_grad(set_to_none=True)
                if len(idx) == 0:
                    # An empty Poisson sample is still a step the accountant counts: noise only.
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=device)
                else:
                    idx = torch.as_tensor(idx)
                    xb = fit_to_model(x[idx], self.model)
                    if aug is not None:
                        xb = augment_batch(aug, xb)
                    with warnings.catch_warnings():
                        # Opacus hooks warn that inputs need no grad; only parameters do.
                        warnings.simplefilter("ignore", UserWarning)
                        loss = loss_fn(self.module(xb.to(device)).float(), y[idx].to(device))
                        loss.backward()
                    losses.append(float(loss.detach()))
                if optimizer.pre_step():  # clip per record, add noise, average
                    if anchor is not None and fedprox_mu > 0:
                        with torch.no_grad():
                            for name, p in named.items():
                                if name in anchor and p.grad is not None:
                                    p.grad.add_(fedprox_mu * (p - anchor[name]))
                    optimizer.original_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.module.cpu()
        return TrainResult(
            steps=self.steps_per_round,
            mean_loss=float(np.mean(losses)) if losses else math.nan,
            seconds=time.perf_counter() - start,
        )
