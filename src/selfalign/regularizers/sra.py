"""Self-Representation Alignment (SRA, arXiv 2505.02831), to the letter of SPEC section 2.

The student's block ``m`` output, seen through a 2-layer SiLU head, predicts the EMA teacher's
raw block ``n`` output for the same data, the same noise and the same dropped labels at an
earlier (cleaner) time ``t' = clamp(t - k, ...)``, ``k ~ U[0, k_max)`` per example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.fp8 import float8_view, fp8_unavailable_reason
from .base import Progress, Regularizer, StepContext
from .distances import get_distance

# SPEC section 2's table: (student block m, teacher block n), 1-based. k_max is 0.2 for all of
# them (200 of 1000 steps for DiT). The small CPU sizes follow the authors' rule of thumb
# (student near 1/4 of the depth, teacher near 3/4).
LAYER_PRESETS = {
    "SiT-B": (3, 8), "SiT-L": (6, 16), "SiT-XL": (8, 20),
    "DiT-B": (3, 7), "DiT-L": (6, 14), "DiT-XL": (8, 16),
    "SiT-T": (2, 4), "SiT-M": (2, 6), "DiT-T": (2, 4), "DiT-M": (2, 6),
    "SiT-S": (3, 8), "DiT-S": (3, 7),
}


def preset_layers(preset: str, method: str = "SRA") -> tuple[int, int]:
    """(student block m, teacher block n) of the layer table for "SiT-XL/2" or "SiT-XL"."""
    key = preset.split("/")[0]
    if key not in LAYER_PRESETS:
        raise ValueError(f"no {method} layer preset for {preset!r}: known {sorted(LAYER_PRESETS)}")
    return LAYER_PRESETS[key]


# "autocast": as the student; "fp32": the released code; "fp8": as the student, with the blocks'
# attention/MLP linears as row-scaled e4m3 matmuls (selfalign.models.fp8): for Ada/Hopper GPUs; a
# CPU runs PyTorch's emulated kernel, slower than "autocast" (0.59x teacher on cpu-tiny), for tests.
TEACHER_PRECISIONS = ("autocast", "fp32", "fp8")
WEIGHT_SCHEDULES = ("constant", "official_decay")


@dataclass
class SRAConfig:
    student_layer: int = 8
    teacher_layer: int = 20
    k_max: float = 0.2              # fraction of the time range (DiT: 0.2 = 200 steps)
    distance: str = "smooth_l1"     # paper: smooth_l1 (beta 0.05); code: channel_cosine
    weight: float = 0.2             # lambda; the base value for official_decay
    weight_schedule: str = "constant"
    decay_start_epoch: int = 149    # official_decay: 149 at 256 px, 99 at 512 px
    decay_period: float = 1000.0    # official_decay: 1000 at 256 px, 800 at 512 px
    head: bool = True               # the paper's "no projection head" ablation sets False
    teacher_truncate: bool = True   # stop the teacher after block n (False: released code)
    teacher_precision: str = "autocast"   # "autocast" (as the student) | "fp32" (released) | "fp8"
    teacher_fraction: float = 1.0   # align only the first fraction of the batch (cheaper)

    @classmethod
    def for_model(cls, preset: str, **overrides) -> "SRAConfig":
        """The paper's layers for a model preset name ("SiT-XL/2") or family-size ("SiT-XL")."""
        m, n = preset_layers(preset, "SRA")
        return cls(**{"student_layer": m, "teacher_layer": n, **overrides})

    def validate(self, depth: int | None = None) -> None:
        if self.student_layer < 1:
            raise ValueError(f"sra.student_layer must be >= 1, got {self.student_layer}")
        if self.teacher_layer < self.student_layer:
            raise ValueError(f"sra.student_layer={self.student_layer} is deeper than "
                             f"sra.teacher_layer={self.teacher_layer} (need m <= n)")
        if depth is not None and self.teacher_layer > depth:
            raise ValueError(f"sra.teacher_layer={self.teacher_layer} is beyond the model depth {depth}")
        if not 0.0 <= self.k_max <= 1.0:
            raise ValueError(f"sra.k_max must be in [0, 1], got {self.k_max}")
        try:
            get_distance(self.distance)
        except ValueError as err:
            raise ValueError(f"sra.distance: {err}") from None
        if self.weight < 0:
            raise ValueError(f"sra.weight must be >= 0, got {self.weight}")
        if self.weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(f"sra.weight_schedule={self.weight_schedule!r} is not one of {WEIGHT_SCHEDULES}")
        if self.teacher_precision not in TEACHER_PRECISIONS:
            raise ValueError(f"sra.teacher_precision={self.teacher_precision!r} is not one of {TEACHER_PRECISIONS}")
        if not 0.0 < self.teacher_fraction <= 1.0:
            raise ValueError(f"sra.teacher_fraction must be in (0, 1], got {self.teacher_fraction}")
        if self.decay_period <= 0:
            raise ValueError(f"sra.decay_period must be > 0, got {self.decay_period}")


