"""Flow / stochastic-interpolant objective (SiT): velocity prediction on a linear or cosine path.

``x_t = alpha_t x0 + sigma_t eps``, t = 0 data, t = 1 noise. The conversions between the
velocity and the noise, score and clean-data predictions live here and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..choices import check_choices
from .base import Objective, expand_time, mean_flat

FlowPath = Literal["linear", "cosine"]
TimeSampling = Literal["uniform", "lognormal"]


@dataclass
class FlowConfig:
    path: FlowPath = "linear"       # "linear" (alpha=1-t, sigma=t) or "cosine" (GVP)
    time_sampling: TimeSampling = "uniform"   # "lognormal": t = sigmoid(N(mean, std))
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0

    def validate(self) -> None:
        check_choices(self, "objective")
        if self.lognormal_std <= 0:
            raise ValueError(f"objective.lognormal_std must be > 0, got {self.lognormal_std}")


class FlowObjective(Objective):
    kind = "flow"

    def __init__(self, config: FlowConfig | None = None):
        self.config = config or FlowConfig()
        self.config.validate()

    # -- the path ---------------------------------------------------------------------------
    def coefficients(self, t: torch.Tensor):
        """(alpha_t, sigma_t, d alpha/dt, d sigma/dt)."""
        if self.config.path == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))

    def interpolate(self, x0, noise, t):
        alpha, sigma, _, _ = self.coefficients(expand_time(t, x0))
        return alpha * x0 + sigma * noise

    def velocity(self, x0, noise, t):
        """The regression target ``d x_t / d t``."""
        _, _, d_alpha, d_sigma = self.coefficients(expand_time(t, x0))
        return d_alpha * x0 + d_sigma * noise

    # -- conversions from a velocity prediction ---------------------------------------------
    def velocity_to_x0_noise(self, v, x_t, t):
        """Solve ``x_t = a x0 + s eps`` and ``v = a' x0 + s' eps`` for (x0, eps)."""
        a, s, da, ds = self.coefficients(expand_time(t, x_t))
        det = a * ds - s * da               # = 1 for linear, pi/2 for cosine: never zero
        return (ds * x_t - s * v) / det, (a * v - da * x_t) / det

    def velocity_to_noise(self, v, x_t, t):
        return self.velocity_to_x0_noise(v, x_t, t)[1]

    def velocity_to_x0(self, v, x_t, t):
        return self.velocity_to_x0_noise(v, x_t, t)[0]

    def velocity_to_score(self, v, x_t, t):
        """``grad log p_t(x_t) = -eps_hat / sigma_t`` (undefined at t = 0)."""
        _, s, _, _ = self.coefficients(expand_time(t, x_t))
        return -self.velocity_to_noise(v, x_t, t) / s

    def score_to_velocity(self, score, x_t, t):
        a, s, da, ds = self.coefficients(expand_time(t, x_t))
        noise = -score * s
        x0 = (x_t - s * noise) / a
        return da * x0 + ds * noise

    # -- training ---------------------------------------------------------------------------
    def sample_time(self, batch_size, device, generator=None):
        if self.config.time_sampling == "uniform":
            return torch.rand(batch_size, device=device, generator=generator)
        normal = torch.randn(batch_size, device=device, generator=generator)
        return torch.sigmoid(normal * self.config.lognormal_std + self.config.lognormal_mean)

    def model_time(self, t):
        return t

    def loss(self, model_output, x0, noise, t, x_t):
        return mean_flat((model_output.float() - self.velocity(x0, noise, t).float()) ** 2)

    def earlier_time(self, t, k_max, generator=None):
        k = torch.rand(t.shape, device=t.device, generator=generator) * k_max
        return (t - k).clamp(0.0, 1.0)
