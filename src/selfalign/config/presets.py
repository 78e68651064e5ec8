"""Config files and presets, composed with ``base:``.

A config (a preset, a user's YAML file or a mapping) may name ``base:`` and state only what differs
from it. The base is either

* a preset name (``base: sit-xl2-256-sra``), or
* a file: a value with a ``/`` or a ``.yaml``/``.yml`` ending, read relative to the file that names
  it (a mapping given in Python: relative to the working directory).

A base may name its own base. The config's values are merged into its resolved base: mappings key
by key, anything else (numbers, strings, lists, null) replaced; so nothing a base sets can be
removed, only changed (a base holds no regularizer its presets might not want). The result has no
``base`` key, so a saved config is complete.

Presets are the ``*.yaml`` files of ``selfalign/configs``; the files they share live in its
``_base/`` folder and are not presets (on their own they are not a complete run).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .loader import load_yaml

PRESET_DIR = Path(__file__).parent.parent / "configs"
BASE_KEY = "base"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(source: str | Path) -> Path:
    """A YAML path as given, or a preset name (``sit-b2-256-sra``) from ``selfalign/configs``."""
    path = Path(source)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{source}.yaml"
    if "/" not in str(source) and preset.is_file():
        return preset
    if _names_a_file(str(source)):
        raise ConfigError(f"config file {str(source)!r} not found")
    raise ConfigError(f"{str(source)!r} is neither a config file nor a preset; presets: "
                      f"{', '.join(preset_names())}")


def read_config(source: str | Path | dict) -> dict:
    """The mapping of a config file, preset name or mapping, with its ``base:`` chain merged in."""
    if isinstance(source, dict):
        return _resolve(dict(source), None, ())
    path = resolve_config_path(source).resolve()
    return _resolve(load_yaml(path), path, (path,))


def merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied: mappings merged key by key, other values replaced."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve(data: dict, origin: Path | None, chain: tuple[Path, ...]) -> dict:
    if BASE_KEY not in data:
        return data
    changes = dict(data)
    name = changes.pop(BASE_KEY)
    where = _label(origin) if origin else "config"
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: base must be a preset name or a YAML file, got {name!r}")
    path = _base_path(name, origin, where)
    if path in chain:
        cycle = " -> ".join(_label(p) for p in (*chain, path))
        raise ConfigError(f"{where}: config bases form a cycle ({cycle}); remove one of the base: keys")
    return merge(_resolve(load_yaml(path), path, (*chain, path)), changes)


def _base_path(name: str, origin: Path | None, where: str) -> Path:
    if _names_a_file(name):
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = (origin.parent if origin else Path.cwd()) / path
        if not path.is_file():
            raise ConfigError(f"{where}: base file {name!r} not found (looked for {path})")
        return path.resolve()
    preset = PRESET_DIR / f"{name}.yaml"
    if not preset.is_file():
        raise ConfigError(f"{where}: base {name!r} is not a preset (a file base is a path ending in "
                          f".yaml); presets: {', '.join(preset_names())}")
    return preset.resolve()


def _names_a_file(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith((".yaml", ".yml"))


def _label(path: Path) -> str:
    """A preset's name, a shared base as ``_base/...``, any other file as its path."""
    try:
        relative = path.resolve().relative_to(PRESET_DIR.resolve())
    except ValueError:
        return str(path)
    return relative.with_suffix("").as_posix()
