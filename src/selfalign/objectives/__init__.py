"""Training objectives: flow interpolants (SiT) and DDPM (DiT), built from one flat config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..choices import check_choices
from .base import Objective, expand_time, mean_flat
from .ddpm import BetaSchedule, DDPMConfig, DDPMObjective, FixedVariance, GaussianDiffusion, space_timesteps
from .flow import FlowConfig, FlowObjective, FlowPath, TimeSampling

ObjectiveKind = Literal["flow", "ddpm"]


@dataclass
class ObjectiveConfig:
    """The ``objective:`` section of an experiment: ``kind`` picks which fields apply."""

    kind: ObjectiveKind = "flow"    # "flow" (SiT) or "ddpm" (DiT)
    # flow
    path: FlowPath = "linear"       # "linear" or "cosine" (GVP)
    time_sampling: TimeSampling = "uniform"
    lognormal_mean: float = 0.0
    lognormal_std: float = 1.0
    # ddpm
    num_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"   # "linear" (DiT) or "squaredcos_cap_v2"
    learn_sigma: bool = True        # must match model.learn_sigma (DiT presets: True)
    fixed_variance: FixedVariance = "large"  # variance without learn_sigma

    def flow_config(self) -> FlowConfig:
        return FlowConfig(path=self.path, time_sampling=self.time_sampling,
                          lognormal_mean=self.lognormal_mean, lognormal_std=self.lognormal_std)

    def ddpm_config(self) -> DDPMConfig:
        return DDPMConfig(num_timesteps=self.num_timesteps, beta_schedule=self.beta_schedule,
                          learn_sigma=self.learn_sigma, fixed_variance=self.fixed_variance)

    def validate(self) -> None:
        check_choices(self, "objective")
        # both halves, though a run uses one: a value out of range is refused wherever it is written
        self.flow_config().validate()
        self.ddpm_config().validate()


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
           "DDPMObjective", "GaussianDiffusion", "space_timesteps", "ObjectiveConfig", "ObjectiveKind",
           "build_objective"]
