"""What a training dataset is to the trainer: declared once, implemented by every dataset.

A dataset hands out whole batches by index (``__getitems__``, the form :func:`.order.step_batches`
and a ``DataLoader`` with a batch sampler ask for) as ``(x, y)``, or ``(x, y, images)`` when it
serves raw pixels next to latents. ``x`` is the batch *as stored*; :meth:`TrainingDataset.to_model`
turns it into the model input on the training device (pixels are the model input already; cached
latents draw a sample from their stored distribution), and :meth:`TrainingDataset.decode` turns
model inputs back into images in [-1, 1] for sample grids.
"""
from __future__ import annotations

import abc
from collections.abc import Sequence

import torch


class TrainingDataset(torch.utils.data.Dataset, abc.ABC):
    """Base of every dataset the trainer reads.

    Subclasses set ``num_classes`` (labels ``0 .. num_classes - 1``) and ``channels`` (of the model
    input), implement ``__len__`` and ``__getitems__``, and override the rest where pixels are not
    the model input.
    """

    num_classes: int
    channels: int
    #: Mirroring the model input gives the mirrored image's model input (pixels). Latents are not
    #: mirror-symmetric: their datasets serve the stored latents of mirrored images instead.
    flippable: bool = True

    @abc.abstractmethod
    def __len__(self) -> int:
        ...

    @abc.abstractmethod
    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """The batch of ``indices``: ``(x, y)``, or ``(x, y, images)``; ``y`` int64 labels."""

    def to_model(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The model input of a stored batch ``x`` (any randomness from ``generator``, on ``x``'s device)."""
        return x

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model inputs back to images, float in [-1, 1]."""
        return x0
