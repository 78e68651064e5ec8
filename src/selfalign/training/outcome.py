"""How a training run ends: a :class:`RunResult`, or :class:`TrainingStopped` with one line saying why."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SelfalignError


class TrainingStopped(SelfalignError):
    """The run stopped on purpose (non-finite values, a failed checkpoint or metrics write).

    The message says where it stopped, why, and how to continue; the checkpoints on disk are intact.
    """


@dataclass
class RunResult:
    run_dir: Path
    step: int
    images: int
    skipped_steps: int
    checkpoint: Path | None
    interrupted: bool = False     # stopped early by SIGTERM/SIGUSR1 (a checkpoint was written)
