"""Deterministic data order that a resumed run continues exactly.

The examples form one endless stream: epoch ``e`` is a permutation of ``range(N)`` drawn from
``(seed, e)`` alone, and epochs follow each other without gaps. Optimizer step ``s`` consumes
stream positions ``[s * B, (s + 1) * B)`` for the global batch ``B``; rank ``r`` of ``W`` takes
the ``r``-th contiguous ``B / W`` of them. The data position of a run is therefore just
``images_seen``, and a resume at any step reproduces the same batches without replaying an epoch.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import DataError
from .base import TrainingDataset

_MIX = 0x9E3779B97F4A7C15   # golden-ratio constant: spreads (seed, epoch) over the seed space


class DataOrder:
    """The stream of dataset indices for a dataset of ``size`` examples."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise DataError("the dataset is empty")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._cache: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:          # only the current and next epoch are ever needed
                self._cache.clear()
            if self.shuffle:
                gen = torch.Generator().manual_seed((self.seed * _MIX + epoch) % (2 ** 63))
                self._cache[epoch] = torch.randperm(self.size, generator=gen)
            else:
                self._cache[epoch] = torch.arange(self.size)
        return self._cache[epoch]

    def take(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices at stream positions ``[start, start + count)``."""
        parts, pos, end = [], start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.size)
            n = min(end - pos, self.size - offset)
            parts.append(self.permutation(epoch)[offset: offset + n])
            pos += n
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def rank_indices(self, step: int, global_batch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """The indices rank ``rank`` trains on at optimizer step ``step``."""
        per_rank = global_batch // world_size
        return self.take(step * global_batch + rank * per_rank, per_rank)


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields each step's index list for one rank, from ``start_step`` on, forever."""

    def __init__(self, order: DataOrder, global_batch: int, rank: int, world_size: int, start_step: int):
        self.order, self.global_batch = order, global_batch
        self.rank, self.world_size, self.start_step = rank, world_size, start_step

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.order.rank_indices(step, self.global_batch, self.rank, self.world_size).tolist()
            step += 1


def _batched(batch):
    """Datasets here return whole batches from ``__getitems__``; nothing left to collate."""
    return batch


def step_batches(dataset: TrainingDataset, order: DataOrder, global_batch: int, rank: int, world_size: int,
                 start_step: int, num_workers: int = 0, pin_memory: bool = False):
    """An endless iterator of ``(x, y)`` per-rank batches, step ``start_step`` first."""
    sampler = StepBatchSampler(order, global_batch, rank, world_size, start_step)
    if num_workers == 0:
        return (dataset.__getitems__(indices) for indices in sampler)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=_batched,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         persistent_workers=True, prefetch_factor=2)
    return _worker_errors_as_raised(iter(loader))


def _worker_errors_as_raised(batches):
    """A dataset error in a DataLoader worker arrives as "Caught ValueError in DataLoader worker
    process 0. Original Traceback ..."; re-raise it with the dataset's own one-line message (which
    names the file and index), as without workers."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:
            lines = str(err).strip().splitlines()
            if len(lines) < 2 or not (lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]):
                raise
            head, sep, message = lines[-1].partition(": ")
            if not (sep and head.rsplit(".", 1)[-1] == type(err).__name__):
                raise
            try:
                clean = type(err)(message)
            except Exception:
                raise err from None
            raise clean from None
        yield batch
