"""The outer loop of :class:`~selfalign.training.trainer.Trainer`: steps, logs, grids, evals, checkpoints."""
from __future__ import annotations

import sys
import time

import torch

from ..errors import SelfalignError
from ..evaluation.training_eval import evaluate, plan_line
from . import distributed as dist_util


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


def _evaluate(trainer):
    """The EMA model's metrics (:mod:`selfalign.evaluation.training_eval`); None once they fail."""
    if getattr(trainer, "_eval_disabled", False):
        return None
    cfg = trainer.config
    gen = torch.Generator(device=trainer.info.device).manual_seed(cfg.train.seed + 0xE7A1)
    try:
        return evaluate(trainer.ema.model, trainer.objective, cfg, cfg.train.eval_samples, gen,
                        trainer.info.device, decode=getattr(trainer.dataset, "decode", None), log=trainer.log)
    except (SelfalignError, ValueError, FileNotFoundError) as err:   # e.g. missing weights: keep training
        trainer._eval_disabled = True
        trainer.log(f"warning: evaluation disabled for this run: {err}")
        return None


def run_loop(trainer):
    from tqdm import tqdm

    from .trainer import RunResult, crossed, peak_memory_mb

    cfg, info = trainer.config, trainer.info
    t, b = cfg.train, trainer.global_batch
    trainer.write_config()
    trainer.install_signal_handlers()
    metrics = trainer.open_metrics()
    start_images = trainer.step * b
    show_bar = info.is_main and cfg.logging.progress_bar and sys.stderr.isatty()
    bar = tqdm(total=trainer.total_steps * b, initial=start_images, unit="img", unit_scale=True,
               dynamic_ncols=True, disable=not show_bar)
    trainer.log(f"training {cfg.model.preset} ({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M "
                f"parameters) with {', '.join(cfg.regularizers) or 'no regularizer'} on {cfg.data.kind}: "
                f"global batch {b} = {info.world_size} process(es) x {trainer.per_rank} "
                f"(micro-batch {trainer.micro}), steps {trainer.step} -> {trainer.total_steps}, "
                f"device {info.device}, run dir {trainer.run_dir}")
    if plan_line(cfg):
        trainer.log(plan_line(cfg))
    window = _Window(start_images)
    batches = trainer.batches()
    try:
        while trainer.step < trainer.total_steps:
            x, y, *extra = next(batches)       # extra: images next to latents
            if trainer.batch_hook is not None:
                x, y = trainer.batch_hook(trainer, trainer.step, x, y)   # tests: inject faults
            ok, terms = trainer.train_step(x, y, *extra)
            window.add(ok, terms)
            before, trainer.step = trainer.step * b, trainer.step + 1
            after = trainer.step * b
            bar.update(b)
            last = trainer.step == trainer.total_steps
            if crossed(before, after, t.log_every_kimg) or last:
                record = _log_record(trainer, window, after, peak_memory_mb(info.device))
                window = _Window(after)
                if metrics is not None:
                    metrics.write(record)
                    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)
                    if not show_bar:    # logs and pipes get one line per record instead of a bar
                        # the last window's rate: a run-long average would carry compilation
                        # and start-up for ever (seen: 993 img/s printed at 4000 img/s on a GPU)
                        rate = record["img_per_s"]
                        eta = (trainer.total_steps * b - after) / max(rate, 1e-9)
                        trainer.log(f"step {trainer.step}/{trainer.total_steps} ({after / 1000:g} kimg) loss "
                                    f"{record.get('loss', float('nan')):.4f} {rate:.1f} img/s ETA {eta / 60:.1f} min")
            if crossed(before, after, t.sample_every_kimg) or (last and t.sample_every_kimg > 0):
                trainer.write_samples(metrics)
            if crossed(before, after, t.eval_every_kimg) or (last and t.eval_every_kimg > 0):
                results = _evaluate(trainer) if info.is_main else None
                if results and metrics is not None:         # {}: train.eval_metrics=none
                    metrics.write({"kind": "eval", "step": trainer.step, "kimg": after / 1000, **results})
                dist_util.barrier(info)
            if crossed(before, after, t.ckpt_every_kimg) or last or trainer._stop_requested:
                trainer.save()
            if trainer._stop_requested:
                trainer.log(f"stop requested: checkpoint written at step {trainer.step}")
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if trainer.last_checkpoint is None or not trainer.last_checkpoint.name.endswith(f"{trainer.step:09d}"):
        trainer.save()
    return RunResult(trainer.run_dir, trainer.step, trainer.step * b, trainer.skipped, trainer.last_checkpoint,
                     interrupted=trainer.step < trainer.total_steps)


def _log_record(trainer, window: _Window, images: int, peak_mb: float) -> dict:
    info = trainer.info
    names = sorted(window.sums)
    if window.count:
        values = torch.stack([torch.as_tensor(window.sums[n], device=info.device).float() for n in names])
        values = dist_util.all_mean(info, values / window.count).tolist()
    else:
        values = [float("nan")] * len(names)
        dist_util.all_mean(info, torch.zeros(len(names), device=info.device))   # keep ranks in step
    elapsed = max(time.perf_counter() - window.start_time, 1e-9)
    record = {"kind": "train", "step": trainer.step, "kimg": images / 1000, "images": images}
    for name, value in zip(names, values):
        key = name if name in ("loss", "grad_norm") else f"loss/{name}"
        record[key] = value
    for name, reg in trainer.step_module.regularizers.items():
        record[f"weight/{name}"] = float(reg.weight(_progress(trainer, images)))
    record.update({"lr": trainer.optimizer.param_groups[0]["lr"],
                   "img_per_s": (images - window.start_images) / elapsed, "peak_mem_mb": peak_mb,
                   "skipped_steps": trainer.skipped, "skipped_in_window": window.skipped})
    if trainer.scaler is not None:
        record["loss_scale"] = float(trainer.scaler.get_scale())
    return record


def _progress(trainer, images: int):
    from ..regularizers import Progress
    return Progress(images=images, dataset_size=len(trainer.dataset))
