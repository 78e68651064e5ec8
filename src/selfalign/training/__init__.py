"""Training: the per-step loss (:mod:`.step`), the trainer loop, checkpoints, distributed helpers.

Heavy pieces are imported on first use so ``from selfalign.training import load_for_inference``
does not pull in the trainer.
"""
from __future__ import annotations


def __getattr__(name):
    if name in ("train", "Trainer", "TrainingStopped", "RunResult"):
        from . import trainer
        return getattr(trainer, name)
    if name in ("load_for_inference", "latest_checkpoint", "CheckpointError", "CheckpointWriteError"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name == "TrainingStep":
        from .step import TrainingStep
        return TrainingStep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["train", "Trainer", "TrainingStopped", "RunResult", "load_for_inference", "latest_checkpoint",
           "CheckpointError", "CheckpointWriteError", "TrainingStep"]
