"""Classifier-free guidance with a guidance interval, around any backbone ``model(x, t, y)``."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..objectives.base import Objective
from .config import SamplerConfig


def model_num_classes(model: nn.Module) -> int:
    """``num_classes`` of a backbone, also through DDP (``.module``) or ``torch.compile`` wrappers."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "num_classes"):
            return int(config.num_classes)
    raise ValueError("classifier-free guidance needs model.config.num_classes (the null label id)")


class GuidedModel:
    """Evaluates the network for the samplers, in the objective's time.

    Inside ``[guidance_low, guidance_high]`` (and with ``cfg_scale != 1``) it runs one batch of
    2B (conditional, then null labels) and returns ``uncond + s * (cond - uncond)`` on the first
    ``channels`` output channels -- all data channels, or the legacy first N -- with the other
    channels (e.g. DiT's variance) taken from the conditional half, as DiT does. Elsewhere it runs
    the conditional batch of B only.
    """

    def __init__(self, model: nn.Module, objective: Objective, labels: torch.Tensor,
                 config: SamplerConfig, channels: int, dtype: torch.dtype):
        self.model, self.objective, self.labels, self.dtype = model, objective, labels, dtype
        self.scale, self.low, self.high = config.cfg_scale, config.guidance_low, config.guidance_high
        self.channels = config.legacy_cfg_channels or channels
        self.null = None
        if self.scale != 1.0:
            self.null = torch.full_like(labels, model_num_classes(model))

    def guided_at(self, position: float) -> bool:
        """Whether guidance applies at interval coordinate ``position`` (flow t, DDPM step/T)."""
        return self.scale != 1.0 and self.low <= position <= self.high

    def __call__(self, x: torch.Tensor, t: torch.Tensor, position: float) -> torch.Tensor:
        """Network output at objective time ``t`` (B,), in ``x``'s dtype."""
        x_in, t_in = x.to(self.dtype), self.objective.model_time(t).to(self.dtype)
        if not self.guided_at(position):
            return self.model(x_in, t_in, self.labels).to(x.dtype)
        out = self.model(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]),
                         torch.cat([self.labels, self.null])).to(x.dtype)
        cond, uncond = out.chunk(2)
        k = self.channels
        if k > out.shape[1]:
            raise ConfigError(f"sampler.legacy_cfg_channels={k} exceeds the model's {out.shape[1]} "
                              f"output channels")
        mixed = uncond[:, :k] + self.scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([mixed, cond[:, k:]], dim=1)
