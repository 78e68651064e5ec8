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

import torch
from torch import nn

from .base import Progress, Regularizer, StepContext
from .distances import get_distance
from .sra import preset_layers, projection_head

TEACHER_TIMES = ("min", "per_group")


@dataclass
class DTSConfig:
    student_layer: int = 8
    teacher_layer: int = 20
    fraction: float = 0.25          # share of each image's tokens that gets the second time
    dual_timestep: bool = True      # False: both groups share t (attention separation alone)
    attention_separation: bool = True
    teacher_time: str = "min"       # "min": whole image at min(t, t2); "per_group": each its own
    teacher_k_max: float = 0.0      # SRA's earlier teacher time (released script: 0.2)
    teacher_attention_separation: bool = False   # group mask for the teacher too
    distance: str = "cosine"        # per-token 1 - cos; "channel_cosine" is the released code's
    weight: float = 0.5
    head: bool = True
    teacher_truncate: bool = True   # stop the teacher after block n

    @classmethod
    def for_model(cls, preset: str, **overrides) -> "DTSConfig":
        m, n = preset_layers(preset, "DTS")
        return cls(**{"student_layer": m, "teacher_layer": n, **overrides})

    def validate(self, depth: int | None = None) -> None:
        if not 1 <= self.student_layer <= self.teacher_layer:
            raise ValueError(f"dts.student_layer={self.student_layer} must be in 1..teacher_layer="
                             f"{self.teacher_layer}")
        if depth is not None and self.teacher_layer > depth:
            raise ValueError(f"dts.teacher_layer={self.teacher_layer} is beyond the model depth {depth}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"dts.fraction must be in [0, 1], got {self.fraction}")
        if self.teacher_time not in TEACHER_TIMES:
            raise ValueError(f"dts.teacher_time={self.teacher_time!r} is not one of {TEACHER_TIMES}")
        if not 0.0 <= self.teacher_k_max <= 1.0:
            raise ValueError(f"dts.teacher_k_max must be in [0, 1], got {self.teacher_k_max}")
        get_distance(self.distance)
        if self.weight < 0:
            raise ValueError(f"dts.weight must be >= 0, got {self.weight}")


def split_tokens(batch: int, tokens: int, fraction: float, device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Group ids (B, N): exactly ``round(fraction * N)`` random tokens per image are 1, the rest 0."""
    count = round(fraction * tokens)
    order = torch.rand(batch, tokens, device=device, generator=generator).argsort(dim=1)
    groups = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    return groups.scatter_(1, order[:, :count], 1)


class DTS(Regularizer):
    name = "dts"

    def __init__(self, config: DTSConfig, model: nn.Module):
        super().__init__()
        config.validate(model.config.depth)
        self.config = config
        self.distance = get_distance(config.distance)
        self.head = projection_head(model.config.hidden_size) if config.head else nn.Identity()
        self._step: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def student_layers(self):
        return (self.config.student_layer,)

    def needs_teacher(self):
        return True

    def weight(self, progress: Progress) -> float:
        return self.config.weight

    def prepare(self, ctx: StepContext) -> None:
        c, obj = self.config, ctx.objective
        if obj.kind != "flow":
            raise ValueError("dts needs a flow objective (SiT): per-token times are not defined "
                             "for the DDPM objective's variance terms")
        if ctx.t.dim() != 1 or ctx.attn_groups is not None:
            raise ValueError("dts found per-token times already set: use one token-time regularizer")
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
