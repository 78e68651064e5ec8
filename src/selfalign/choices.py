"""Closed choices of a config: dataclass fields typed ``Literal[...]``, checked with one-line errors.

A leaf beside the errors, so the config dataclasses of every layer (objectives, samplers,
regularizers) and the config loader check their choices the same way.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .errors import ConfigError


def check_choice(value: Any, choices: tuple, key: str) -> None:
    if not any(type(value) is type(c) and value == c for c in choices):   # True is not 1
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def literal_choices(tp) -> tuple[tuple, bool] | None:
    """``(choices, None allowed)`` of ``Literal[...]`` or ``Literal[...] | None``; None for other types."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp), False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
            return typing.get_args(args[0]), True
    return None


def check_choices(obj, prefix: str) -> None:
    """Every ``Literal`` field of dataclass ``obj`` holds one of its choices (as the config loader checks
    a file); for configs built in Python."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        literal = literal_choices(hints[f.name])
        value = getattr(obj, f.name)
        if literal is not None and not (value is None and literal[1]):
            check_choice(value, literal[0], f"{prefix}.{f.name}")
