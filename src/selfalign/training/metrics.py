"""Metrics on disk (JSONL, one record per line, each log step exactly once), TensorBoard, W&B.

``metrics.jsonl`` records are ``{"kind": "train" | "eval", "step": ..., "kimg": ..., ...}``.
Each line is flushed and fsync'ed. On resume from step ``S`` the file is rewritten (atomically)
without records after ``S``, duplicates, and a torn last line from a kill, so the replayed
steps are logged again exactly once.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..formats import faults
from .outcome import TrainingStopped

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every complete, parseable record of a metrics file (a torn last line is ignored)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _clean(value):
    """JSON has no NaN: non-finite floats are written as strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """The JSONL file plus the optional TensorBoard and W&B sinks (main process only)."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int, *, tensorboard: bool = False,
                 wandb: bool = False, wandb_project: str = "selfalign", wandb_entity: str = "",
                 run_name: str = "", config: dict | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.truncate(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops the previous run's events after the checkpoint we resume from.
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise ConfigError("logging.wandb=true but wandb is not installed: pip install wandb, "
                                 "or set logging.wandb=false") from None
            self._wandb = wandb_module.init(project=wandb_project, entity=wandb_entity or None,
                                            name=run_name or Path(run_dir).name, dir=str(run_dir),
                                            config=config, resume="allow")

    def truncate(self, resume_step: int) -> None:
        """Keep records up to ``resume_step`` (first copy of each), drop the rest atomically."""
        if not self.path.exists():
            return
        kept, seen = [], set()
        for record in read_metrics(self.path):
            key = (record.get("kind", "train"), record["step"])
            if record["step"] <= resume_step and key not in seen:
                seen.add(key)
                kept.append(record)
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        line = json.dumps(record) + "\n"
        faults.point("metrics_write", before_kill=lambda: (self._file.write(line[: len(line) // 2]),
                                                           self._file.flush()))
        try:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:      # e.g. a full disk: one line, not a traceback from deep in the loop
            raise TrainingStopped(f"could not write {self.path} ({err.strerror or err}); the checkpoints "
                                  f"are not affected: make room and continue with --resume auto") from None
        step, kind = record["step"], record.get("kind", "train")
        numbers = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind")}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in numbers.items()}, step=step)

    def add_image(self, tag: str, path: Path, step: int) -> None:
        if self._tb is None and self._wandb is None:
            return
        array = np.asarray(Image.open(path).convert("RGB"))
        if self._tb is not None:
            self._tb.add_image(tag, array, step, dataformats="HWC")
        if self._wandb is not None:
            import wandb as wandb_module
            self._wandb.log({tag: wandb_module.Image(array)}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
