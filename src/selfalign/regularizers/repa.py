"""REPA: representation alignment with a frozen external encoder (arXiv 2410.06940).

The student's block ``d`` tokens, through a 3-layer SiLU MLP projector (REPA's ``build_mlp``:
``Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU -> Linear(2048, z_dim)``), predict the
frozen encoder's patch tokens of the clean image; the loss is the negative per-token cosine,
averaged over tokens and batch (REPA's ``proj_loss``), weight 0.5.

The encoder sees the raw images (``ctx.images``, in [-1, 1]); for pixel-space data they are
``x0`` itself. It is frozen and held outside this module's parameters and state dict, so it is
never optimised, synchronised by DDP, or saved in checkpoints (see :mod:`.encoders`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..models.backbone import BackboneConfig
from .base import Regularizer, RegularizerConfig, StepContext, register
from .distances import Distance, get_distance
from .encoders import fashion_classifier_encoder, freeze, load_dinov2, match_token_grid, token_grid

# Block d (1-based). SiT-B: 4 and L/XL: 8 are REPA's; the others are selfalign's choices
# (DiT follows SiT; S follows B, whose depth it shares; T and M near 1/3 of their depth).
DEPTH_PRESETS = {
    "SiT-B": 4, "SiT-L": 8, "SiT-XL": 8, "SiT-S": 4, "SiT-T": 2, "SiT-M": 3,
    "DiT-B": 4, "DiT-L": 8, "DiT-XL": 8, "DiT-S": 4, "DiT-T": 2, "DiT-M": 3,
}
STAND_IN_ENCODER = "fmnist-classifier"
Encoder = Literal["dinov2-vits14", "dinov2-vitb14", "dinov2-vitl14", "dinov2-vitg14", "dinov2-vits14-reg",
                  "dinov2-vitb14-reg", "dinov2-vitl14-reg", "dinov2-vitg14-reg", "fmnist-classifier"]


@dataclass
class REPAConfig(RegularizerConfig):
    layer: int = 8                      # block d whose tokens are aligned
    encoder: Encoder = "dinov2-vitb14"  # DINOv2 (-reg: with registers), or selfalign's stand-in
    encoder_layout: Literal["timm", "hub"] = "timm"    # DINOv2 only: timm or torch.hub
    encoder_weights: str = ""           # a local weight file; empty: download (hub id for timm)
    encoder_hub_repo: str = "facebookresearch/dinov2"   # torch.hub repo or a local clone
    projector_dim: int = 2048
    distance: Distance = "negative_cosine"   # REPA: -cos per token, mean over tokens and batch
    weight: float = 0.5

    @classmethod
    def for_model(cls, preset: str, **overrides) -> "REPAConfig":
        key = preset.split("/")[0]
        if key not in DEPTH_PRESETS:
            raise ConfigError(f"no REPA depth preset for {preset!r}: known {sorted(DEPTH_PRESETS)}")
        return cls(**{"layer": DEPTH_PRESETS[key], **overrides})

    def validate(self, depth: int) -> None:
        super().validate(depth)
        self.check_block("layer", depth)
        self.check_at_least("projector_dim", 1)


def build_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """REPA's projector: three linear layers with SiLU between them."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim),
                         nn.SiLU(), nn.Linear(hidden_dim, out_dim))


def build_encoder(config: REPAConfig, grid: int) -> nn.Module:
    """The frozen encoder named by the config, for a student token grid of ``grid`` x ``grid``."""
    if config.encoder == STAND_IN_ENCODER:
        return fashion_classifier_encoder(config.encoder_weights or None)   # selfalign's, no download
    return load_dinov2(config.encoder, layout=config.encoder_layout, weights=config.encoder_weights,
                       grid=grid, hub_repo=config.encoder_hub_repo)


@register("repa", REPAConfig)
class REPA(Regularizer):
    """``encoder``: a frozen encoder to use instead of the one the config names (tests)."""

    def __init__(self, config: REPAConfig, backbone: BackboneConfig, encoder: nn.Module | None = None):
        super().__init__(config, backbone)
        self.distance = get_distance(config.distance)
        grid = token_grid(backbone.num_tokens)[0]
        encoder = freeze(encoder) if encoder is not None else build_encoder(config, grid)
        if not getattr(encoder, "embed_dim", 0):
            raise ValueError("the REPA encoder must have an embed_dim attribute (its token width)")
        # Outside the module tree on purpose: not a parameter, not in state_dict, not in DDP.
        object.__setattr__(self, "encoder", encoder)
        self.projector = build_mlp(backbone.hidden_size, config.projector_dim, encoder.embed_dim)

    def student_layers(self):
        return (self.config.layer,)

    def needs_images(self):
        return True

    def raw_images(self, ctx: StepContext) -> torch.Tensor:
        """``ctx.images``, or ``x0`` for pixel data; latents are refused, not misread as images."""
        images = ctx.images if ctx.images is not None else ctx.x0
        if images.shape[1] not in (1, 3):
            raise ConfigError(f"REPA needs raw images (1 or 3 channels), got {images.shape[1]} channels: "
                              "serve latent data with its images (the latent dataset's with_images)")
        return images

    @torch.no_grad()
    def target(self, images: torch.Tensor, grid: tuple[int, int], autocast) -> torch.Tensor:
        """Encoder patch tokens on the student's token grid, without gradients."""
        param = next(self.encoder.parameters(), None)
        if param is not None and param.device != images.device:
            self.encoder.to(images.device)
        with autocast():
            tokens = self.encoder(images)
        return match_token_grid(tokens.float(), grid)

    def loss(self, ctx: StepContext) -> torch.Tensor:
        feats = ctx.features[self.config.layer]
        target = self.target(self.raw_images(ctx), token_grid(feats.shape[1]), ctx.autocast)
        with ctx.autocast():
            pred = self.projector(feats)
        return self.distance(pred.float(), target)
