"""SRA with dual-timestep scheduling and attention separation ("From SRA to Self-Flow",
arXiv 2607.02508; released code: vvvvvjdy/SRA, folder SiT-SRA_DTS_AS).

Per step, in :meth:`DTS.prepare`:

1. a random ``fraction`` (default 0.25) of each image's tokens forms group 1, the rest group 0;
2. group 0 keeps the step's time ``t``, group 1 gets a second, independently drawn time ``t2``
   (same distribution) -- *dual-timestep scheduling*; ``ctx.t`` becomes per token (B, N);
3. the student input is built per token from the same ``x0`` and noise: ``x_t`` uses each
   pixel's token time, and so does the generative loss's target (:func:`objectives.base.expand_time`
   broadcasts a (B, N) time to pixels);
4. with *attention separation* ``ctx.attn_groups`` holds the group ids, so tokens attend only
   within their own noise level (a block mask in scaled-dot-product attention).

The EMA teacher (raw block ``n``, no gradient) sees, by default, the whole image at the lower noise
level ``min(t, t2)`` with full attention; ``teacher_time="per_group"`` gives each group its own
time instead, optionally with the group mask (``teacher_attention_separation``) and SRA's earlier
time ``t - k``, ``k ~ U[0, teacher_k_max)``. The released training script uses
``per_group`` + ``teacher_k_max=0.2`` + ``teacher_attention_separation=True``. The student's block
``m`` through SRA's head predicts those features with the cosine loss, weight 0.5.

Only training changes: inference uses full attention and one time per image, as always.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from ..models.backbone import BackboneConfig
from .base import StepContext, register
from .distances import Distance
from .sra import StudentTeacherConfig, StudentTeacherRegularizer


@dataclass
class DTSConfig(StudentTeacherConfig):
    fraction: float = 0.25          # share of each image's tokens that gets the second time
    dual_timestep: bool = True      # False: both groups share t (attention separation alone)
    attention_separation: bool = True
    teacher_time: Literal["min", "per_group"] = "min"   # whole image at min(t, t2), or each its own
    teacher_k_max: float = 0.0      # SRA's earlier teacher time (released script: 0.2)
    teacher_attention_separation: bool = False   # group mask for the teacher too
    distance: Distance = "cosine"   # per-token 1 - cos; "channel_cosine" is the released code's
    weight: float = 0.5

    def validate(self, depth: int) -> None:
        super().validate(depth)
        self.check_between("fraction", 0.0, 1.0)
        self.check_between("teacher_k_max", 0.0, 1.0)


def split_tokens(batch: int, tokens: int, fraction: float, device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Group ids (B, N): exactly ``round(fraction * N)`` random tokens per image are 1, the rest 0."""
    count = round(fraction * tokens)
    order = torch.rand(batch, tokens, device=device, generator=generator).argsort(dim=1)
    groups = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    return groups.scatter_(1, order[:, :count], 1)


@register("dts", DTSConfig)
class DTS(StudentTeacherRegularizer):
    def __init__(self, config: DTSConfig, backbone: BackboneConfig):
        super().__init__(config, backbone)
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def prepare(self, ctx: StepContext) -> None:
        c, obj = self.config, ctx.objective
        if obj.kind != "flow":
            raise ConfigError("regularizers.dts needs objective.kind=flow (SiT): per-token times are not "
                              "defined for the DDPM objective's variance terms")
        if ctx.t.dim() != 1 or ctx.attn_groups is not None:
            raise ConfigError("regularizers.dts found per-token times already set: use one token-time "
                              "regularizer")
        batch, device = ctx.x0.shape[0], ctx.x0.device
        groups = split_tokens(batch, ctx.model.config.num_tokens, c.fraction, device, ctx.generator)
        t = ctx.t
        t2 = obj.sample_time(batch, device, ctx.generator) if c.dual_timestep else t
        ctx.t = torch.where(groups.bool(), t2[:, None], t[:, None])
        ctx.x_t = obj.interpolate(ctx.x0, ctx.noise, ctx.t)
        ctx.attn_groups = groups if c.attention_separation else None
        self._step = (groups, t, t2)

    def teacher_time(self, ctx: StepContext) -> torch.Tensor:
        """(B,) for ``min``, (B, N) for ``per_group``; earlier by ``k`` when ``teacher_k_max > 0``."""
        c, obj = self.config, ctx.objective
        groups, t, t2 = self._step

        def earlier(time):
            return obj.earlier_time(time, c.teacher_k_max, ctx.generator) if c.teacher_k_max > 0 else time

        if c.teacher_time == "min":
            return earlier(torch.minimum(t, t2))
        return torch.where(groups.bool(), earlier(t2)[:, None], earlier(t)[:, None])

    def teacher_features(self, ctx: StepContext) -> torch.Tensor:
        c, obj = self.config, ctx.objective
        t_teacher = self.teacher_time(ctx)
        x_teacher = obj.interpolate(ctx.x0, ctx.noise, t_teacher)
        groups = self._step[0] if c.teacher_attention_separation else None
        with torch.no_grad(), ctx.autocast():
            _, feats = ctx.teacher(x_teacher, obj.model_time(t_teacher), ctx.y, taps=[c.teacher_layer],
                                   features_only=c.teacher_truncate, attn_groups=groups)
        return feats[c.teacher_layer]

    def loss(self, ctx: StepContext) -> torch.Tensor:
        if self._step is None:
            raise RuntimeError("dts.loss called without dts.prepare for this step")
        if ctx.teacher is None:
            raise RuntimeError("dts needs the EMA teacher in the step context")
        try:
            target = self.teacher_features(ctx)
            with ctx.autocast():
                pred = self.head(ctx.features[self.config.student_layer])
            return self.distance(pred.float(), target.float())
        finally:
            self._step = None
