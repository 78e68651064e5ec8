"""One diffusion transformer for DiT and SiT.

The architecture of DiT (Peebles & Xie, 2023), which SiT reuses unchanged: patch embedding,
fixed 2-D sin-cos position embedding, ``depth`` blocks with adaLN-Zero conditioning on
(timestep embedding + class embedding), a final adaLN layer and unpatchify. Parameter and
buffer names follow the original ``models.py`` so released checkpoints map one to one.

Two general capabilities serve every regularizer without a second copy of the forward loop:

* **feature taps** -- ``forward(..., taps=[3, 8])`` also returns the token outputs of blocks 3
  and 8 (1-based); ``features_only=True`` stops after the deepest tapped block (the SRA teacher
  needs only blocks ``1..n``);
* **per-token conditioning and attention groups** -- ``t`` may be ``(B,)`` or ``(B, N)`` (one
  noise level per token), and ``attn_groups`` ``(B, N)`` restricts attention to tokens of the
  same group (dual-timestep scheduling with attention separation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError


@dataclass
class BackboneConfig:
    """Shape of the transformer; presets live in :mod:`selfalign.models.presets`."""

    input_size: int = 32          # spatial size of the model input (latent or pixel grid)
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = False     # DiT: True (output channels doubled for the variance)
    qk_norm: bool = False
    grad_checkpointing: bool = False

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise ConfigError(f"model.input_size={self.input_size} is not divisible by "
                              f"model.patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_heads={self.num_heads}")
        if self.hidden_size % 4:   # the 2-D sin-cos embedding gives each axis dim/2 (sin, cos)
            raise ConfigError(f"model.hidden_size={self.hidden_size} must be divisible by 4 "
                              "(2-D sin-cos position embedding)")
        for key in ("input_size", "in_channels", "patch_size", "hidden_size", "depth",
                    "num_heads", "num_classes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # shift/scale are (B, 1, D) for one timestep per image, (B, N, D) per token.
    return x * (1 + scale) + shift


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, ``(grid*grid, dim)``, as in MAE and DiT."""
    coords = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # DiT's meshgrid order puts w first; the embedding is [emb(h-index grid), emb(w-index grid)].
    return np.concatenate([one_axis(coords[0]), one_axis(coords[1])], axis=1).astype(np.float32)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of the (model-space) time, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) *
                          torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[..., None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.frequencies(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row for the null class (id ``num_classes``).

    Label dropout is *not* done here: the trainer drops labels once per example
    (:func:`drop_labels`) so every forward pass of a step sees the same labels.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


def drop_labels(y: torch.Tensor, prob: float, num_classes: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null id ``num_classes`` with probability ``prob``."""
    if prob <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < prob
    return torch.where(drop, torch.full_like(y, num_classes), y)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        head_dim = dim // num_heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, attn_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiffusionTransformer(nn.Module):
    """The DiT/SiT backbone. What the output means is the objective's business."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        config.validate()
        self.config = config
        c, p, d = config.in_channels, config.patch_size, config.hidden_size
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(c, d, kernel_size=p, stride=p, bias=True)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d)
        grid = config.input_size // p
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(d, grid))[None])
        self.blocks = nn.ModuleList(DiTBlock(d, config.num_heads, config.mlp_ratio, config.qk_norm)
                                    for _ in range(config.depth))
        self.final_layer = FinalLayer(d, p, config.out_channels)
        self.initialize_weights()

    @property
    def depth(self) -> int:
        return self.config.depth

    def initialize_weights(self) -> None:
        def xavier(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(xavier)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:   # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- shape helpers ---------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), the layout of the final layer's output."""
        p, (b, c, h, w) = self.config.patch_size, x.shape
        x = x.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, c = self.config.patch_size, self.config.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                taps: Sequence[int] | None = None, features_only: bool = False,
                attn_groups: torch.Tensor | None = None):
        """Denoise ``x`` at model time ``t`` for (already dropped) labels ``y``.

        Returns the output tensor ``(B, out_channels, H, W)`` when ``taps`` is None, else
        ``(output, {block: tokens (B, N, D)})``; with ``features_only`` the loop stops after the
        deepest tapped block and ``output`` is None.
        """
        wanted = sorted(set(taps or ()))
        if wanted and not 1 <= wanted[0] <= wanted[-1] <= self.depth:
            raise ValueError(f"feature taps {wanted} outside blocks 1..{self.depth}")
        if features_only and not wanted:
            raise ValueError("features_only=True needs at least one tap")
        last = wanted[-1] if features_only else self.depth

        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        cond = self.t_embedder(t) + (self.y_embedder(y)[:, None] if t.dim() == 2 else self.y_embedder(y))
        if cond.dim() == 2:
            cond = cond[:, None]     # (B, 1, D): broadcast over tokens
        mask = None
        if attn_groups is not None:  # tokens attend only within their own group
            mask = (attn_groups[:, :, None] == attn_groups[:, None, :])[:, None]

        features: dict[int, torch.Tensor] = {}
        for index in range(last):
            block = self.blocks[index]
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, cond, mask, use_reentrant=False)
            else:
                tokens = block(tokens, cond, mask)
            if index + 1 in wanted:
                features[index + 1] = tokens
        if features_only:
            return None, features
        out = self.unpatchify(self.final_layer(tokens, cond))
        return out if taps is None else (out, features)
