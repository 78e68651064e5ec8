"""Dispersive loss (Wang & He, "Diffuse and Disperse", arXiv 2506.09027).

InfoNCE without positive pairs: the batch's intermediate features are pushed apart,

    L = log mean_{i,j} exp(-D(z_i, z_j) / tau),

the mean running over all B x B pairs, the diagonal (D = 0) included, as in the authors' code.

* ``distance="l2"`` (the paper's default, "InfoNCE-L2"): ``D = ||z_i - z_j||^2 / dim``, the
  squared distance divided by the feature dimension as in the released PyTorch code.
* ``distance="cosine"``: ``D = -cos(z_i, z_j)``.

Features: block ``layer``'s tokens (B, N, D), **flattened** to (B, N*D) (``pooling="flatten"``,
the released code) or **token-averaged** to (B, D) (``pooling="mean"``). Defaults are those of
the released PyTorch code: weight 0.25, temperature 1, the last block.

Batch: with ``scope="global"`` (default) the loss runs over the **whole global batch** of one
micro-step: features of every process are all-gathered (the other processes' parts as constants)
and each process computes the same loss. Gradients flow into the local part only, scaled by the
world size so that DDP's gradient *average* equals the gradient of the global loss. With
``scope="local"`` each process uses its own batch, as the released code (and the paper's JAX runs)
did. Gradient accumulation: each micro-batch is one loss. No target, no extra parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.backbone import BackboneConfig
from .base import Regularizer, RegularizerConfig, StepContext, register

DispersiveDistance = Literal["l2", "cosine"]


@dataclass
class DispersiveConfig(RegularizerConfig):
    layer: int | None = None    # block b (1-based); None: the last block (released code)
    weight: float = 0.25
    temperature: float = 1.0
    distance: DispersiveDistance = "l2"
    pooling: Literal["flatten", "mean"] = "flatten"
    scope: Literal["global", "local"] = "global"

    def validate(self, depth: int) -> None:
        super().validate(depth)
        self.check_block("layer", depth)
        self.check_at_least("temperature", 0.0, strict=True)


def dispersive_loss(z: torch.Tensor, temperature: float = 1.0,
                    distance: DispersiveDistance = "l2") -> torch.Tensor:
    """``log mean_{i,j} exp(-D(z_i, z_j) / tau)`` over all pairs of rows of ``z`` (B, F)."""
    z = z.float()
    if distance == "l2":
        sq = z.pow(2).sum(dim=1)
        # ||a-b||^2 = |a|^2 + |b|^2 - 2ab: no (B, B, F) tensor; the exact zeros on the diagonal
        # and the clamp undo the expansion's rounding.
        d = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0) / z.shape[1]
        d = d.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), 0.0)
    elif distance == "cosine":
        zn = F.normalize(z, dim=1)
        d = -(zn @ zn.T)
    else:
        raise ValueError(f"unknown dispersive distance {distance!r}: choose from {get_args(DispersiveDistance)}")
    logits = (-d / temperature).flatten()
    return torch.logsumexp(logits, dim=0) - math.log(logits.numel())


def gather_with_local_grad(z: torch.Tensor) -> torch.Tensor:
    """All processes' rows of ``z`` in rank order; gradients reach only this process's rows,
    multiplied by the world size (DDP averages gradients; the global loss wants their sum)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(z) for _ in range(world)]
    dist.all_gather(parts, z.detach().contiguous())
    scaled = z * (world - 1)
    parts[rank] = z + (scaled - scaled.detach())   # value exactly z, gradient world * dL/dz
    return torch.cat(parts)


@register("dispersive", DispersiveConfig)
class Dispersive(Regularizer):
    def __init__(self, config: DispersiveConfig, backbone: BackboneConfig):
        super().__init__(config, backbone)
        self.layer = config.layer or backbone.depth

    def student_layers(self):
        return (self.layer,)

    def loss(self, ctx: StepContext) -> torch.Tensor:
        feats = ctx.features[self.layer]
        z = feats.flatten(1) if self.config.pooling == "flatten" else feats.mean(dim=1)
        if self.config.scope == "global":
            z = gather_with_local_grad(z.float())
        return dispersive_loss(z, self.config.temperature, self.config.distance)
