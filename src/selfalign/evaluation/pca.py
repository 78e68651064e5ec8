"""PCA maps of block features: the first three principal components of the tokens as RGB.

For each (block, noise level) the PCA is fitted jointly on the tokens of all shown images, so
colours are comparable across images; each component is scaled to [0, 1] between its 1st and 99th
percentiles. The grid has one row per (noise level, image): the noisy input, then one map per block.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .figures import pyplot, save_figure


def pca_rgb(tokens: torch.Tensor) -> torch.Tensor:
    """``(N, T, D)`` tokens on a square grid -> ``(N, h, w, 3)`` colours in [0, 1]."""
    n, t, d = tokens.shape
    side = int(round(t ** 0.5))
    if side * side != t:
        raise ValueError(f"PCA maps need a square token grid, got {t} tokens")
    flat = tokens.reshape(n * t, d).double()
    flat = flat - flat.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    proj = flat @ vh[:3].T                                  # (n*t, <=3)
    if proj.shape[1] < 3:                                   # D < 3: pad with zeros
        proj = torch.cat([proj, proj.new_zeros(len(proj), 3 - proj.shape[1])], 1)
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    return rgb.reshape(n, side, side, 3).float()


def to_display(x: torch.Tensor) -> np.ndarray:
    """Model-space pixels ``(N, C, H, W)`` in about [-1, 1] -> ``(N, H, W, 3)`` floats in [0, 1]."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    if x.shape[-1] == 1:
        x = x.repeat(1, 1, 1, 3)
    elif x.shape[-1] != 3:                # latents: show the first three channels
        x = x[..., :3]
    return x.numpy()


def save_pca_grid(path: str | Path, inputs: dict[float, torch.Tensor], maps: dict[tuple[float, int], torch.Tensor],
                  layers: list[int], title: str = "") -> Path:
    """``inputs[t]`` noisy inputs ``(N, C, H, W)``; ``maps[(t, layer)]`` ``(N, h, w, 3)``; one PNG."""
    plt = pyplot()
    times = sorted(inputs)
    n = len(next(iter(inputs.values())))
    rows, cols = len(times) * n, 1 + len(layers)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows), squeeze=False)
    for ti, t in enumerate(times):
        shown = to_display(inputs[t])
        for i in range(n):
            r = ti * n + i
            axes[r, 0].imshow(shown[i], interpolation="nearest")
            axes[r, 0].set_ylabel(f"t={t:g}", fontsize=7)
            for c, layer in enumerate(layers, start=1):
                axes[r, c].imshow(maps[(t, layer)][i].numpy(), interpolation="nearest")
                if r == 0:
                    axes[r, c].set_title(f"block {layer}", fontsize=7)
    axes[0, 0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    return save_figure(fig, path, dpi=100)
