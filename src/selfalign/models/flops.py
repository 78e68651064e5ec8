"""Analytic FLOP counts of the DiT/SiT backbone and of a training step, for model FLOPs utilisation.

Convention: one multiply-add is **2 FLOPs**; only matrix products are counted (linear layers, the
patch-embedding convolution, the two attention products ``Q K^T`` and ``A V``), which is what
:class:`torch.utils.flop_counter.FlopCounterMode` counts. Norms, activations, softmax and
elementwise ops are ignored. The DiT paper's "Gflops" are multiply-adds: DiT-XL/2's 118.6 is
237.3 GFLOPs here.

A training step is counted as 3 forwards (the backward of a matrix product costs two of them), plus
what a regularizer adds: the SRA teacher's forward through blocks ``1..n`` (no backward) and the
projection head's forward and backward. These are *model* FLOPs: recomputation by gradient
checkpointing and the blocks a released-code teacher runs beyond ``n`` are not useful work and are
not counted.
"""
from __future__ import annotations

from .backbone import BackboneConfig

FREQUENCY_SIZE = 256   # the timestep embedder's sinusoidal input width (models.backbone)


def forward_flops(config: BackboneConfig, *, blocks: int | None = None, final: bool = True,
                  per_token_time: bool = False) -> dict[str, int]:
    """FLOPs of one image's forward, by component.

    ``blocks`` stops after that many blocks (a truncated teacher); ``final=False`` leaves out the
    final layer (what ``features_only=True`` skips). ``per_token_time`` counts the conditioning
    per token, as the dual-timestep forward runs it.
    """
    n, d, p = config.num_tokens, config.hidden_size, config.patch_size
    depth = config.depth if blocks is None else blocks
    if not 0 <= depth <= config.depth:
        raise ValueError(f"blocks={blocks} is outside 0..{config.depth}")
    mlp_hidden = int(d * config.mlp_ratio)
    rows = n if per_token_time else 1          # conditioning vectors per image
    parts = {
        "patch_embed": 2 * n * p * p * config.in_channels * d,
        "time_embed": 2 * rows * (FREQUENCY_SIZE * d + d * d),
        "adaln": 2 * rows * d * 6 * d * depth,
        "attn_qkv": 2 * n * d * 3 * d * depth,
        "attn_scores": 2 * 2 * n * n * d * depth,      # Q K^T and A V
        "attn_proj": 2 * n * d * d * depth,
        "mlp": 2 * 2 * n * d * mlp_hidden * depth,
        "final": 0,
    }
    if final:
        parts["adaln"] += 2 * rows * d * 2 * d
        parts["final"] = 2 * n * d * p * p * config.out_channels
    return parts


def head_flops(config: BackboneConfig) -> int:
    """Forward FLOPs of SRA's projection head, Linear(D, 2D) -> SiLU -> Linear(2D, D), per image."""
    d = config.hidden_size
    return 2 * config.num_tokens * (d * 2 * d + 2 * d * d)


def training_step_flops(config: BackboneConfig, *, teacher_layer: int | None = None,
                        head: bool = True, teacher_fraction: float = 1.0) -> dict[str, float]:
    """Model FLOPs of one training step per image: student, teacher, head and their total.

    ``teacher_layer=None`` is a vanilla step. The teacher and head run on ``teacher_fraction`` of
    the batch (SRA's ``teacher_fraction`` option).
    """
    student = 3 * sum(forward_flops(config).values())
    teacher = head_cost = 0.0
    if teacher_layer is not None:
        teacher = teacher_fraction * sum(forward_flops(config, blocks=teacher_layer, final=False).values())
        head_cost = 3 * teacher_fraction * head_flops(config) if head else 0.0
    return {"student": float(student), "teacher": float(teacher), "head": float(head_cost),
            "total": float(student + teacher + head_cost)}


def sra_floor_ratio(config: BackboneConfig, teacher_layer: int) -> float:
    """The analytic floor of an SRA step over a vanilla step: ``1 + teacher forward / (3 forwards)``."""
    flops = training_step_flops(config, teacher_layer=teacher_layer, head=False)
    return (flops["student"] + flops["teacher"]) / flops["student"]
