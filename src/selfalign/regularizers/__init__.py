"""Alignment regularizers, chosen by name in the config and combined freely.

Every module of this package is imported here, so each ``@register(name, ConfigClass)`` runs and
``REGISTRY`` knows every regularizer: adding one is adding its module (see :mod:`.base`).
Regularizer classes are imported from their modules (``selfalign.regularizers.sra``).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (REGISTRY, Progress, Registration, Regularizer, RegularizerConfig, StepContext,
                   build_regularizer, register)
from .distances import DISTANCES, Distance, get_distance


def import_all_modules() -> None:
    """Import every module found on this package's path (each registers what it defines)."""
    for module in pkgutil.iter_modules(__path__, prefix=f"{__name__}."):
        importlib.import_module(module.name)


import_all_modules()

__all__ = ["Progress", "Regularizer", "RegularizerConfig", "Registration", "StepContext", "REGISTRY",
           "register", "build_regularizer", "DISTANCES", "Distance", "get_distance", "import_all_modules"]
