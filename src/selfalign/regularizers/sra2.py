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

from ..models.backbone import BackboneConfig
from .base import Regularizer, RegularizerConfig, StepContext, register
from .distances import Distance, get_distance
from .sra import preset_layers


@dataclass
class SRA2Config(RegularizerConfig):
    layer: int = 8              # the aligned block (1-based)
    hidden_dim: int = 0         # MLP width; 0: the model's hidden size
    distance: Distance = "smooth_l1"
    weight: float = 0.2

    @classmethod
    def for_model(cls, preset: str, **overrides) -> "SRA2Config":
        return cls(**{"layer": preset_layers(preset, "SRA 2")[0], **overrides})

    def validate(self, depth: int) -> None:
        super().validate(depth)
        self.check_block("layer", depth)
        self.check_at_least("hidden_dim", 0)


@register("sra2", SRA2Config)
class SRA2(Regularizer):
    def __init__(self, config: SRA2Config, backbone: BackboneConfig):
        super().__init__(config, backbone)
        self.distance = get_distance(config.distance)
        hidden = config.hidden_dim or backbone.hidden_size
        self.head = nn.Sequential(nn.Linear(backbone.hidden_size, hidden), nn.SiLU(),
                                  nn.Linear(hidden, backbone.patch_size ** 2 * backbone.in_channels))

    def student_layers(self):
        return (self.config.layer,)

    def loss(self, ctx: StepContext) -> torch.Tensor:
        target = ctx.model.patchify(ctx.x0).float()          # (B, N, p*p*C), no gradient path
        with ctx.autocast():
            pred = self.head(ctx.features[self.config.layer])
        return self.distance(pred.float(), target)
