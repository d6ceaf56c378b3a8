"""Sample-level DP-SGD for the CXR classifiers, through Opacus.

DP-SGD is the one training loop (hospital_fl.training.loops.train_local) with its sampler
and optimiser swapped, as Opacus's make_private does: ``PoissonBatches`` draws every record
with probability q = batch/n at each step (an empty sample is still a step, noise only),
and ``NoisyStep`` clips every record's gradient to ``max_grad_norm`` and adds Gaussian
noise through Opacus's DPOptimizer. The noise is calibrated (hospital_fl.privacy.release_plan)
so that the whole job (all rounds x local epochs), composed with the job's other releases
from the same records (the metric releases), meets its target epsilon: the target is the
total, never a little more.

The Opacus GradSampleModule wraps the network once per job and lives across all rounds:
each round loads the received global weights into the wrapped network and trains it, and
what leaves the site is the inner network's state dict, with the names every site and the
server share (no ``_module.`` prefix, nothing rebuilt).

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
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator

from hospital_fl.errors import InputError
from hospital_fl.privacy.accounting import Release
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.randomness import privacy_torch_generator
from hospital_fl.privacy.release_plan import DPSGDPlan, plan_dp_sgd
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import Proximal, Regime, TrainResult, resolve_device, train_local

__all__ = ["DPSGDTrainer", "NoisyStep", "PoissonBatches", "make_dp_valid"]


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


@dataclass
class PoissonBatches:
    """Opacus's Poisson sampler: each of an epoch's steps draws every record with
    probability ``sampler.sample_rate``; an empty draw is still a step."""

    sampler: UniformWithReplacementSampler
    min_records: int = 0
    units_per_batch: int = 1  # the schedule advances by steps: an epoch is len(sampler) of them

    @property
    def epoch_units(self) -> int:
        return len(self.sampler)

    def epoch(self) -> Iterator[torch.Tensor]:
        for idx in self.sampler:
            yield torch.as_tensor(idx, dtype=torch.long)


class NoisyStep:
    """Opacus's DPOptimizer over the GradSampleModule: each step clips every record's
    gradient, sums, adds Gaussian noise and averages (``pre_step``), then FedProx's
    data-independent gradient, then the base optimiser's step.

    Always fp32 (``amp`` False): under a GradScaler the per-record clipping would act on
    scaled gradients (the clip bound would not be ``max_grad_norm``), and the scaler skips
    a step whose gradients overflow, a data-dependent choice the accountant does not count.

    Args:
        module: the wrapped network.
        dp: clip norm and the base optimiser (AdamW or SGD with momentum).
        noise_multiplier: noise std / clip norm.
        expected_batch_size: q * n, what the noisy sum is divided by.
        weight_decay: AdamW's weight decay.
        device: where the noise is drawn.
    """

    amp = False

    def __init__(
        self,
        module: GradSampleModule,
        dp: DPConfig,
        noise_multiplier: float,
        expected_batch_size: int,
        weight_decay: float,
        device: torch.device,
    ):
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        if dp.optimizer == "sgd":
            base = torch.optim.SGD(self.params, lr=dp.learning_rate, momentum=dp.momentum)
        else:
            base = torch.optim.AdamW(self.params, lr=dp.learning_rate, weight_decay=weight_decay)
        self.optimizer = DPOptimizer(
            base,
            noise_multiplier=noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=privacy_torch_generator(device),
            secure_mode=True,  # a sum of Gaussians: resists floating-point attacks on one draw
        )

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            # Opacus hooks warn that inputs need no grad; only parameters do.
            warnings.simplefilter("ignore", UserWarning)
            return self.module(batch)

    def take(self, loss: torch.Tensor | None, prox: Proximal | None) -> torch.Tensor | None:
        self.optimizer.zero_grad(set_to_none=True)
        if loss is None:
            # An empty Poisson sample is still a step the accountant counts: noise only.
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                loss.backward()
        if self.optimizer.pre_step():  # clip per record, add noise, average
            if prox is not None:
                prox.add_gradient()
            self.optimizer.original_optimizer.step()
        return loss


class DPSGDTrainer:
    """DP-SGD training of one model at one site for a whole job.

    Args:
        model: the site's network (kept, wrapped, for every round of the job).
        n_samples: the site's training records (sets the sample rate).
        train_cfg: batch size (the expected Poisson batch), epochs per round, schedule,
            augmentation, device.
        dp: target epsilon, delta, clip norm, accountant, optimiser and learning rate.
        total_rounds: rounds in the job, so noise covers all of them.
        alongside: the job's other releases from the same records over all its rounds (the
            metric releases); the training noise is the smallest whose composition with
            them stays within ``dp.target_epsilon``.
        plan: the job's DP-SGD plan when already calibrated (plan_site_releases makes
            one); None: calibrated here from the arguments above.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        n_samples: int,
        train_cfg: TrainConfig,
        dp: DPConfig,
        total_rounds: int,
        alongside: tuple[Release, ...] = (),
        plan: DPSGDPlan | None = None,
    ):
        if plan is None:
            plan = plan_dp_sgd(n_samples, train_cfg.batch_size, train_cfg.epochs, dp, total_rounds, alongside)
        elif plan.total_rounds != total_rounds:
            raise ValueError(f"the DP-SGD plan covers {plan.total_rounds} rounds, the job has {total_rounds}")
        self.dp, self.train_cfg, self.plan = dp, train_cfg, plan
        self.n_samples = n_samples
        self.module = GradSampleModule(make_dp_valid(model), loss_reduction="mean")

    @property
    def model(self) -> torch.nn.Module:
        """The plain network inside the wrapper: its state dict is what sites exchange."""
        return self.module._module

    @property
    def noise_multiplier(self) -> float:
        return self.plan.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.plan.sample_rate

    @property
    def steps_per_round(self) -> int:
        return self.plan.steps_per_round

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    def planned_release(self) -> Release:
        return self.plan.release(self.plan.total_rounds)

    def round_release(self) -> Release:
        return self.plan.release(1)

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
        start = time.perf_counter()
        # The schedule peaks at DP's learning rate; class balancing off (see the module
        # docstring); fp32 (see NoisyStep).
        cfg = dataclasses.replace(self.train_cfg, lr=self.dp.learning_rate, seed=seed, balance_classes=False, amp=False)
        device = resolve_device(cfg.device)
        self.module.to(device).train()
        step = NoisyStep(
            self.module,
            self.dp,
            self.noise_multiplier,
            expected_batch_size=max(1, round(self.sample_rate * self.n_samples)),
            weight_decay=cfg.weight_decay,
            device=device,
        )
        sampler = UniformWithReplacementSampler(
            num_samples=self.n_samples,
            sample_rate=self.sample_rate,
            generator=privacy_torch_generator(),
            steps=self.steps_per_round // cfg.epochs,
        )
        result = train_local(
            self.model,
            images,
            labels,
            cfg,
            anchor=anchor,
            fedprox_mu=fedprox_mu,
            epoch_offset=epoch_offset,
            total_epochs=total_epochs,
            regime=Regime(PoissonBatches(sampler), step),
        )
        step.optimizer.zero_grad(set_to_none=True)
        self.module.cpu()
        if result.steps != self.steps_per_round:  # the accountant counts exactly these
            raise RuntimeError(f"DP-SGD took {result.steps} steps, planned {self.steps_per_round}")
        return dataclasses.replace(result, seconds=time.perf_counter() - start)