def projection_head(dim: int) -> nn.Sequential:
    """Linear(D, 2D) -> SiLU -> Linear(2D, D): on the student only, discarded after training."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))


class SRA(Regularizer):
    name = "sra"

    def __init__(self, config: SRAConfig, hidden_size: int, depth: int):
        super().__init__()
        config.validate(depth)
        self.config = config
        self.distance = get_distance(config.distance)
        self.head = projection_head(hidden_size) if config.head else nn.Identity()

    def student_layers(self):
        return (self.config.student_layer,)

    def needs_teacher(self):
        return True

    def adapt_teacher(self, teacher: nn.Module) -> nn.Module:
        if self.config.teacher_precision != "fp8":
            return teacher
        reason = fp8_unavailable_reason(next(teacher.parameters()).device)
        if reason:
            raise ValueError(f"sra.teacher_precision=fp8: {reason}; use sra.teacher_precision=autocast")
        return float8_view(teacher)

    def weight(self, progress: Progress) -> float:
        c = self.config
        if c.weight_schedule == "constant" or progress.epoch <= c.decay_start_epoch:
            return c.weight
        # Released code: lambda(e) = base * 0.1 ** ((e - start) / period) after the start epoch.
        return c.weight * 0.1 ** ((progress.epoch - c.decay_start_epoch) / c.decay_period)

    def teacher_features(self, ctx: StepContext, count: int) -> torch.Tensor:
        """Raw block-n tokens of the EMA teacher at the earlier time, without gradients."""
        c, obj = self.config, ctx.objective
        x0, noise, y, t = ctx.x0[:count], ctx.noise[:count], ctx.y[:count], ctx.t[:count]
        t_teacher = obj.earlier_time(t, c.k_max, ctx.generator)
        x_teacher = obj.interpolate(x0, noise, t_teacher)
        precision = (torch.autocast(x0.device.type, enabled=False) if c.teacher_precision == "fp32"
                     else ctx.autocast())     # fp8: the linears are fp8 in the teacher module itself
        with torch.no_grad(), precision:
            _, feats = ctx.teacher(x_teacher, obj.model_time(t_teacher), y,
                                   taps=[c.teacher_layer], features_only=c.teacher_truncate)
        return feats[c.teacher_layer]

    def loss(self, ctx: StepContext) -> torch.Tensor:
        if ctx.teacher is None:
            raise RuntimeError("SRA needs the EMA teacher in the step context")
        if self.config.teacher_precision == "fp8" and not getattr(ctx.teacher, "is_float8_view", False):
            raise RuntimeError("sra.teacher_precision=fp8: pass sra.adapt_teacher(ema.model) as the teacher "
                               "(the trainer does), not the EMA model itself")
        count = max(1, math.ceil(self.config.teacher_fraction * ctx.x0.shape[0]))
        target = self.teacher_features(ctx, count)
        with ctx.autocast():
            pred = self.head(ctx.features[self.config.student_layer][:count])
        return self.distance(pred.float(), target.float())
