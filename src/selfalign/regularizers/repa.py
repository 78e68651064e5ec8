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

import torch
from torch import nn

from .base import Progress, Regularizer, StepContext
from .distances import get_distance
from .encoders import fashion_classifier_encoder, freeze, load_dinov2, match_token_grid, token_grid

# Block d (1-based). SiT-B: 4 and L/XL: 8 are REPA's; the others are selfalign's choices
# (DiT follows SiT; S follows B, whose depth it shares; T and M near 1/3 of their depth).
DEPTH_PRESETS = {
    "SiT-B": 4, "SiT-L": 8, "SiT-XL": 8, "SiT-S": 4, "SiT-T": 2, "SiT-M": 3,
    "DiT-B": 4, "DiT-L": 8, "DiT-XL": 8, "DiT-S": 4, "DiT-T": 2, "DiT-M": 3,
}
ENCODER_LAYOUTS = ("timm", "hub")
STAND_IN_ENCODER = "fmnist-classifier"


@dataclass
class REPAConfig:
    layer: int = 8                      # block d whose tokens are aligned
    encoder: str = "dinov2-vitb14"      # dinov2-vit{s,b,l,g}14[-reg], or fmnist-classifier
    encoder_layout: str = "timm"        # DINOv2 only: "timm" or "hub" (torch.hub)
    encoder_weights: str = ""           # a local weight file; empty: download (hub id for timm)
    encoder_hub_repo: str = "facebookresearch/dinov2"   # torch.hub repo or a local clone
    projector_dim: int = 2048
    distance: str = "negative_cosine"   # REPA: -cos per token, mean over tokens and batch
    weight: float = 0.5

    @classmethod
    def for_model(cls, preset: str, **overrides) -> "REPAConfig":
        key = preset.split("/")[0]
        if key not in DEPTH_PRESETS:
            raise ValueError(f"no REPA depth preset for {preset!r}: known {sorted(DEPTH_PRESETS)}")
        return cls(**{"layer": DEPTH_PRESETS[key], **overrides})

    def validate(self, depth: int | None = None) -> None:
        if self.layer < 1 or (depth is not None and self.layer > depth):
            raise ValueError(f"repa.layer={self.layer} must be a block in 1..{depth or 'depth'}")
        if self.encoder_layout not in ENCODER_LAYOUTS:
            raise ValueError(f"repa.encoder_layout={self.encoder_layout!r} is not one of {ENCODER_LAYOUTS}")
        if self.projector_dim < 1:
            raise ValueError(f"repa.projector_dim must be >= 1, got {self.projector_dim}")
        get_distance(self.distance)
        if self.weight < 0:
            raise ValueError(f"repa.weight must be >= 0, got {self.weight}")


def build_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """REPA's projector: three linear layers with SiLU between them."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim),
                         nn.SiLU(), nn.Linear(hidden_dim, out_dim))


def build_encoder(config: REPAConfig, grid: int) -> nn.Module:
    """The frozen encoder named by the config, for a student token grid of ``grid`` x ``grid``."""
    if config.encoder == STAND_IN_ENCODER:
        return fashion_classifier_encoder(config.encoder_weights or None)   # selfalign's, no download
    if config.encoder.lower().startswith("dinov2"):
        return load_dinov2(config.encoder, layout=config.encoder_layout, weights=config.encoder_weights,
                           grid=grid, hub_repo=config.encoder_hub_repo)
    raise ValueError(f"unknown repa.encoder {config.encoder!r}: use dinov2-vit{{s,b,l,g}}14[-reg] "
                     f"or {STAND_IN_ENCODER}")


class REPA(Regularizer):
    name = "repa"

    def __init__(self, config: REPAConfig, model: nn.Module, encoder: nn.Module | None = None):
        super().__init__()
        config.validate(model.config.depth)
        self.config = config
        self.distance = get_distance(config.distance)
        grid = token_grid(model.config.num_tokens)[0]
        encoder = freeze(encoder) if encoder is not None else build_encoder(config, grid)
        if not getattr(encoder, "embed_dim", 0):
            raise ValueError("the REPA encoder must have an embed_dim attribute (its token width)")
        # Outside the module tree on purpose: not a parameter, not in state_dict, not in DDP.
        object.__setattr__(self, "encoder", encoder)
        self.projector = build_mlp(model.config.hidden_size, config.projector_dim, encoder.embed_dim)

    def student_layers(self):
        return (self.config.layer,)

    def needs_images(self):
        return True

    def weight(self, progress: Progress) -> float:
        return self.config.weight

    def raw_images(self, ctx: StepContext) -> torch.Tensor:
        """``ctx.images``, or ``x0`` for pixel data; latents are refused, not misread as images."""
        images = ctx.images if ctx.images is not None else ctx.x0
        if images.shape[1] not in (1, 3):
            raise RuntimeError(f"REPA needs raw images (1 or 3 channels), got {images.shape[1]} channels: "
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
