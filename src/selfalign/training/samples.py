"""Fixed-noise sample grids of the EMA model, written as PNG during training and by the demo."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.transforms import model_to_uint8
from ..sampling import sample

GRID_STREAM = 0x5A3D   # separates the grid's noise from the training generators


def grid_inputs(count: int, channels: int, size: int, num_classes: int, seed: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same noise and labels every time: label ``i % num_classes`` (rows of classes)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + GRID_STREAM)
    noise = torch.randn(count, channels, size, size, generator=gen)
    if num_classes <= 16:
        labels = torch.arange(count) % num_classes
    else:
        labels = torch.randint(0, num_classes, (count,), generator=gen)
    return noise.to(device), labels.to(device)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, pad: int = 2) -> Path:
    """uint8 ``(B, C, H, W)`` (C = 1 or 3) -> one PNG with ``nrow`` images per row."""
    b, c, h, w = images.shape
    rows = math.ceil(b / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y: y + h, x: x + w] = array[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)
    return path


@torch.no_grad()
def sample_grid(model, objective, config, path: str | Path, *, count: int | None = None,
                device: torch.device = torch.device("cpu"), decode=None) -> Path:
    """Sample ``count`` images from ``model`` (the EMA) with the config's grid sampler and fixed
    noise, decode latents when ``decode`` is given, and save the grid."""
    b = model.config
    count = count or config.train.sample_count
    noise, labels = grid_inputs(count, b.in_channels, b.input_size, b.num_classes,
                                config.train.seed, device)
    gen = torch.Generator(device=device).manual_seed(config.train.seed + GRID_STREAM)
    was_training = model.training
    model.eval()
    x0 = sample(model, objective, noise, labels, config.grid_sampler(), generator=gen)
    model.train(was_training)
    images = decode(x0) if decode is not None else x0
    nrow = b.num_classes if b.num_classes <= 16 else int(math.ceil(math.sqrt(count)))
    return save_grid(model_to_uint8(images.float()), path, nrow=nrow)
