"""Held-out denoising loss: the generative loss on unseen data at fixed times with fixed noise.

Every model is scored on the same images, labels, noise and times, so two models' per-example
losses are paired and their difference has a meaningful standard error. Times are fractions of
the objective's range (flow: t itself; DDPM: ``round(f * (T - 1))``).
"""
from __future__ import annotations

import math

import torch

DEFAULT_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def objective_times(objective, fraction: float, count: int, device) -> torch.Tensor:
    if objective.kind == "ddpm":
        steps = objective.num_timesteps
        return torch.full((count,), round(fraction * (steps - 1)), dtype=torch.long, device=device)
    return torch.full((count,), fraction, device=device)


@torch.no_grad()
def heldout_losses(model, objective, images: torch.Tensor, labels: torch.Tensor,
                   times=DEFAULT_TIMES, seed: int = 0, batch_size: int = 250,
                   device=torch.device("cpu")) -> torch.Tensor:
    """Per-example losses ``(len(times), N)`` of ``model`` (conditional on the true labels)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=gen)            # one noise per image, every time
    out = torch.empty(len(times), images.shape[0])
    was_training = model.training
    model.eval()
    for i, fraction in enumerate(times):
        for start in range(0, images.shape[0], batch_size):
            x0 = images[start:start + batch_size].to(device)
            eps = noise[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            t = objective_times(objective, fraction, x0.shape[0], device)
            x_t = objective.interpolate(x0, eps, t)
            prediction = model(x_t, objective.model_time(t), y)
            out[i, start:start + x0.shape[0]] = objective.loss(prediction.float(), x0, eps, t, x_t).cpu()
    model.train(was_training)
    return out


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``b - a`` over examples (each averaged over times) and its standard error."""
    diff = (b.mean(0) - a.mean(0)).double()
    return float(diff.mean()), float(diff.std(unbiased=True) / math.sqrt(diff.numel()))
