"""Per-record loss and gradient norm of a model over a dataset (torch.func, no training)."""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from hospital_fl.training.loops import fit_to_model, to_tensor

__all__ = ["per_record_loss_and_grad_norm"]


def per_record_loss_and_grad_norm(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """(losses, gradient L2 norms), one per record, in eval mode (no dropout)."""
    if len(images) == 0:
        return np.zeros(0), np.zeros(0)
    model = model.cpu().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, x, y):
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y.unsqueeze(0))

    grad_and_loss = vmap(grad(loss_one, has_aux=False), in_dims=(None, 0, 0))
    x_all = to_tensor(images)
    y_all = torch.as_tensor(labels, dtype=torch.float32).reshape(len(labels), -1)
    losses, norms = [], []
    with torch.no_grad():
        for i in range(0, len(x_all), batch_size):
            xb, yb = fit_to_model(x_all[i : i + batch_size], model), y_all[i : i + batch_size]
            logits = model(xb).float()
            losses.append(
                torch.nn.functional.binary_cross_entropy_with_logits(logits, yb, reduction="none").mean(1).numpy()
            )
    for i in range(0, len(x_all), batch_size):
        xb, yb = fit_to_model(x_all[i : i + batch_size], model), y_all[i : i + batch_size]
        grads = grad_and_loss(params, xb, yb)
        sq = sum(g.reshape(len(xb), -1).pow(2).sum(1) for g in grads.values())
        norms.append(sq.sqrt().detach().numpy())
    return np.concatenate(losses), np.concatenate(norms)
