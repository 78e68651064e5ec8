"""One training step's loss: generative objective plus every regularizer, one student forward.

:class:`TrainingStep` is the module the trainer wraps in DDP (so the regularizers' heads are
synchronised with the backbone); :func:`accumulate_gradients` runs it over the micro-batches of
a batch. The trainer and the training-step benchmark both go through these two. They know the
interfaces only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn

from ..models.backbone import drop_labels
from ..objectives.base import Objective
from ..regularizers.base import Progress, Regularizer, StepContext


class TrainingStep(nn.Module):
    def __init__(self, model: nn.Module, objective: Objective, regularizers: dict[str, Regularizer],
                 label_dropout: float = 0.1):
        super().__init__()
        self.model = model
        self.objective = objective
        self.regularizers = nn.ModuleDict(regularizers)
        self.label_dropout = label_dropout

    def student_layers(self) -> list[int]:
        return sorted({m for r in self.regularizers.values() for m in r.student_layers()})

    def forward(self, x0: torch.Tensor, y: torch.Tensor, *, teacher: nn.Module | None = None,
                images: torch.Tensor | None = None, generator: torch.Generator | None = None,
                progress: Progress | None = None,
                autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        """Returns ``(total_loss, {"gen": ..., "<regularizer>": unweighted loss, ...})``."""
        obj, model = self.objective, self.model
        y = drop_labels(y, self.label_dropout, model.config.num_classes, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        t = obj.sample_time(x0.shape[0], x0.device, generator)
        ctx = StepContext(model=model, objective=obj, x0=x0, noise=noise, t=t,
                          x_t=obj.interpolate(x0, noise, t), y=y, teacher=teacher, images=images,
                          progress=progress or Progress(), generator=generator, autocast=autocast)
        for reg in self.regularizers.values():
            reg.prepare(ctx)
        with autocast():
            out, ctx.features = model(ctx.x_t, obj.model_time(ctx.t), y, taps=self.student_layers(),
                                      attn_groups=ctx.attn_groups)
        ctx.model_output = out
        terms = {"gen": obj.loss(out.float(), ctx.x0, ctx.noise, ctx.t, ctx.x_t).mean()}
        total = terms["gen"]
        for name, reg in self.regularizers.items():
            terms[name] = reg(ctx)
            total = total + reg.weight(ctx.progress) * terms[name]
        return total, terms


def accumulate_gradients(module: nn.Module, x0: torch.Tensor, y: torch.Tensor, micro: int,
                         backward: Callable[[torch.Tensor], None], *, images: torch.Tensor | None = None,
                         no_sync: Callable[[], ContextManager] | None = None,
                         **forward) -> dict[str, torch.Tensor]:
    """Forward and ``backward`` over the micro-batches ``x0.split(micro)``; each micro-batch's loss
    is weighted by its share of the batch, so the gradients are those of the batch mean.

    ``module`` is a :class:`TrainingStep` (or its DDP wrapper, whose ``no_sync`` then skips the
    gradient all-reduce of every micro-batch but the last); ``forward`` goes to each call
    (teacher, generator, progress, autocast). Returns the batch mean of every loss term
    (``"loss"``: the weighted total), detached, in float32.
    """
    chunks = list(zip(x0.split(micro), y.split(micro)))
    image_chunks = images.split(micro) if images is not None else [None] * len(chunks)
    terms: dict[str, torch.Tensor] = {}
    for i, (xc, yc) in enumerate(chunks):
        last = i == len(chunks) - 1
        with contextlib.nullcontext() if no_sync is None or last else no_sync():
            total, parts = module(xc, yc, images=image_chunks[i], **forward)
            share = xc.shape[0] / x0.shape[0]
            backward(total * share)
        for name, value in {"loss": total, **parts}.items():
            terms[name] = terms.get(name, 0.0) + value.detach().float() * share
    return terms
