"""SCAFFOLD's control variates at a site (Karimireddy et al. 2020, option II), on plain arrays.

The server sends its control c; the site keeps its own c_i across rounds. During local
training every step is corrected by (c - c_i); afterwards
c_i+ = c_i - c + (x - y) / (sum of the step sizes), and the site sends c_i+ - c_i, which
the server averages into c. Same maths as FLARE's PTScaffoldHelper, with the summed
learning rate in place of steps x final lr so a decaying schedule is handled exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["correction", "control_update", "zero_controls"]


def zero_controls(weights: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(weights[k], dtype=np.float32) for k in names}


def correction(c_global: Mapping[str, np.ndarray], c_local: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The per-step gradient correction c - c_i, as tensors."""
    return {k: torch.as_tensor(np.asarray(c_global[k]) - np.asarray(c_local[k])) for k in c_global}


def control_update(
    c_global: Mapping[str, np.ndarray],
    c_local: Mapping[str, np.ndarray],
    global_weights: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    lr_sum: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The site's new control c_i+ and the difference c_i+ - c_i it sends."""
    if lr_sum <= 0:
        raise ValueError(f"lr_sum must be > 0 (no training step was taken), got {lr_sum}")
    new, delta = {}, {}
    for k in c_global:
        drift = (np.asarray(global_weights[k], np.float32) - np.asarray(trained[k], np.float32)) / np.float32(lr_sum)
        new[k] = (np.asarray(c_local[k]) - np.asarray(c_global[k]) + drift).astype(np.float32)
        delta[k] = new[k] - np.asarray(c_local[k], np.float32)
    return new, delta
