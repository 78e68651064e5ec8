"""Alignment regularizers, chosen by name in the config and combined freely.

``REGISTRY`` maps a name to ``(ConfigClass, builder)``; ``builder(config, model)`` returns the
:class:`Regularizer` for a backbone. New regularizers register here and nowhere else.
"""
from __future__ import annotations

from .base import Progress, Regularizer, StepContext
from .distances import DISTANCES, get_distance
from .sra import LAYER_PRESETS, SRA, SRAConfig
from .dispersive import Dispersive, DispersiveConfig
from .dts import DTS, DTSConfig
from .repa import REPA, REPAConfig
from .sra2 import SRA2, SRA2Config

REGISTRY = {
    "sra": (SRAConfig, lambda cfg, model: SRA(cfg, model.config.hidden_size, model.config.depth)),
    "repa": (REPAConfig, lambda cfg, model: REPA(cfg, model)),
    "dispersive": (DispersiveConfig, lambda cfg, model: Dispersive(cfg, model.config.depth)),
    "sra2": (SRA2Config, lambda cfg, model: SRA2(cfg, model)),
    "dts": (DTSConfig, lambda cfg, model: DTS(cfg, model)),
}


def build_regularizer(name: str, config, model):
    if name not in REGISTRY:
        raise ValueError(f"unknown regularizer {name!r}: choose from {sorted(REGISTRY)}")
    return REGISTRY[name][1](config, model)


__all__ = ["Progress", "Regularizer", "StepContext", "DISTANCES", "get_distance", "LAYER_PRESETS",
           "SRA", "SRAConfig", "REPA", "REPAConfig", "Dispersive", "DispersiveConfig", "SRA2",
           "SRA2Config", "DTS", "DTSConfig", "REGISTRY", "build_regularizer"]
