"""The training loop: one process or many (torchrun), CPU or GPU, resumable to the bit.

Per optimizer step every rank takes its ``batch_size / world_size`` share of the global batch
(:mod:`selfalign.data.order`), splits it into micro-batches (``train.micro_batch``), and runs
:class:`~selfalign.training.step.TrainingStep` under DDP with the per-rank step generator.
Before the optimizer step the loss and the global gradient norm are checked: a non-finite step
is skipped (``train.nonfinite=skip``, counted) or stops the run (``stop``, or ``skip`` after
``train.max_consecutive_bad`` bad steps in a row). Then the EMA, which is also the SRA teacher,
follows the weights. Logs, sample grids, evaluations and checkpoints happen when the image
count crosses a multiple of their interval, so a resumed run does them at the same steps.
"""
from __future__ import annotations

import contextlib
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..config.experiment import ExperimentConfig, resume_mismatch, save_config
from ..config.loader import ConfigError
from ..errors import UsageError
from ..data import DataOrder, build_dataset, step_batches
from ..ema import EMA
from ..models.backbone import DiffusionTransformer
from ..objectives import build_objective
from ..regularizers import Progress, build_regularizer
from ..formats import checkpoint as ckpt_io
from ..formats import faults
from . import distributed as dist_util
from . import rng
from .metrics import METRICS_FILE, MetricsLog, read_metrics
from .samples import sample_grid
from .step import TrainingStep


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite values, a failed checkpoint write); one-line message."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    images: int
    skipped_steps: int
    checkpoint: Path | None
    interrupted: bool = False     # stopped early by SIGTERM/SIGUSR1 (a checkpoint was written)


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


class Trainer:
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
        regularizers = {name: build_regularizer(name, cfg, model)
                        for name, cfg in config.regularizers.items()}
        self.objective = build_objective(config.objective)
        self.step_module = TrainingStep(model, self.objective, regularizers, t.label_dropout).to(device)
        self.model = model
        self.ema = EMA(model, t.ema_decay)
        self.needs_teacher = any(r.needs_teacher() for r in regularizers.values())
        self.needs_images = any(r.needs_images() for r in regularizers.values())
        self.dataset = build_dataset(config.data, "train", with_images=self.needs_images)
        self._check_dataset()
        self.order = DataOrder(len(self.dataset), t.seed)
        self.params = [p for p in self.step_module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                           weight_decay=t.weight_decay,
                                           # fused kernels on GPU; one foreach call per op on CPU
                                           **({"fused": True} if device.type == "cuda" else {"foreach": True}))
        self.scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
        self.generator = rng.step_generator(t.seed, info.rank, device)
        self.step, self.skipped, self.consecutive_bad = 0, 0, 0
        self.last_checkpoint: Path | None = None

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
        self.total_images = round(t.total_kimg * 1000)
        self.total_steps = math.ceil(self.total_images / self.global_batch)

    # -- setup -------------------------------------------------------------------------------
    def _check_dataset(self) -> None:
        m = self.config.model
        channels = getattr(self.dataset, "channels", None)
        if channels is not None and channels != m.in_channels:
            raise ConfigError(f"model.in_channels={m.in_channels} but the data has {channels} channels")
        classes = getattr(self.dataset, "num_classes", None)
        if classes is not None and classes > m.num_classes:
            raise ConfigError(f"the data has {classes} classes but model.num_classes={m.num_classes}")
        if len(self.dataset) < self.per_rank:
            self.log(f"note: the dataset ({len(self.dataset)} examples) is smaller than one batch")

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

    # -- checkpoints -------------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        state = ckpt_io.read_state(path)
        problem = resume_mismatch(state.get("config", {}), self.config)
        if problem:
            raise ConfigError(f"cannot resume from {path}: {problem} (start a new --run-dir for a new run)")
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
            raise ckpt_io.CheckpointError(f"{path}: optimizer state does not fit this model ({err})") from None
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.step = int(state["step"])
        if state["data"]["position"] != self.step * self.global_batch:
            raise ckpt_io.CheckpointError(f"{path}: data position {state['data']['position']} does not match "
                                          f"step {self.step} x batch {self.global_batch}")
        self.skipped = int(state.get("nonfinite", {}).get("skipped_steps", 0))
        ranks = state.get("rng", [])
        if state.get("world_size") == self.info.world_size and len(ranks) == self.info.world_size:
            rng.restore(ranks[self.info.rank], self.generator)
        else:   # the data order is still exact; only the per-rank noise stream restarts
            self.log(f"note: {path.name} was written by {state.get('world_size')} processes, this run has "
                     f"{self.info.world_size}; the per-process random streams restart from the seed")
            self.generator.manual_seed(self.config.train.seed * 1_000_003 + self.step * 31 + self.info.rank)
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

    def _grad_norm(self) -> torch.Tensor:
        clip = self.config.train.grad_clip
        grads = [p.grad for p in self.params if p.grad is not None]
        if clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   images: torch.Tensor | None = None) -> tuple[bool, dict[str, torch.Tensor]]:
        """Forward/backward over the micro-batches, checks, optimizer and EMA update.

        ``images`` are the raw pixels next to latents (latent datasets, for encoder-based
        regularizers); for pixel datasets the images are ``x``. Returns ``(ok, terms)``; ``ok``
        is False when the step was skipped."""
        device = self.info.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if hasattr(self.dataset, "to_model"):   # cached latents: x0 = scale * (mean + std * eps) per step
            x = self.dataset.to_model(x, self.generator)
        elif self.config.data.hflip:            # (latent datasets serve stored mirror images instead)
            flip = torch.rand(x.shape[0], device=device, generator=self.generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.needs_images:
            images = x if images is None else images.to(device, non_blocking=True)
            image_chunks = images.split(self.micro)
        progress = Progress(images=self.step * self.global_batch, dataset_size=len(self.dataset))
        autocast = self._autocast()
        self.optimizer.zero_grad(set_to_none=True)
        chunks = list(zip(x.split(self.micro), y.split(self.micro)))
        terms: dict[str, torch.Tensor] = {}
        for i, (xc, yc) in enumerate(chunks):
            sync = (contextlib.nullcontext() if not self.info.distributed or i == len(chunks) - 1
                    else self.train_module.no_sync())
            with sync:
                total, parts = self.train_module(
                    xc, yc, teacher=self.teacher,
                    images=image_chunks[i] if self.needs_images else None, generator=self.generator,
                    progress=progress, autocast=autocast)
                share = xc.shape[0] / x.shape[0]
                loss = total * share
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for name, value in {"loss": total, **parts}.items():
                terms[name] = terms.get(name, 0.0) + value.detach().float() * share
        faults.point("step")    # tests: a kill between the backward pass and the optimizer step
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm()
        terms["grad_norm"] = grad_norm.detach().float()
        loss_ok = torch.isfinite(terms["loss"])
        grad_ok = torch.isfinite(terms["grad_norm"])
        flags = torch.stack([~loss_ok, ~grad_ok, torch.tensor(self._stop_requested, device=device)]).float()
        if self.info.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad_loss, bad_grad, stop = (bool(v) for v in flags.tolist())
        self._stop_requested = self._stop_requested or stop
        if self.scaler is not None and bad_grad and not bad_loss:
            self.scaler.update()    # fp16 overflow: the scaler skips the step and lowers the scale
            self.optimizer.zero_grad(set_to_none=True)
            return False, terms
        if bad_loss or bad_grad:
            self._bad_step("loss" if bad_loss else "gradient norm")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return False, terms
        self.consecutive_bad = 0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.ema.update(self.model)
        return True, terms

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

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        from .loop import run_loop
        return run_loop(self)

    _stop_requested = False

    def request_stop(self, *_):
        """SIGTERM/SIGUSR1 (preemption): finish the step, checkpoint, exit."""
        self._stop_requested = True

    def install_signal_handlers(self) -> None:
        with contextlib.suppress(ValueError):      # only possible in the main thread
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGUSR1, self.request_stop)

    def batches(self):
        return step_batches(self.dataset, self.order, self.global_batch, self.info.rank,
                            self.info.world_size, self.step, self.config.data.num_workers,
                            pin_memory=self.info.device.type == "cuda")

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

    def write_samples(self, metrics: MetricsLog | None) -> Path | None:
        if not self.info.is_main:
            return None
        path = self.run_dir / "samples" / f"step-{self.step:09d}.png"
        sample_grid(self.ema.model, self.objective, self.config, path, device=self.info.device,
                    decode=getattr(self.dataset, "decode", None))
        if metrics is not None:
            metrics.add_image("samples/ema", path, self.step)
        return path


def train(config: ExperimentConfig, run_dir: str | Path, resume: str | None = None, *,
          batch_hook=None, log=print) -> RunResult:
    """Train ``config`` into ``run_dir`` (joins the torchrun process group when there is one)."""
    info = dist_util.init(config.train.device)
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
