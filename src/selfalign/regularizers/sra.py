"""Self-Representation Alignment (SRA, arXiv 2505.02831), as the paper specifies it.

The student's block ``m`` output, seen through a 2-layer SiLU head, predicts the EMA teacher's
raw block ``n`` output for the same data, the same noise and the same dropped labels at an
earlier (cleaner) time ``t' = clamp(t - k, ...)``, ``k ~ U[0, k_max)`` per example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..models.backbone import BackboneConfig
from ..models.fp8 import float8_view, fp8_unavailable_reason
from .base import Progress, Regularizer, RegularizerConfig, StepContext, register
from .distances import Distance, get_distance

# The paper's layer table: (student block m, teacher block n), 1-based. k_max is 0.2 for all of
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
        raise ConfigError(f"no {method} layer preset for {preset!r}: known {sorted(LAYER_PRESETS)}")
    return LAYER_PRESETS[key]


# "autocast": as the student; "fp32": the released code; "fp8": as the student, with the blocks'
# attention/MLP linears as row-scaled e4m3 matmuls (selfalign.models.fp8): for Ada/Hopper GPUs; a
# CPU runs PyTorch's emulated kernel, slower than "autocast", for tests.
TeacherPrecision = Literal["autocast", "fp32", "fp8"]


@dataclass
class StudentTeacherConfig(RegularizerConfig):
    """Settings of a regularizer aligning student block m, through a head, to the EMA teacher's block n."""

    student_layer: int = 8
    teacher_layer: int = 20
    distance: Distance = "smooth_l1"    # SRA paper: smooth_l1 (beta 0.05); SRA code: channel_cosine
    head: bool = True               # the paper's "no projection head" ablation sets False
    teacher_truncate: bool = True   # stop the teacher after block n (False: released code)

    @classmethod
    def for_model(cls, preset: str, **overrides):
        """The paper's layers for a model preset name ("SiT-XL/2") or family-size ("SiT-XL")."""
        m, n = preset_layers(preset, cls.name.upper())
        return cls(**{"student_layer": m, "teacher_layer": n, **overrides})

    def validate(self, depth: int) -> None:
        """1 <= m <= n <= depth."""
        super().validate(depth)
        m, n = self.student_layer, self.teacher_layer
        if m < 1:
            raise ConfigError(f"{self.name}.student_layer must be >= 1, got {m}")
        if n < m:
            raise ConfigError(f"{self.name}.student_layer={m} is deeper than {self.name}.teacher_layer={n} "
                              f"(need m <= n)")
        if n > depth:
            raise ConfigError(f"{self.name}.teacher_layer={n} is beyond the model depth {depth}")


@dataclass
class SRAConfig(StudentTeacherConfig):
    k_max: float = 0.2              # fraction of the time range (DiT: 0.2 = 200 steps)
    weight: float = 0.2             # lambda; the base value for official_decay
    weight_schedule: Literal["constant", "official_decay"] = "constant"
    decay_start_epoch: int = 149    # official_decay: 149 at 256 px, 99 at 512 px
    decay_period: float = 1000.0    # official_decay: 1000 at 256 px, 800 at 512 px
    teacher_precision: TeacherPrecision = "autocast"
    teacher_fraction: float = 1.0   # align only the first fraction of the batch (cheaper)

    def validate(self, depth: int) -> None:
        super().validate(depth)
        self.check_between("k_max", 0.0, 1.0)
        self.check_between("teacher_fraction", 0.0, 1.0, open_low=True)
        self.check_at_least("decay_period", 0.0, strict=True)


def projection_head(dim: int) -> nn.Sequential:
    """Linear(D, 2D) -> SiLU -> Linear(2D, D): on the student only, discarded after training."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))


class StudentTeacherRegularizer(Regularizer):
    """Base of SRA and its kin: student block m through a projection head, against teacher block n."""

    def __init__(self, config: StudentTeacherConfig, backbone: BackboneConfig):
        super().__init__(config, backbone)
        self.distance = get_distance(config.distance)
        self.head = projection_head(backbone.hidden_size) if config.head else nn.Identity()

    def student_layers(self):
        return (self.config.student_layer,)

    def needs_teacher(self):
        return True


@register("sra", SRAConfig)
class SRA(StudentTeacherRegularizer):

    def adapt_teacher(self, teacher: nn.Module) -> nn.Module:
        if self.config.teacher_precision != "fp8":
            return teacher
        reason = fp8_unavailable_reason(next(teacher.parameters()).device)
        if reason:
            raise ConfigError(f"sra.teacher_precision=fp8: {reason}; use sra.teacher_precision=autocast")
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
