"""Training objectives: flow interpolants (SiT) and DDPM (DiT)."""
from .base import Objective, expand_time, mean_flat
from .flow import FlowConfig, FlowObjective

__all__ = ["Objective", "expand_time", "mean_flat", "FlowConfig", "FlowObjective"]
