"""Exponential moving average of a model's weights: the SRA teacher and the sampling model."""
from __future__ import annotations

import copy

import torch
from torch import nn


def _checked_decay(decay: float) -> float:
    if not 0.0 <= decay <= 1.0:   # also rejects NaN
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")
    return float(decay)


class EMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * model`` after every optimizer step.

    Starts as an exact copy of ``model``. The update is one fused ``torch._foreach_lerp_`` over all
    floating-point parameters (no Python loop per parameter); buffers are copied. ``foreach=False``
    reproduces the released code's per-parameter loop, for benchmarks only.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, foreach: bool = True):
        super().__init__()
        self.decay = _checked_decay(decay)
        self.foreach = foreach
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._matched: int | None = None   # id of the last model whose parameters matched

    def _pairs(self, model: nn.Module):
        ema_params = [p for p in self.model.parameters()]
        params = [p.detach() for p in model.parameters()]
        if id(model) != self._matched:   # checked once per model, not on every step
            if len(ema_params) != len(params) or any(
                    e.shape != p.shape for e, p in zip(ema_params, params)):
                raise ValueError("EMA and model have different parameter lists")
            self._matched = id(model)
        return ema_params, params

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        decay = self.decay if decay is None else _checked_decay(decay)
        ema_params, params = self._pairs(model)
        if self.foreach:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        else:
            for e, p in zip(ema_params, params):
                e.mul_(decay).add_(p, alpha=1.0 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Make the EMA an exact copy of ``model`` (decay 0)."""
        for e, p in zip(*self._pairs(model)):
            e.copy_(p)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def train(self, mode: bool = True):   # the EMA never leaves eval mode
        return super().train(False)
