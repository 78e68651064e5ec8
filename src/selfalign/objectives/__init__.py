"""Training objectives: flow interpolants (SiT) and DDPM (DiT), built from one flat config."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Objective, expand_time, mean_flat
from .ddpm import DDPMConfig, DDPMObjective, GaussianDiffusion, space_timesteps
from .flow import FlowConfig, FlowObjective

KINDS = ("flow", "ddpm")


@dataclass
class ObjectiveConfig:
    """The ``objective:`` section of an experiment: ``kind`` picks which fields apply."""

    kind: str = "flow"              # "flow" (SiT) or "ddpm" (DiT)
    # flow
    path: str = "linear"            # "linear" or "cosine" (GVP)
    time_sampling: str = "uniform"  # "uniform" or "lognormal"
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0
    # ddpm
    num_timesteps: int = 1000
    beta_schedule: str = "linear"   # "linear" (DiT) or "squaredcos_cap_v2"
    learn_sigma: bool = True        # must match model.learn_sigma (DiT presets: True)
    fixed_variance: str = "large"   # variance without learn_sigma: "large" or "small"

    def flow_config(self) -> FlowConfig:
        return FlowConfig(path=self.path, time_sampling=self.time_sampling,
                          lognormal_mean=self.lognormal_mean, lognormal_std=self.lognormal_std)

    def ddpm_config(self) -> DDPMConfig:
        return DDPMConfig(num_timesteps=self.num_timesteps, beta_schedule=self.beta_schedule,
                          learn_sigma=self.learn_sigma, fixed_variance=self.fixed_variance)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"objective.kind={self.kind!r} is not one of {KINDS}")
        (self.flow_config() if self.kind == "flow" else self.ddpm_config()).validate()


def build_objective(config: ObjectiveConfig | FlowConfig | DDPMConfig | None = None) -> Objective:
    """The objective an :class:`ObjectiveConfig` (or a Flow/DDPM config) describes."""
    if config is None:
        config = ObjectiveConfig()
    if isinstance(config, FlowConfig):
        return FlowObjective(config)
    if isinstance(config, DDPMConfig):
        return DDPMObjective(config)
    config.validate()
    if config.kind == "flow":
        return FlowObjective(config.flow_config())
    return DDPMObjective(config.ddpm_config())


__all__ = ["Objective", "expand_time", "mean_flat", "FlowConfig", "FlowObjective", "DDPMConfig",
           "DDPMObjective", "GaussianDiffusion", "space_timesteps", "ObjectiveConfig", "KINDS",
           "build_objective"]
