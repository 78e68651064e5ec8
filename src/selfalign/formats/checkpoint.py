"""Checkpoints that survive kills and full disks, and load without running pickled code.

Layout (``docs/DEVELOPING.md``)::

    RUN_DIR/checkpoints/step-000012500/
        model.safetensors  ema.safetensors  regularizers.safetensors
        optimizer.pt       (optimizer + loss-scaler state: tensors and numbers only)
        state.json         (step, images, RNG states of every rank, data position, config, files)

A checkpoint is written under ``.tmp-step-...``; every file is fsync'ed, ``state.json`` (which
lists the other files and their sizes) is written last, the directory is renamed to its final
name and the parent directory fsync'ed. A directory that is not complete by that test is never
picked by ``--resume auto``. Tensors are checked for NaN/Inf before anything is written.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from . import faults

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
TENSOR_FILES = ("model", "ema", "regularizers")
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the previous checkpoint is untouched."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


# -- writing ---------------------------------------------------------------------------------
def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: where the platform allows it)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():
            return          # e.g. Windows: directories cannot be opened
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file, contiguous CPU copies, fsync'ed."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    fsync_path(path)


def write_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_text(text: str, path: Path) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def first_nonfinite(named: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """``"model: blocks.0.attn.qkv.weight"`` for the first tensor holding NaN/Inf, else None."""
    for group, tensors in named.items():
        for key, value in tensors.items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                return f"{group}: {key}"
    return None


def _optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for pid, slots in state.get("optimizer", {}).get("state", {}).items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                out[f"{pid}.{name}"] = value
    return out


def save_checkpoint(run_dir: str | os.PathLike, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    optimizer_state: dict, state: dict, keep_last: int | None = None) -> Path:
    """Write one checkpoint atomically; on any failure the previous checkpoints stay valid.

    ``tensors`` maps each of :data:`TENSOR_FILES` to a state dict; ``optimizer_state`` is
    ``{"optimizer": ..., "scaler": ...}``; ``state`` is the JSON-able rest.
    """
    root = checkpoints_dir(run_dir)
    final = root / checkpoint_name(step)
    bad = first_nonfinite({**tensors, "optimizer": _optimizer_tensors(optimizer_state)})
    if bad:
        raise CheckpointWriteError(f"refusing to write checkpoint {final.name}: {bad} holds NaN/Inf; "
                                   f"the previous checkpoint is kept")
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {}
        for name in TENSOR_FILES:
            write_tensors(tensors.get(name, {}), tmp / f"{name}.safetensors")
            files[f"{name}.safetensors"] = (tmp / f"{name}.safetensors").stat().st_size
            faults.point("ckpt_file")
        write_torch(optimizer_state, tmp / OPTIMIZER_FILE)
        files[OPTIMIZER_FILE] = (tmp / OPTIMIZER_FILE).stat().st_size
        faults.point("ckpt_file")
        write_text(json.dumps({**state, "format": FORMAT_VERSION, "step": step, "files": files},
                              indent=1), tmp / STATE_FILE)
        fsync_path(tmp)
        faults.point("ckpt_rename")
        if final.exists():   # a stale or broken directory of the same step (never a valid newer one)
            remove_checkpoint(final)
        os.rename(tmp, final)
        fsync_path(root)
        faults.point("ckpt_done")
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {final.name} in {root}: {err}; {kept}") from None
    if keep_last:
        prune(run_dir, keep_last)
    return final


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and leftover temp dirs."""
    root = checkpoints_dir(run_dir)
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        if leftover.name.startswith(f"{TMP_PREFIX}del-") or not leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)
    valid = [p for p in list_checkpoints(run_dir) if verify(p) is None]
    for old in valid[:-keep_last]:
        remove_checkpoint(old)


def remove_checkpoint(ckpt: Path) -> None:
    """Rename to a temporary name first, then delete: a kill midway never leaves a half-deleted
    directory under a checkpoint name (the next prune removes the leftover)."""
    trash = ckpt.with_name(f"{TMP_PREFIX}del-{ckpt.name}-{os.getpid()}")
    try:
        os.rename(ckpt, trash)
    except OSError:
        return      # kept as it is; a caller that needs the name gone fails on it with a clear error
    faults.point("ckpt_prune")
    shutil.rmtree(trash, ignore_errors=True)


# -- finding and verifying --------------------------------------------------------------------
def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Final-named checkpoint directories, oldest first (complete or not)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        suffix = p.name[len(PREFIX):]
        if p.is_dir() and p.name.startswith(PREFIX) and suffix.isdigit():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def read_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} is not a complete checkpoint: {STATE_FILE} is missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{ckpt / STATE_FILE} is unreadable ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt / STATE_FILE} is not a selfalign checkpoint of format {FORMAT_VERSION}")
    return state


def verify(ckpt: Path) -> str | None:
    """None when ``ckpt`` is complete (state.json valid, every listed file at its size), else why not."""
    try:
        state = read_state(ckpt)
    except CheckpointError as err:
        return str(err)
    files = state.get("files") or {}
    for name in (*(f"{n}.safetensors" for n in TENSOR_FILES), OPTIMIZER_FILE):
        if name not in files:
            return f"{ckpt}: {STATE_FILE} does not list {name}"
    for name, size in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{ckpt}: {name} is missing"
        if path.stat().st_size != size:
            return f"{ckpt}: {name} has {path.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def latest_checkpoint(run_dir: str | os.PathLike, report=None) -> Path | None:
    """The newest complete checkpoint of a run; broken ones are skipped (and reported)."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        if report:
            report(f"skipping incomplete checkpoint: {problem}")
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if (path / STATE_FILE).exists() or path.name.startswith(PREFIX):
        problem = verify(path)
        if problem:
            raise CheckpointError(problem)
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (expected {CHECKPOINT_DIR}/{PREFIX}*/ "
                              f"or a checkpoint directory)")
    return ckpt


# -- loading ---------------------------------------------------------------------------------
def load_tensors(ckpt: Path, name: str, device="cpu") -> dict[str, torch.Tensor]:
    path = ckpt / f"{name}.safetensors"
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:     # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} cannot be read ({err})") from None


def load_optimizer_state(ckpt: Path) -> dict:
    """``optimizer.pt`` with ``weights_only=True``: a file holding anything but tensors and plain
    data (e.g. a crafted pickle that would run code) is refused."""
    path = ckpt / OPTIMIZER_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} was refused: it is not a plain tensor file ({first})") from None


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, source: Path,
                hint: str = "") -> None:
    """Load strictly; a missing, extra or differently shaped tensor is one line naming it."""
    own = module.state_dict()
    for key, value in own.items():
        if key not in tensors:
            raise CheckpointError(f"{source}: {what} lacks {key!r}{hint}")
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source}: {what} {key!r} has shape {tuple(tensors[key].shape)} in "
                                  f"the checkpoint but {tuple(value.shape)} here{hint}")
    extra = sorted(set(tensors) - set(own))
    if extra:
        raise CheckpointError(f"{source}: {what} has an unexpected tensor {extra[0]!r}{hint}")
    module.load_state_dict(tensors, strict=True)
