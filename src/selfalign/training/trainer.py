"""The trainer: one process or many (torchrun), CPU or GPU, resumable to the bit.

Per optimizer step every rank takes its ``batch_size / world_size`` share of the global batch
(:mod:`selfalign.data.order`), splits it into micro-batches (``train.micro_batch``), and runs
:class:`~selfalign.training.step.TrainingStep` under DDP with the per-rank step generator
(:func:`~selfalign.training.step.accumulate_gradients`). The update
(:class:`~selfalign.training.update.OptimizerUpdate`) checks the loss and the global gradient
norm first: a non-finite step is skipped (``train.nonfinite=skip``, counted) or stops the run
(``stop``, or ``skip`` after ``train.max_consecutive_bad`` bad steps in a row); otherwise the
optimizer steps and the EMA, which is also the SRA teacher, follows the weights. The schedule
of logs, grids, evaluations and checkpoints is the loop's (:mod:`selfalign.training.loop`).
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..config.experiment import ExperimentConfig, resume_mismatch, save_config
from ..data import DataOrder, TrainingDataset, build_dataset, step_batches
from ..ema import EMA
from ..errors import CheckpointError, ConfigError, SelfalignError, UsageError
from ..evaluation.training_eval import evaluate, plan_line
from ..formats import checkpoint as ckpt_io
from ..models.backbone import DiffusionTransformer
from ..objectives import build_objective
from ..regularizers import Progress, build_regularizer
from . import distributed as dist_util
from . import rng
from .loop import Schedule, run_loop
from .metrics import METRICS_FILE, MetricsLog, read_metrics
from .outcome import RunResult, TrainingStopped
from .samples import sample_grid
from .step import TrainingStep, accumulate_gradients
from .update import OptimizerUpdate, adamw

EVAL_STREAM = 0xE7A1    # separates the evaluation's noise from the training generators


class Trainer:
    """One training run: model, regularizers, EMA, optimizer and data order, resumable to the bit.

    It implements the loop's :class:`~selfalign.training.loop.LoopHost`: :meth:`train_step`,
    :meth:`save`, :meth:`write_samples`, :meth:`evaluate`; :meth:`run` drives it to the end.
    """

    def __init__(self, config: ExperimentConfig, run_dir: str | Path, info: dist_util.DistInfo,
                 resume: str | None = None, batch_hook=None, log=print):
        self.config, self.info, self.run_dir = config, info, Path(run_dir)
        self.batch_hook, self._log = batch_hook, log
        t, device = config.train, info.device
        config.check(info.world_size)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.backends.cudnn.allow_tf32 = t.tf32
        self.global_batch = t.batch_size
        self.per_rank = t.batch_size // info.world_size
        self.micro = t.micro_batch if 0 < t.micro_batch < self.per_rank else self.per_rank

        torch.manual_seed(t.seed)       # identical initial weights on every rank
        model = DiffusionTransformer(config.backbone_config()).to(device)
        regularizers = {name: build_regularizer(name, cfg, model.config)
                        for name, cfg in config.regularizers.items()}
        self.objective = build_objective(config.objective)
        self.step_module = TrainingStep(model, self.objective, regularizers, t.label_dropout).to(device)
        self.model = model
        self.ema = EMA(model, t.ema_decay)
        self.needs_teacher = any(r.needs_teacher() for r in regularizers.values())
        self.needs_images = any(r.needs_images() for r in regularizers.values())
        self.dataset: TrainingDataset = build_dataset(config.data, "train", with_images=self.needs_images)
        self._check_dataset()
        self.order = DataOrder(len(self.dataset), t.seed)
        params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.optimizer = adamw(params, device, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
        self.update = OptimizerUpdate(self.optimizer, self.ema, model, grad_clip=t.grad_clip,
                                      scaler=self.scaler, distributed=info.distributed)
        self.generator = rng.step_generator(t.seed, info.rank, device)
        self.step, self.skipped, self.consecutive_bad = 0, 0, 0
        self.last_checkpoint: Path | None = None
        self._stop_signalled = False      # this process got SIGTERM/SIGUSR1
        self._stopping = False            # some process had, as of the last step (agreed by all)
        self._eval_disabled = False

        start = self._find_resume(resume)
        if start is not None:
            self._load(start)
        dist_util.check_agreement(info, "config hash", config.hash())
        dist_util.check_agreement(info, "resume step", self.step)
        # The SRA teacher is the EMA model's truncated feature forward: with train.compile it gets
        # its own compiled wrapper (1.14x on SiT-XL/2 on an H200 over compiling the student alone,
        # benchmarks/results/gpu-NVIDIA-H200-20261126), while evaluation, sampling and checkpoints keep
        # using the plain EMA module, whose other shapes would otherwise each cost a recompilation.
        if t.compile:
            model.compile()
        self.teacher = None
        if self.needs_teacher:
            teacher = self.ema.model
            for regularizer in regularizers.values():   # e.g. SRA's fp8 view of the same tensors
                teacher = regularizer.adapt_teacher(teacher)
            self.teacher = torch.compile(teacher) if t.compile else teacher
        self.train_module = (DistributedDataParallel(self.step_module, device_ids=[device] if device.type == "cuda" else None)
                             if info.distributed else self.step_module)
        total_steps = math.ceil(round(t.total_kimg * 1000) / self.global_batch)
        self.schedule = Schedule(self.global_batch, total_steps, t.log_every_kimg, t.sample_every_kimg,
                                 t.eval_every_kimg, t.ckpt_every_kimg)

    # -- setup -------------------------------------------------------------------------------
    def _check_dataset(self) -> None:
        m = self.config.model
        if self.dataset.channels != m.in_channels:
            raise ConfigError(f"model.in_channels={m.in_channels} but the data has {self.dataset.channels} channels")
        if self.dataset.num_classes > m.num_classes:
            raise ConfigError(f"the data has {self.dataset.num_classes} classes but model.num_classes={m.num_classes}")
        if len(self.dataset) < self.global_batch:
            raise ConfigError(f"train.batch_size={self.global_batch} is larger than the dataset ({len(self.dataset)} "
                              f"examples): a step would repeat images; use at most {len(self.dataset)}")

    def _find_resume(self, resume: str | None) -> Path | None:
        # Refuses any start that would replace checkpoints or a metrics history of the run dir.
        start = ckpt_io.resume_point(self.run_dir, resume, report=self.log)
        if resume is None and read_metrics(self.run_dir):
            raise UsageError(f"run directory {self.run_dir} already holds {METRICS_FILE} from an earlier start; "
                             f"pass --resume auto to continue that run or choose another --run-dir")
        return start

    def log(self, message: str) -> None:
        if self.info.is_main:
            self._log(message)

    def describe(self) -> str:
        cfg, info = self.config, self.info
        parameters = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (f"training {cfg.model.preset} ({parameters:.2f} M parameters) with "
                f"{', '.join(cfg.regularizers) or 'no regularizer'} on {cfg.data.kind}: global batch "
                f"{self.global_batch} = {info.world_size} process(es) x {self.per_rank} (micro-batch {self.micro}), "
                f"steps {self.step} -> {self.schedule.total_steps}, device {info.device}, run dir {self.run_dir}")

    # -- checkpoints -------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        state = ckpt_io.read_state(path)
        problem = resume_mismatch(state.get("config", {}), self.config)
        if problem:
            raise CheckpointError(f"cannot resume from {path}: {problem} (start a new --run-dir for a new run)")
        device = self.info.device
        hint = " (checkpoint of another model preset?)"
        ckpt_io.load_module(self.model, ckpt_io.load_tensors(path, "model", device), "model", path, hint)
        ckpt_io.load_module(self.ema.model, ckpt_io.load_tensors(path, "ema", device), "EMA", path, hint)
        ckpt_io.load_module(self.step_module.regularizers, ckpt_io.load_tensors(path, "regularizers", device),
                            "regularizers", path, " (different regularizers?)")
        saved = ckpt_io.load_optimizer_state(path)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: optimizer state does not fit this model ({err})") from None
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.step = int(state["step"])
        if state["data"]["position"] != self.step * self.global_batch:
            raise CheckpointError(f"{path}: data position {state['data']['position']} does not match "
                                  f"step {self.step} x batch {self.global_batch}")
        self.skipped = int(state.get("nonfinite", {}).get("skipped_steps", 0))
        ranks = state.get("rng", [])
        if state.get("world_size") == self.info.world_size and len(ranks) == self.info.world_size:
            rng.restore(ranks[self.info.rank], self.generator)
        else:   # the data order is still exact; only the per-rank noise stream restarts
            self.log(f"note: {path.name} was written by {state.get('world_size')} processes, this run has "
                     f"{self.info.world_size}; the per-process random streams restart from the seed")
            self.generator.manual_seed((self.config.train.seed * 1_000_003 + self.step * 31 + self.info.rank)
                                       % 2 ** 63)     # within what a generator takes, for any seed
        self.last_checkpoint = path
        self.log(f"resumed from {path} (step {self.step}, {self.step * self.global_batch / 1000:.3f} kimg)")

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (all ranks call it; rank 0 writes)."""
        rng_states = dist_util.all_gather_objects(self.info, rng.capture(self.generator))
        error = None
        if self.info.is_main:
            images = self.step * self.global_batch
            state = {
                "images": images, "world_size": self.info.world_size, "rng": rng_states,
                "config": self.config.to_dict(), "config_hash": self.config.hash(),
                "data": {"position": images, "seed": self.config.train.seed, "dataset_size": len(self.dataset),
                         "epoch": images // len(self.dataset), "offset": images % len(self.dataset)},
                "nonfinite": {"skipped_steps": self.skipped},
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            tensors = {"model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                       "regularizers": self.step_module.regularizers.state_dict()}
            optim = {"optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else {}}
            try:
                self.last_checkpoint = ckpt_io.save_checkpoint(self.run_dir, self.step, tensors, optim, state,
                                                               keep_last=self.config.train.keep_last,
                                                               report=self.log)
            except ckpt_io.CheckpointWriteError as err:
                error = str(err)
        error, written = dist_util.broadcast_object(self.info, (error, self.last_checkpoint))
        if error:
            raise TrainingStopped(error)
        self.last_checkpoint = written
        return written

    # -- one optimizer step ------------------------------------------------------------------
    def _autocast(self):
        precision, device = self.config.train.precision, self.info.device
        if precision == "fp32":
            return contextlib.nullcontext
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype)

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   images: torch.Tensor | None = None) -> tuple[bool, dict[str, torch.Tensor]]:
        """One optimizer step on a batch as the dataset serves it: forward/backward over the
        micro-batches, then :class:`~selfalign.training.update.OptimizerUpdate`. ``step`` counts it
        whether it was applied or skipped.

        ``images`` are the raw pixels next to latents (latent datasets, for encoder-based
        regularizers); for pixel datasets the images are ``x``. Returns ``(applied, terms)``."""
        device = self.info.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = self.dataset.to_model(x, self.generator)     # latents: x0 = scale * (mean + std * eps)
        if self.config.data.hflip and self.dataset.flippable:
            flip = torch.rand(x.shape[0], device=device, generator=self.generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.needs_images:
            images = x if images is None else images.to(device, non_blocking=True)
        else:
            images = None
        progress = Progress(images=self.step * self.global_batch, dataset_size=len(self.dataset))
        terms = accumulate_gradients(
            self.train_module, x, y, self.micro, self.update.backward, images=images,
            no_sync=self.train_module.no_sync if self.info.distributed else None,
            teacher=self.teacher, generator=self.generator, progress=progress, autocast=self._autocast())
        result = self.update(terms["loss"], stop=self._stop_signalled)
        terms["grad_norm"] = result.grad_norm
        self._stopping = result.stop
        if result.nonfinite:
            self._bad_step(result.nonfinite)
        elif result.applied:
            self.consecutive_bad = 0
        self.step += 1
        return result.applied, terms

    def _bad_step(self, what: str) -> None:
        t = self.config.train
        self.skipped += 1
        self.consecutive_bad += 1
        where = f"step {self.step} ({self.step * self.global_batch / 1000:.3f} kimg)"
        last = f"last checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint yet"
        if t.nonfinite == "stop" or self.consecutive_bad >= t.max_consecutive_bad:
            reason = ("train.nonfinite=stop" if t.nonfinite == "stop"
                      else f"{self.consecutive_bad} non-finite steps in a row (train.max_consecutive_bad)")
            raise TrainingStopped(f"stopped at {where}: non-finite {what}, {reason}; the weights were not "
                                  f"updated by it; {last}. Lower train.lr, use train.precision=fp32 or bf16, "
                                  f"or check the data")
        self.log(f"warning: {where}: non-finite {what}, step skipped ({self.skipped} skipped so far)")

    # -- what the loop asks for --------------------------------------------------------------
    def batches(self):
        """This process's batches from the current step on (through ``batch_hook`` when given)."""
        batches = step_batches(self.dataset, self.order, self.global_batch, self.info.rank,
                               self.info.world_size, self.step, self.config.data.num_workers,
                               pin_memory=self.info.device.type == "cuda")
        return batches if self.batch_hook is None else self._hooked(batches)

    def _hooked(self, batches):
        for x, y, *extra in batches:        # tests: inject faults into the batch of this step
            x, y = self.batch_hook(self, self.step, x, y)
            yield (x, y, *extra)

    def stop_requested(self) -> bool:
        return self._stopping

    def log_fields(self, images: int) -> dict:
        progress = Progress(images=images, dataset_size=len(self.dataset))
        fields = {f"weight/{name}": float(reg.weight(progress))
                  for name, reg in self.step_module.regularizers.items()}
        fields.update(lr=self.optimizer.param_groups[0]["lr"], skipped_steps=self.skipped)
        if self.scaler is not None:
            fields["loss_scale"] = float(self.scaler.get_scale())
        return fields

    def write_samples(self, metrics: MetricsLog | None) -> Path | None:
        if not self.info.is_main:
            return None
        path = self.run_dir / "samples" / f"step-{self.step:09d}.png"
        sample_grid(self.ema.model, self.objective, self.config, path, device=self.info.device,
                    decode=self.dataset.decode)
        if metrics is not None:
            metrics.add_image("samples/ema", path, self.step)
        return path

    def evaluate(self) -> dict | None:
        """The EMA model's metrics (:mod:`selfalign.evaluation.training_eval`); a missing judge (e.g.
        classifier or Inception weights) turns evaluation off for the rest of the run instead of
        stopping it."""
        if self._eval_disabled:
            return None
        cfg = self.config
        gen = torch.Generator(device=self.info.device).manual_seed(cfg.train.seed + EVAL_STREAM)
        try:
            return evaluate(self.ema.model, self.objective, cfg, cfg.train.eval_samples, gen, self.info.device,
                            decode=self.dataset.decode, log=self.log) or None   # {}: train.eval_metrics=none
        except SelfalignError as err:
            self._eval_disabled = True
            self.log(f"warning: evaluation disabled for this run: {err}")
            return None

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> RunResult:
        self.write_config()
        self.install_signal_handlers()
        self.log(self.describe())
        if plan_line(self.config):
            self.log(plan_line(self.config))
        metrics = self.open_metrics()
        try:
            run_loop(self, self.schedule, metrics,
                     progress_bar=self.info.is_main and self.config.logging.progress_bar)
        finally:
            if metrics is not None:
                metrics.close()
        if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:09d}"):
            self.save()
        return RunResult(self.run_dir, self.step, self.step * self.global_batch, self.skipped,
                         self.last_checkpoint, interrupted=self.step < self.schedule.total_steps)

    def request_stop(self, *_):
        """SIGTERM/SIGUSR1 (preemption): finish the step, checkpoint, exit (every process stops at
        the first step whose update sees the request)."""
        self._stop_signalled = True

    def install_signal_handlers(self) -> None:
        with contextlib.suppress(ValueError):      # only possible in the main thread
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGUSR1, self.request_stop)

    def write_config(self) -> None:
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / "config.yaml.tmp"
            save_config(self.config, tmp)
            tmp.replace(self.run_dir / "config.yaml")

    def open_metrics(self) -> MetricsLog | None:
        if not self.info.is_main:
            return None
        lg = self.config.logging
        return MetricsLog(self.run_dir, self.step, tensorboard=lg.tensorboard, wandb=lg.wandb,
                          wandb_project=lg.wandb_project, wandb_entity=lg.wandb_entity,
                          run_name=self.config.name, config=self.config.to_dict())


def train(config: ExperimentConfig, run_dir: str | Path, resume: str | None = None, *,
          batch_hook=None, log=print) -> RunResult:
    """Train ``config`` into ``run_dir`` (joins the torchrun process group when there is one)."""
    info = dist_util.init(config.train.device, setting="train.device")
    ok = False
    try:
        trainer = Trainer(config, run_dir, info, resume, batch_hook=batch_hook, log=log)
        result = trainer.run()
        ok = True
        return result
    finally:
        if ok:
            dist_util.shutdown(info)
        elif info.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
