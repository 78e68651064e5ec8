"""Training: the per-step loss (:mod:`.step`), the trainer loop and its metrics, distributed helpers.

Heavy pieces are imported on first use so ``import selfalign.training`` stays cheap.
"""
from __future__ import annotations


def __getattr__(name):
    if name in ("train", "Trainer", "TrainingStopped", "RunResult"):
        from . import trainer
        return getattr(trainer, name)
    if name == "TrainingStep":
        from .step import TrainingStep
        return TrainingStep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["train", "Trainer", "TrainingStopped", "RunResult", "TrainingStep"]
