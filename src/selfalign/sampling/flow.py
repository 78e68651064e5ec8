"""Samplers for flow objectives: Euler and Heun ODE, Euler-Maruyama SDE (REPA/SRA release).

The state is kept in float64 as the released samplers do (float32 on MPS, which has no float64);
the network sees the noise's dtype.
Velocity -> score goes through :class:`~selfalign.objectives.FlowObjective` (one place).
"""
from __future__ import annotations

import torch

from ..objectives.flow import FlowObjective
from .config import SamplerConfig
from .guidance import GuidedModel
from .noise import Generators, standard_normal


def state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _velocity(guided: GuidedModel, x: torch.Tensor, t: float, position: float) -> torch.Tensor:
    t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    out = guided(x, t_batch, position)
    return out[:, :x.shape[1]]    # a learned-sigma SiT head carries extra channels: unused


def ode(guided: GuidedModel, noise: torch.Tensor, config: SamplerConfig) -> torch.Tensor:
    """Euler (or Heun) from t = 1 to 0 on ``steps`` uniform steps.

    Heun corrects every step but the last (which ends at t = 0); as released, a step's guidance
    decision is taken at its start time ``t_cur`` for both of its evaluations.
    """
    heun = config.name == "heun"
    times = torch.linspace(1.0, 0.0, config.steps + 1, dtype=torch.float64).tolist()
    x = noise.to(state_dtype(noise.device))
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        d_cur = _velocity(guided, x, t_cur, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < config.steps - 1:
            d_next = _velocity(guided, x_next, t_next, t_cur)
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


def sde(guided: GuidedModel, objective: FlowObjective, noise: torch.Tensor, config: SamplerConfig,
        generator: Generators) -> torch.Tensor:
    """Euler-Maruyama for ``dx = [v - w(t)/2 * score] dt + sqrt(w(t)) dW`` backwards in time.

    Stochastic steps on ``linspace(1, last_step, steps)``, then one step of the same drift,
    without noise, from ``last_step`` to 0: ``steps`` network evaluations in all.
    """
    times = torch.linspace(1.0, config.last_step, config.steps, dtype=torch.float64).tolist() + [0.0]
    x = noise.to(state_dtype(noise.device))

    def drift(x, t_cur):
        v = _velocity(guided, x, t_cur, t_cur)
        t = torch.full((x.shape[0],), t_cur, dtype=x.dtype, device=x.device)
        w = 2.0 * t_cur if config.diffusion == "2t" else float(objective.coefficients(t[:1])[1])
        return v - 0.5 * w * objective.velocity_to_score(v, x, t), w

    for t_cur, t_next in zip(times[:-2], times[1:-1]):
        dt = t_next - t_cur
        d, w = drift(x, t_cur)
        dw = standard_normal(x, generator) * abs(dt) ** 0.5
        x = x + d * dt + w ** 0.5 * dw
    d, _ = drift(x, times[-2])
    return x + (times[-1] - times[-2]) * d
