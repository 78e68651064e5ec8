"""Argument types shared by every subcommand, and a parser whose errors are one line.

Each type turns a flag's text into a value in range or raises ``argparse.ArgumentTypeError``
saying what is allowed; argparse then prints ``selfalign CMD: error: argument --flag: ...`` and
exits with status 2, before any file is opened or any memory allocated. The bounds are the
size limits of :mod:`selfalign.conventions`, the same ones the config keys are checked against.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from ..conventions import MAX_BATCH, MAX_SEED


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line that says where the usage is, instead of
    the usage block followed by the error. Subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _named(parse, name: str):
    parse.__name__ = name      # argparse names the type in a few of its own messages
    return parse


def int_range(low: int, high: int | None = None, why: str = ""):
    """A whole number in ``[low, high]`` (no upper bound: ``high=None``); ``why`` is added to the
    error (what the bound is for)."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be a whole number {bound}{why}, got {text}")
        return value
    return _named(parse, "integer")


def float_range(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False, why: str = ""):
    """A finite number in ``[low, high]`` (``(low, high]`` with ``open_low``); NaN and infinities
    are refused everywhere."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (open_low and value == low) or value > high:
            if math.isinf(high):
                bound = f"{'>' if open_low else '>='} {low:g}"
            else:
                bound = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be {bound}{why}, got {text}")
        return value
    return _named(parse, "number")


positive_int = int_range(1)
non_negative_int = int_range(0)
seed = int_range(0, MAX_SEED)
batch_size = int_range(1, MAX_BATCH)
finite_float = float_range()
non_negative_float = float_range(0.0)
positive_float = float_range(0.0, open_low=True)
noise_level = float_range(0.0, 1.0, why=" (a noise level: 0 = data, 1 = noise)")


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        what = "is a directory, not a file" if Path(text).is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text} {what}")
    return text


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


_CUDA = re.compile(r"cuda(?::(\d+))?")


def device_name(text: str) -> str:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``, refused at once when this
    machine has no such device."""
    if text in ("auto", "cpu"):
        return text
    match = _CUDA.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device; use cpu "
                                         f"(or auto, which takes CUDA when there is one)")
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), "
                                         f"cuda:0..cuda:{count - 1}")
    return text
