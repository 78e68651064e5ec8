"""Samplers for DDPM objectives: ancestral (learned variance) and DDIM, on a respaced chain."""
from __future__ import annotations

import torch

from ..objectives.ddpm import DDPMObjective
from .config import SamplerConfig
from .guidance import GuidedModel
from .noise import Generators, standard_normal


def ddpm(guided: GuidedModel, objective: DDPMObjective, noise: torch.Tensor, config: SamplerConfig,
         generator: Generators) -> torch.Tensor:
    """ADM's ``p_sample_loop`` / ``ddim_sample_loop`` over ``respacing`` (default ``str(steps)``).

    The model sees the original step index of each respaced step; the guidance interval is
    tested on ``original_step / T``.
    """
    chain = objective.respaced(config.respacing or str(config.steps))
    x = noise.to(torch.float32)
    draws_noise = config.name == "ddpm" or config.eta > 0
    for i in reversed(range(chain.num_timesteps)):
        step = int(chain.timestep_map[i])     # a CPU table: no device sync per step
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        original = torch.full_like(t, step)
        out = guided(x, original, step / objective.num_timesteps)
        z = standard_normal(x, generator) if draws_noise else torch.zeros_like(x)
        if config.name == "ddpm":
            x = chain.p_sample(out, x, t, z, config.clip_denoised)
        else:
            x = chain.ddim_sample(out, x, t, z, config.eta, config.clip_denoised)
    return x
