"""Gaussian draws for the stochastic samplers."""
from __future__ import annotations

from collections.abc import Sequence

import torch


# one generator for the batch, one per sample (row), or None (torch's global generator)
Generators = torch.Generator | Sequence[torch.Generator] | None


def standard_normal(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """``N(0, I)`` shaped like ``like``, drawn on the generator's device and moved to ``like``'s.

    A CPU generator therefore drives a CUDA run, and gives the same samples on every device.
    A sequence of generators, one per row of ``like``, draws row ``k`` from ``generator[k]``: a
    sample's noise then depends on its own generator alone, not on the batch it was drawn in.
    """
    if isinstance(generator, Sequence):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
        rows = [torch.randn(like.shape[1:], dtype=like.dtype, device=g.device, generator=g) for g in generator]
        return torch.stack(rows).to(like.device)
    device = generator.device if generator is not None else like.device
    draw = torch.randn(like.shape, dtype=like.dtype, device=device, generator=generator)
    return draw.to(like.device)
