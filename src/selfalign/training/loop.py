"""The training loop: optimizer steps, log records, sample grids, evaluations and checkpoints on a schedule.

The loop knows no model, optimizer or dataset. It drives a :class:`LoopHost` (the
:class:`~selfalign.training.trainer.Trainer` is one) through the interface declared here, on a
:class:`Schedule`. Logs, grids, evaluations and checkpoints happen when the image count crosses
a multiple of their interval, so a resumed run does them at the same steps; a stop request
(SIGTERM/SIGUSR1) ends the loop after a checkpoint of the step it finishes.
"""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from . import distributed as dist_util
from .metrics import MetricsLog


@dataclass(frozen=True)
class Schedule:
    """How long the loop runs and when it does what (``*_every_kimg`` of 0: never)."""

    global_batch: int           # images per optimizer step, over all processes
    total_steps: int
    log_every_kimg: float
    sample_every_kimg: float
    eval_every_kimg: float
    ckpt_every_kimg: float


class LoopHost(Protocol):
    """What :func:`run_loop` needs from the run it drives. Every process calls every method
    except :meth:`evaluate` (main process only); collective ones must be called by all."""

    info: dist_util.DistInfo

    @property
    def step(self) -> int:
        """Optimizer steps taken, skipped ones included; :meth:`train_step` advances it."""

    def batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """This process's batches from :attr:`step` on: ``(x, y)`` or ``(x, y, images)``."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   images: torch.Tensor | None = None) -> tuple[bool, dict[str, torch.Tensor]]:
        """One optimizer step; ``(applied, loss terms)``, where a skipped step has ``applied`` False."""

    def stop_requested(self) -> bool:
        """A process was asked to stop (the same answer on every process after a step)."""

    def save(self) -> Path | None:
        """Checkpoint the current step (collective)."""

    def write_samples(self, metrics: MetricsLog | None) -> Path | None:
        """Write the sample grid of the current step."""

    def evaluate(self) -> dict[str, float] | None:
        """Evaluation metrics of the current model, or None when there are none."""

    def log_fields(self, images: int) -> dict:
        """What the host adds to a log record at ``images`` (learning rate, regularizer weights, ...)."""

    def log(self, message: str) -> None:
        """A line for the user (the host decides which process prints)."""


def crossed(before: int, after: int, every_kimg: float) -> bool:
    """True when the image count passed a multiple of ``every_kimg`` between two steps."""
    if every_kimg <= 0:
        return False
    every = max(1, round(every_kimg * 1000))
    return after // every > before // every


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    scale = 1 if sys.platform == "darwin" else 1024     # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


class _Window:
    """Loss terms and timing accumulated between two log records."""

    def __init__(self, images: int):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.skipped = 0
        self.start_time, self.start_images = time.perf_counter(), images

    def add(self, ok: bool, terms: dict[str, torch.Tensor]) -> None:
        if not ok:
            self.skipped += 1
            return
        self.count += 1
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value


def run_loop(host: LoopHost, schedule: Schedule, metrics: MetricsLog | None, progress_bar: bool = False) -> None:
    """Step ``host`` until ``schedule.total_steps`` or a stop request; ``metrics`` (main process
    only) receives the records. ``progress_bar`` shows a bar when stderr is a terminal; otherwise
    each log record prints one line."""
    info, b, end = host.info, schedule.global_batch, schedule.total_steps
    show_bar = progress_bar and sys.stderr.isatty()
    bar = tqdm(total=end * b, initial=host.step * b, unit="img", unit_scale=True,
               dynamic_ncols=True, disable=not show_bar)
    window = _Window(host.step * b)
    batches = host.batches()
    try:
        while host.step < end:
            before = host.step * b
            ok, terms = host.train_step(*next(batches))
            window.add(ok, terms)
            after = host.step * b
            bar.update(b)
            last = host.step == end
            if crossed(before, after, schedule.log_every_kimg) or last:
                record = _log_record(host, window, after)
                window = _Window(after)
                if metrics is not None:
                    metrics.write(record)
                    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)
                    if not show_bar:
                        # the last window's rate: a run-long average would carry compilation
                        # and start-up for ever (seen: 993 img/s printed at 4000 img/s on a GPU)
                        rate = record["img_per_s"]
                        eta = (end * b - after) / max(rate, 1e-9)
                        host.log(f"step {host.step}/{end} ({after / 1000:g} kimg) loss "
                                 f"{record.get('loss', float('nan')):.4f} {rate:.1f} img/s ETA {eta / 60:.1f} min")
            if crossed(before, after, schedule.sample_every_kimg) or (last and schedule.sample_every_kimg > 0):
                host.write_samples(metrics)
            if crossed(before, after, schedule.eval_every_kimg) or (last and schedule.eval_every_kimg > 0):
                results = host.evaluate() if info.is_main else None
                if results is not None and metrics is not None:
                    metrics.write({"kind": "eval", "step": host.step, "kimg": after / 1000, **results})
                dist_util.barrier(info)
            stop = host.stop_requested()
            if crossed(before, after, schedule.ckpt_every_kimg) or last or stop:
                host.save()
            if stop:
                host.log(f"stop requested: checkpoint written at step {host.step}")
                break
    finally:
        bar.close()


def _log_record(host: LoopHost, window: _Window, images: int) -> dict:
    """The window's mean loss terms over every process, its rate, and the host's fields."""
    info = host.info
    names = sorted(window.sums)
    if window.count:
        values = torch.stack([torch.as_tensor(window.sums[n], device=info.device).float() for n in names])
        values = dist_util.all_mean(info, values / window.count).tolist()
    else:
        values = [float("nan")] * len(names)
        dist_util.all_mean(info, torch.zeros(len(names), device=info.device))   # keep ranks in step
    elapsed = max(time.perf_counter() - window.start_time, 1e-9)
    record = {"kind": "train", "step": host.step, "kimg": images / 1000, "images": images}
    for name, value in zip(names, values):
        key = name if name in ("loss", "grad_norm") else f"loss/{name}"
        record[key] = value
    record.update(host.log_fields(images))
    record.update({"img_per_s": (images - window.start_images) / elapsed, "peak_mem_mb": peak_memory_mb(info.device),
                   "skipped_in_window": window.skipped})
    return record
