"""The interface every training objective implements (flow interpolants, DDPM).

Time is in the objective's own units (continuous ``[0, 1]`` for flows, integer steps for DDPM),
always with larger = noisier (:mod:`selfalign.conventions`). ``model_time`` maps it to what the
backbone's timestep embedder receives.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


def expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a time against ``x``: (B,) per example, (B, N) per token, or already shaped like ``x``.

    A per-token time of an image ``x`` (B, C, H, W) becomes a per-pixel map (B, 1, H, W): token
    ``n`` covers the patch at row ``n // w``, column ``n % w`` of the (h, w) token grid, the
    backbone's patch order.
    """
    if t.dim() == x.dim():
        return t
    if t.dim() == 2 and x.dim() == 4:
        return token_time_to_pixels(t, x.shape[-2:])
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def token_time_to_pixels(t: torch.Tensor, size) -> torch.Tensor:
    """Per-token time (B, N) -> per-pixel time (B, 1, H, W) for a square-patch token grid."""
    (b, n), (h, w) = t.shape, size
    grid_h = round(math.sqrt(n * h / w))
    grid_w = n // grid_h if grid_h else 0
    if grid_h * grid_w != n or h % grid_h or w % grid_w or h // grid_h != w // grid_w:
        raise ValueError(f"per-token time with {n} tokens does not tile a {h}x{w} input")
    p = h // grid_h
    return t.reshape(b, 1, grid_h, grid_w).repeat_interleave(p, 2).repeat_interleave(p, 3)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.dim())))


class Objective(ABC):
    """What a diffusion objective provides to the trainer, the regularizers and the samplers."""

    #: "flow" or "ddpm"; samplers and presets dispatch on it.
    kind: str = ""

    @abstractmethod
    def sample_time(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times, shape (B,)."""

    @abstractmethod
    def interpolate(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noisy input ``x_t`` built from data ``x0`` and ``noise``."""

    @abstractmethod
    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The value the backbone's timestep embedder receives for time ``t``."""

    @abstractmethod
    def loss(self, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Per-example generative loss, shape (B,)."""

    @abstractmethod
    def earlier_time(self, t: torch.Tensor, k_max: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """SRA's teacher time: ``t - k`` clamped to the valid range, ``k ~ U[0, k_max)`` per example.

        ``k_max`` is a fraction of the whole time range (0.2 = 200 of 1000 DDPM steps).
        """
