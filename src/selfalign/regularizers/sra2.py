"""SRA 2 (arXiv 2601.17830): align an early block to the model's own input, no teacher.

The student's block ``layer`` tokens, through a small 2-layer SiLU MLP, predict the clean model
input ``x0`` patchified exactly as the final layer's output is laid out: tokens
(B, N, p*p*C). For latent data ``x0`` is the (scaled) VAE latent -- the paper's VAE features --
for pixel data the pixels. Loss: smooth-L1 (beta 0.05, SRA's), averaged over tokens, channels and
batch. No teacher, no encoder: the cheapest alignment.

The paper's exact layer and weight were not available to us; the defaults use SRA's student
layers (:data:`selfalign.regularizers.sra.LAYER_PRESETS`) and SRA's smooth-L1 weight 0.2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Progress, Regularizer, StepContext
from .distances import get_distance
from .sra import preset_layers


@dataclass
class SRA2Config:
    layer: int = 8              # the aligned block (1-based)
    hidden_dim: int = 0         # MLP width; 0: the model's hidden size
    distance: str = "smooth_l1"
    weight: float = 0.2

    @classmethod
    def for_model(cls, preset: str, **overrides) -> "SRA2Config":
        return cls(**{"layer": preset_layers(preset, "SRA 2")[0], **overrides})

    def validate(self, depth: int | None = None) -> None:
        if self.layer < 1 or (depth is not None and self.layer > depth):
            raise ValueError(f"sra2.layer={self.layer} must be a block in 1..{depth or 'depth'}")
        if self.hidden_dim < 0:
            raise ValueError(f"sra2.hidden_dim must be >= 0, got {self.hidden_dim}")
        get_distance(self.distance)
        if self.weight < 0:
            raise ValueError(f"sra2.weight must be >= 0, got {self.weight}")


class SRA2(Regularizer):
    name = "sra2"

    def __init__(self, config: SRA2Config, model: nn.Module):
        super().__init__()
        mc = model.config
        config.validate(mc.depth)
        self.config = config
        self.distance = get_distance(config.distance)
        hidden = config.hidden_dim or mc.hidden_size
        self.head = nn.Sequential(nn.Linear(mc.hidden_size, hidden), nn.SiLU(),
                                  nn.Linear(hidden, mc.patch_size ** 2 * mc.in_channels))

    def student_layers(self):
        return (self.config.layer,)

    def weight(self, progress: Progress) -> float:
        return self.config.weight

    def loss(self, ctx: StepContext) -> torch.Tensor:
        target = ctx.model.patchify(ctx.x0).float()          # (B, N, p*p*C), no gradient path
        with ctx.autocast():
            pred = self.head(ctx.features[self.config.layer])
        return self.distance(pred.float(), target)
