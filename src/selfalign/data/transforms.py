"""Image preprocessing shared by every part of selfalign (training data, latent caching, evaluation).

``center_crop_arr`` is the ADM center crop (Dhariwal & Nichol, ``guided_diffusion/image_datasets.py``),
which DiT, SiT, REPA and SRA all use: halve with a box filter while the short side is at least twice
the target, resize with bicubic so the short side equals the target, then crop the center. This is
the ONE implementation; do not copy it.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop of ``pil_image`` to ``image_size x image_size`` (returns a PIL image)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def uint8_to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` in [0, 255] -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def model_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in [0, 255] (clamped, rounded)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
