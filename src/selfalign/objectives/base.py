"""The interface every training objective implements (flow interpolants, DDPM).

Time is in the objective's own units (continuous ``[0, 1]`` for flows, integer steps for DDPM),
always with larger = noisier (:mod:`selfalign.conventions`). ``model_time`` maps it to what the
backbone's timestep embedder receives.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a time of shape (B,) -- or one already shaped like ``x`` -- against ``x``."""
    if t.dim() == x.dim():
        return t
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


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
