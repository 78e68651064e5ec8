"""The interface of an alignment regularizer, and the per-step context it reads.

A regularizer is an ``nn.Module`` (its trainable heads are ordinary submodules, optimised and
checkpointed with the model) with its own config dataclass. Per step the trainer

1. builds a :class:`StepContext` (clean data, noise, time, noisy input, dropped labels),
2. calls :meth:`Regularizer.prepare` on each regularizer (which may change the student's
   input, e.g. dual-timestep scheduling),
3. runs **one** student forward tapping the union of :meth:`Regularizer.student_layers`,
4. adds ``weight(progress) * loss(ctx)`` of each regularizer to the generative loss.

Neither the backbone nor the trainer knows any concrete regularizer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn

from ..objectives.base import Objective


@dataclass
class Progress:
    """Where training is: images seen so far and the epoch length that maps images to epochs."""

    images: int = 0
    dataset_size: int = 0

    @property
    def kimg(self) -> float:
        return self.images / 1000.0

    @property
    def epoch(self) -> int:
        """Completed epochs (the released code's epoch counter), 0 when the size is unknown."""
        return self.images // self.dataset_size if self.dataset_size else 0


@dataclass
class StepContext:
    """Everything a regularizer may read about the current training step."""

    model: nn.Module                    # the bare student backbone (never a DDP wrapper)
    objective: Objective
    x0: torch.Tensor                    # clean model input (latent sample or pixels)
    noise: torch.Tensor
    t: torch.Tensor                     # objective time, (B,) or per token (B, N)
    x_t: torch.Tensor
    y: torch.Tensor                     # labels after CFG dropout, shared by every forward
    teacher: nn.Module | None = None    # the EMA backbone
    images: torch.Tensor | None = None  # raw pixels in [-1, 1] for encoder-based regularizers
    progress: Progress = field(default_factory=Progress)
    generator: torch.Generator | None = None
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    attn_groups: torch.Tensor | None = None         # set by prepare() for attention separation
    features: dict[int, torch.Tensor] = field(default_factory=dict)   # student taps
    model_output: torch.Tensor | None = None


class Regularizer(nn.Module):
    """Base class: override :meth:`loss` and, as needed, the other hooks."""

    #: short name used in configs and in the logged loss (``loss/<name>``)
    name: str = "regularizer"

    def student_layers(self) -> tuple[int, ...]:
        """Blocks (1-based) whose outputs the student forward must return."""
        return ()

    def needs_teacher(self) -> bool:
        return False

    def needs_images(self) -> bool:
        return False

    def adapt_teacher(self, teacher: nn.Module) -> nn.Module:
        """The module the teacher forwards run on, built once from the EMA backbone (default: itself).

        It must share the EMA's tensors, not copy them (e.g. SRA's fp8 view). There is one teacher
        per run: with several teacher-using regularizers each adapts the previous one's result."""
        return teacher

    def prepare(self, ctx: StepContext) -> None:
        """Optionally change the student's input (``ctx.x_t``, ``ctx.t``, ``ctx.attn_groups``)."""

    def weight(self, progress: Progress) -> float:
        raise NotImplementedError

    def loss(self, ctx: StepContext) -> torch.Tensor:
        """The unweighted scalar loss for this step."""
        raise NotImplementedError

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return self.loss(ctx)
