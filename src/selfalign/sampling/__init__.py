"""Sampling: ODE/SDE samplers for flows, DDPM/DDIM for DiT, classifier-free guidance with an interval.

    x0 = sample(model, objective, noise, labels, SamplerConfig(name="euler_maruyama", steps=250,
                cfg_scale=1.8, guidance_high=0.7), generator=torch.Generator().manual_seed(0))
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..objectives.base import Objective
from . import ddpm as _ddpm
from . import flow as _flow
from .config import DDPM_SAMPLERS, DIFFUSIONS, FLOW_SAMPLERS, SAMPLERS, SamplerConfig
from .guidance import GuidedModel, model_num_classes
from .noise import Generators


def sample(model: nn.Module, objective: Objective, noise: torch.Tensor, labels: torch.Tensor | None,
           config: SamplerConfig, generator: Generators = None) -> torch.Tensor:
    """Integrate from ``noise`` (B, C, H, W) to a clean sample ``x0`` in model space.

    ``labels`` (B,) are class ids; ``None`` samples unconditionally (the null class). The model is
    called as ``model(x, objective.model_time(t), y)`` in ``noise.dtype``; every random draw
    comes from ``generator`` (given one generator per sample, sample ``k``'s draws come from
    ``generator[k]``, whatever the batch). The result has ``noise``'s dtype.
    """
    config.validate()
    config.check_objective(objective.kind)
    if labels is None:
        if config.cfg_scale != 1.0:
            raise ConfigError(f"sampler.cfg_scale={config.cfg_scale} needs class labels to guide towards; "
                              f"sample class-conditionally or set cfg_scale to 1")
        labels = torch.full((noise.shape[0],), model_num_classes(model), dtype=torch.long,
                            device=noise.device)
    if labels.shape != (noise.shape[0],):
        raise ValueError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}")
    guided = GuidedModel(model, objective, labels, config, channels=noise.shape[1], dtype=noise.dtype)
    with torch.no_grad():
        if config.name == "euler_maruyama":
            x = _flow.sde(guided, objective, noise, config, generator)
        elif config.name in ("euler", "heun"):
            x = _flow.ode(guided, noise, config)
        else:
            x = _ddpm.ddpm(guided, objective, noise, config, generator)
    return x.to(noise.dtype)


__all__ = ["sample", "SamplerConfig", "GuidedModel", "SAMPLERS", "FLOW_SAMPLERS", "DDPM_SAMPLERS",
           "DIFFUSIONS", "model_num_classes"]
