"""Which device a process computes on: one rule for training, sampling, evaluation, prepare and the benchmarks.

``auto`` is this process's GPU when CUDA is available, else the CPU; ``cuda`` is this process's
GPU (``LOCAL_RANK`` modulo the GPUs visible, so a node runs one process per GPU); ``cuda:N`` is
that GPU; ``cpu`` is the CPU.
"""
from __future__ import annotations

import torch

from .errors import ConfigError, UsageError

CHOICES = "auto, cpu, cuda or cuda:N"


def pick_device(requested: str = "auto", local_rank: int = 0, *, setting: str = "--device") -> torch.device:
    """The device ``requested`` names for the process of ``local_rank``.

    ``setting`` is what the user wrote it as (a flag such as ``--device`` or a config key such as
    ``train.device``); an impossible request names it and raises :class:`UsageError` for a flag,
    :class:`ConfigError` for a config key.
    """
    flag = setting.startswith("-")
    error, given = (UsageError, f"{setting} {requested}") if flag else (ConfigError, f"{setting}={requested}")
    prefix, _, index = requested.partition(":")
    if requested not in ("auto", "cpu", "cuda") and not (prefix == "cuda" and index.isdigit()):
        raise error(f"{given} is not a device: use {CHOICES}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise error(f"{given} asks for a GPU but torch sees no CUDA device; use {setting}{' ' if flag else '='}cpu")
    return torch.device("cuda", int(index) if index else local_rank % torch.cuda.device_count())
