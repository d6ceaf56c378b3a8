"""FedOpt's server step (Reddi et al. 2021): the averaged update used as a negative gradient.

The FLARE job runs FLARE's own FedOpt controller with ``flare_optimizer_args()``; the
in-process federation runs ``ServerOptimizer``, which builds the same torch optimiser the
same way (one tensor per trainable weight, grad = -mean update, one step per round), so
both follow one update rule. Non-trainable entries (buffers) take the plain mean update,
as FLARE does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from hospital_fl.errors import InputError

__all__ = ["ServerOptimizerConfig", "ServerOptimizer", "Yogi"]

_PATHS = {
    "adam": "torch.optim.Adam",
    "yogi": "hospital_fl.aggregation.server_optimizer.Yogi",
    "sgdm": "torch.optim.SGD",
}


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al. 2018): Adam whose second moment moves additively, as FedYogi uses."""

    def __init__(self, params, lr: float = 1e-2, betas=(0.9, 0.99), eps: float = 1e-3):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, group["eps"] ** 2)
                g = p.grad
                state["m"].mul_(b1).add_(g, alpha=1 - b1)
                g2 = g * g
                state["v"].sub_((1 - b2) * torch.sign(state["v"] - g2) * g2)
                p.sub_(group["lr"] * state["m"] / (state["v"].sqrt() + group["eps"]))


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """The server optimiser of FedOpt.

    Attributes:
        kind: adam (FedAdam), yogi (FedYogi) or sgdm (FedAvgM: SGD with server momentum).
        lr: server learning rate (sgdm: 1.0 with momentum 0 is plain FedAvg).
        momentum: sgdm's momentum.
        betas / eps: Adam and Yogi moments; eps (tau in the paper) bounds the adaptivity.
    """

    kind: str = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-3

    def __post_init__(self):
        if self.kind not in _PATHS:
            raise InputError("server_optimizer.kind", self.kind, f"it must be one of {tuple(_PATHS)}", "use adam")
        if not 0 < self.lr <= 10:
            raise InputError("server_optimizer.lr", self.lr, "it must lie in (0, 10]", "use 0.01 (adam) or 1.0 (sgdm)")
        if not 0 <= self.momentum < 1:
            raise InputError("server_optimizer.momentum", self.momentum, "it must lie in [0, 1)", "use 0.9")
        if not self.eps > 0:
            raise InputError("server_optimizer.eps", self.eps, "it must be > 0", "use 1e-3")

    def flare_optimizer_args(self) -> dict:
        """``optimizer_args`` for FLARE's FedOpt controller (it adds ``params`` itself)."""
        if self.kind == "sgdm":
            args = {"lr": self.lr, "momentum": self.momentum}
        else:
            args = {"lr": self.lr, "betas": list(self.betas), "eps": self.eps}
        return {"path": _PATHS[self.kind], "args": args}

    def build(self, params) -> torch.optim.Optimizer:
        args = self.flare_optimizer_args()["args"]
        if self.kind == "sgdm":
            return torch.optim.SGD(params, **args)
        return (torch.optim.Adam if self.kind == "adam" else Yogi)(params, **{**args, "betas": self.betas})


class ServerOptimizer:
    """Applies FedOpt steps to plain weights, keeping the optimiser state across rounds."""

    def __init__(self, cfg: ServerOptimizerConfig, weights: Mapping[str, np.ndarray], trainable: list[str]):
        self.trainable = list(trainable)
        self.tensors = {
            k: torch.nn.Parameter(torch.as_tensor(np.array(weights[k], np.float32))) for k in self.trainable
        }
        self.optimizer = cfg.build(list(self.tensors.values()))

    def step(self, weights: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            for k, t in self.tensors.items():
                t.copy_(torch.as_tensor(np.asarray(weights[k], np.float32)))
                t.grad = -torch.as_tensor(np.asarray(update[k], np.float32))
        self.optimizer.step()
        out = {
            k: (np.asarray(weights[k]) + np.asarray(update[k])).astype(np.asarray(weights[k]).dtype) for k in weights
        }
        for k, t in self.tensors.items():
            out[k] = t.detach().numpy().astype(np.asarray(weights[k]).dtype)
        return out
