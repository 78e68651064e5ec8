"""Gaussian draws for the stochastic samplers."""
from __future__ import annotations

import torch


def standard_normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``N(0, I)`` shaped like ``like``, drawn on the generator's device and moved to ``like``'s.

    A CPU generator therefore drives a CUDA run, and gives the same samples on every device.
    """
    device = generator.device if generator is not None else like.device
    draw = torch.randn(like.shape, dtype=like.dtype, device=device, generator=generator)
    return draw.to(like.device)
