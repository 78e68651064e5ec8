"""What a sampling run is: the sampler, its steps and classifier-free guidance."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..choices import check_choices
from ..conventions import MAX_CHANNELS, MAX_STEPS
from ..errors import ConfigError

FlowSampler = Literal["euler", "heun", "euler_maruyama"]
DDPMSampler = Literal["ddpm", "ddim"]
SamplerName = Literal[FlowSampler, DDPMSampler]
Diffusion = Literal["2t", "sigma"]
FLOW_SAMPLERS = get_args(FlowSampler)
DDPM_SAMPLERS = get_args(DDPMSampler)
SAMPLERS = get_args(SamplerName)
DIFFUSIONS = get_args(Diffusion)


@dataclass
class SamplerConfig:
    """Sampler choice and guidance; read by :func:`selfalign.sampling.sample`.

    Flow objectives: ``euler`` / ``heun`` (ODE on ``linspace(1, 0, steps + 1)``) and
    ``euler_maruyama`` (SDE on ``linspace(1, last_step, steps)`` then one deterministic step
    to 0: ``steps`` network evaluations, as the REPA/SRA release). DDPM objectives: ``ddpm``
    (ancestral, learned variance) and ``ddim`` (``eta``) on ``steps`` respaced steps.

    Guidance ``out = uncond + cfg_scale * (cond - uncond)`` acts on all channels, only where
    the time lies in ``[guidance_low, guidance_high]`` (flow ``t``; DDPM ``step / T``); elsewhere
    the unconditional pass is not computed.
    """

    name: SamplerName = "euler_maruyama"
    steps: int = 250
    cfg_scale: float = 1.0          # 1.0: no guidance (and no unconditional pass)
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    diffusion: Diffusion = "2t"     # SDE diffusion w(t): "2t" (released code) or "sigma" (sigma_t)
    last_step: float = 0.04         # SDE: stochastic steps end here, then one deterministic step
    eta: float = 0.0                # DDIM: 0 deterministic, 1 ancestral-like
    respacing: str = ""             # DDPM/DDIM: "" = str(steps) as DiT; or "ddim50", "10,20,30"
    clip_denoised: bool = False     # DDPM/DDIM: clip predicted x0 to [-1, 1] (pixels; DiT: False)
    legacy_cfg_channels: int | None = None   # guide only the first N channels (DiT/SiT code: 3)

    def validate(self) -> None:
        check_choices(self, "sampler")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"sampler.steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if self.cfg_scale < 0:
            raise ValueError(f"sampler.cfg_scale must be >= 0, got {self.cfg_scale}")
        for key in ("guidance_low", "guidance_high"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"sampler.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.guidance_low > self.guidance_high:
            raise ValueError(f"sampler.guidance_low={self.guidance_low} > sampler.guidance_high="
                             f"{self.guidance_high}: the guidance interval is reversed")
        if not 0.0 < self.last_step < 1.0:
            raise ValueError(f"sampler.last_step must be in (0, 1), got {self.last_step}")
        if not 0.0 <= self.eta <= 1.0:     # above 1 the DDIM step takes the root of a negative number
            raise ValueError(f"sampler.eta must be in [0, 1] (0: deterministic, 1: ancestral-like), got {self.eta}")
        if self.legacy_cfg_channels is not None and not 1 <= self.legacy_cfg_channels <= MAX_CHANNELS:
            raise ValueError(f"sampler.legacy_cfg_channels must be in 1..{MAX_CHANNELS} or null, "
                             f"got {self.legacy_cfg_channels}")

    def check_objective(self, kind: str) -> None:
        """One line if this sampler cannot sample an objective of ``kind``."""
        allowed = FLOW_SAMPLERS if kind == "flow" else DDPM_SAMPLERS
        if self.name not in allowed:
            raise ConfigError(f"sampler.name={self.name!r} cannot sample a {kind} objective; "
                              f"use one of {allowed}")
