"""Typed configuration: dataclasses loaded strictly from YAML/dicts, with ``key=value`` overrides.

Every unknown key and every value of the wrong type is rejected with one line naming the dotted
key (``train.lr: expected float, got 'abc'``). A closed choice is a ``Literal`` field: the loader
rejects anything else, and :func:`check_choices` does the same for a dataclass built in Python.
Two range rules hold for every key: an integer fits in 64 bits (so none overflows inside torch or
NumPy), and a float is finite (NaN and infinities are refused unless the field says
``metadata={ALLOW_NONFINITE: True}``). Dataclasses may define ``validate()`` for their own range
checks; it is called after loading.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..choices import check_choice
from ..errors import ConfigError

#: the largest integer a setting may hold (a signed 64-bit one: torch and NumPy take no larger)
MAX_INT64 = 2 ** 63 - 1

#: field metadata key: this float field may hold NaN or an infinity
ALLOW_NONFINITE = "allow_nonfinite"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-4`` and ``4e5`` are numbers (as in YAML 1.2), not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str, finite: bool = True):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, finite)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin is typing.Literal:
        check_choice(value, typing.get_args(tp), key)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):   # tuple[int, str]: fixed length, one type per place
                raise ConfigError(f"{key}: expected a list of {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]", finite) for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]", finite) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        value_type = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {str(k): _coerce(v, value_type, f"{key}.{k}", finite) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if abs(value) > MAX_INT64:
            raise ConfigError(f"{key}: {value} does not fit in 64 bits (|value| <= 2**63 - 1); "
                              f"give a smaller integer")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:       # an integer beyond any float
            number = math.inf
        if finite and not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def from_dict(cls, data: dict, prefix: str = "", *, validate: bool = True):
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise :class:`ConfigError`.

    ``validate=False`` leaves ``cls.validate`` to the caller, for checks that need more than the
    mapping (a regularizer's ``validate(depth)``)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of {_type_name(cls)} fields, "
                          f"got {data!r}")
    kwargs = {}
    for key, value in (data or {}).items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = (difflib.get_close_matches(str(key), fields, n=1)
                     or [name for name in fields if name.startswith(str(key)[:3])])
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint}; valid keys: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], dotted, not fields[key].metadata.get(ALLOW_NONFINITE))
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        dotted = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"{dotted}: required key missing")
    obj = cls(**kwargs)
    if validate and hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # Belt and braces: a number-looking string the YAML loader left alone is still a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict (before it is typed, so typing checks the result)."""
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:   # an absent section, or one left empty in YAML
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); "
                          f"give a YAML file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data
