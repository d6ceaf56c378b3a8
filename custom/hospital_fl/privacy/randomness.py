"""The one source of privacy randomness: the operating system's cryptographic generator.

Differential privacy holds only if the noise is unknown to whoever sees the release. A
generator seeded from the job config's ``seed`` (which the server, every site and the job's
author hold) lets any of them regenerate the noise and subtract it: the "noisy" update
becomes the exact one. So every privacy draw (DP-SGD's Gaussian noise and Poisson
sampling, client-level noise, the metric releases' sample and noise, the site profile's
Laplace noise) starts from fresh entropy read from the OS (``secrets``, i.e. os.urandom),
drawn anew for every release, and no function here accepts a seed. Config seeds still
make everything else reproducible (data split, initial weights, augmentation).

The generators themselves are numpy's PCG64 keyed with 128 bits and torch's generator keyed
with 63 bits of OS entropy; their raw outputs never leave the site (only
their sum with a clipped update or statistic does), so the key cannot be recovered from
what is released. DP-SGD also runs Opacus's ``secure_mode`` noise (the sum of several
Gaussians), which resists the floating-point attacks on a single Gaussian draw.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

__all__ = ["ENTROPY_BITS", "privacy_rng", "privacy_torch_generator"]

ENTROPY_BITS = 128


def privacy_rng() -> np.random.Generator:
    """A fresh numpy generator keyed with 128 bits from the OS's cryptographic source."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(secrets.randbits(ENTROPY_BITS))))


def privacy_torch_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh torch generator on ``device`` keyed with 63 bits from the OS's cryptographic
    source (torch seeds are 64-bit integers)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen
