"""The optimizer update that follows a step's backward pass, as the trainer and the benchmarks run it.

:class:`OptimizerUpdate` owns what happens between the accumulated gradients and the next step:
unscaling (fp16 with a ``GradScaler``), the global gradient norm (clipped when ``grad_clip > 0``),
one host synchronisation that checks the loss and the norm for finiteness (all-reduced over the
processes together with a stop request), then either the optimizer step and the EMA update, or a
refused step. The gradients are cleared in every case. :func:`adamw` builds the optimizer with
the kernels the trainer uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ema import EMA
from ..formats import faults

# AdamW implementations: torch's fused kernel, one foreach call per op, or torch's own choice
ADAMW_KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {}}


def adamw_kernel(device: torch.device) -> str:
    """The trainer's AdamW kernel: fused on CUDA, foreach elsewhere."""
    return "fused" if device.type == "cuda" else "foreach"


def adamw(params: list[nn.Parameter], device: torch.device, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0, kernel: str | None = None) -> torch.optim.AdamW:
    """AdamW over ``params`` with ``kernel`` (one of :data:`ADAMW_KERNELS`; default the trainer's)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             **ADAMW_KERNELS[kernel or adamw_kernel(device)])


@dataclass(frozen=True)
class UpdateResult:
    applied: bool                   # the optimizer stepped and the EMA followed
    grad_norm: torch.Tensor         # global gradient norm before clipping (detached, float)
    nonfinite: str | None = None    # "loss" or "gradient norm" when that check refused the step
    stop: bool = False              # some process asked to stop (every process sees the same)


class OptimizerUpdate:
    """Clip, check, step and follow with the EMA: ``backward(loss)`` per micro-batch, then call it once.

    ``ema`` follows ``model`` (the bare backbone) after every applied step. With ``distributed``
    the finiteness flags and the stop request are all-reduced, so every process decides alike.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, ema: EMA, model: nn.Module, *, grad_clip: float = 0.0,
                 scaler: torch.amp.GradScaler | None = None, distributed: bool = False):
        self.optimizer, self.grad_clip, self.scaler = optimizer, grad_clip, scaler
        self.ema, self.model, self.distributed = ema, model, distributed
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (scaled for fp16)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def grad_norm(self) -> torch.Tensor:
        """The global norm of the gradients; clips them to ``grad_clip`` when it is > 0."""
        if self.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def __call__(self, loss: torch.Tensor, stop: bool = False) -> UpdateResult:
        """Update the weights from the accumulated gradients unless ``loss`` or their norm is not
        finite; ``stop`` is this process's stop request, returned OR-ed over every process."""
        faults.point("step")    # tests: a kill between the backward pass and the optimizer step
        try:
            return self._update(loss, stop)
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def _update(self, loss: torch.Tensor, stop: bool) -> UpdateResult:
        scaler = self.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        grad_norm = self.grad_norm().detach().float()
        flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm),
                             torch.tensor(stop, device=loss.device)]).float()
        if self.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad_loss, bad_grad, stop = (bool(v) for v in flags.tolist())    # the one host sync
        if bad_loss or bad_grad:
            if scaler is not None:
                scaler.update()     # lowers the scale; an fp16 overflow of the gradients alone is its job
            overflow = scaler is not None and not bad_loss
            return UpdateResult(False, grad_norm, None if overflow else ("loss" if bad_loss else "gradient norm"),
                                stop)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.ema.update(self.model)
        return UpdateResult(True, grad_norm, stop=stop)
