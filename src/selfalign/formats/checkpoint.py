"""Checkpoints that survive kills and full disks, and load without running pickled code.

Layout (``docs/DEVELOPING.md``)::

    RUN_DIR/checkpoints/step-000012500/
        model.safetensors  ema.safetensors  regularizers.safetensors
        optimizer.pt       (optimizer + loss-scaler state: tensors and numbers only)
        state.json         (step, images, RNG states of every rank, data position, config, files)

A checkpoint is written under ``.tmp-step-...``; every file is fsync'ed, ``state.json`` (which
lists the other files and their sizes) is written last, the directory is renamed to its final
name and the parent directory fsync'ed. A directory that is not complete by that test is never
picked by ``--resume auto``. Tensors are checked for NaN/Inf before anything is written. A failed
write (full disk, I/O error) removes the temporary directory and is one line; an existing
directory of the same step is renamed aside (``step-...superseded``), never deleted.

Finding the newest checkpoint skips damaged ones (a missing or truncated file, an unreadable
safetensors header, an optimizer state that cannot be loaded safely) and says so; a checkpoint
of an unknown format is never skipped: it may be complete for another selfalign version.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, OutputError, UsageError
from . import faults
from .paths import write_advice

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
TENSOR_FILES = ("model", "ema", "regularizers")
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
SUPERSEDED = ".superseded"


class CheckpointWriteError(OutputError):
    """Writing a checkpoint failed (full disk, I/O error, non-finite tensors); the previous
    checkpoint is untouched."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint written in another format version (by a newer selfalign, or not by selfalign)."""


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
    """safetensors file, contiguous CPU copies, fsync'ed. A failed file write is an OSError."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    except SafetensorError as err:      # e.g. "I/O error: No space left on device (os error 28)"
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    fsync_path(path)


class _RecordingFile:
    """A file object that remembers the OSError of a failed write: ``torch.save`` replaces it
    with a RuntimeError that has no errno ("unexpected pos ...")."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        return self.file.flush()


def write_torch(obj, path: Path) -> None:
    """``torch.save`` into ``path``, fsync'ed. A failed file write is an OSError."""
    with open(path, "wb") as f:
        recording = _RecordingFile(f)
        try:
            torch.save(obj, recording)
        except RuntimeError:
            if recording.error is None:
                raise
            raise recording.error from None
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
                    optimizer_state: dict, state: dict, keep_last: int | None = None, report=None) -> Path:
    """Write one checkpoint atomically; on any failure the previous checkpoints stay valid.

    ``tensors`` maps each of :data:`TENSOR_FILES` to a state dict; ``optimizer_state`` is
    ``{"optimizer": ..., "scaler": ...}``; ``state`` is the JSON-able rest. An existing
    directory of the same step (a damaged one that a resume skipped, or one from before an
    earlier resume point) is renamed aside and ``report(message)`` says so.
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
        if final.exists():   # not written by this process: kept, under a name no lookup picks
            aside = set_aside(final)
            if report:
                report(f"note: the earlier {final.name} (not written by this run) is kept as {aside}")
        os.rename(tmp, final)
        fsync_path(root)
        faults.point("ckpt_done")
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)     # never a half-written directory left behind
        if not isinstance(err, OSError):
            raise
        previous = [p for p in list_checkpoints(run_dir) if verify(p) is None]
        kept = (f"the previous checkpoint {previous[-1].name} is intact" if previous
                else "no earlier checkpoint exists")
        advice = write_advice(err) or "check the disk and run again"
        raise CheckpointWriteError(f"could not write checkpoint {final.name} in {root}: {err}; {kept}; "
                                   f"{advice}") from None
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


def set_aside(ckpt: Path) -> Path:
    """Rename ``ckpt`` to ``<name>.superseded`` (``-2``, ``-3``, ... when taken); never deleted."""
    for n in range(1, 1000):
        aside = ckpt.with_name(ckpt.name + SUPERSEDED + (f"-{n}" if n > 1 else ""))
        if not os.path.lexists(aside):
            os.rename(ckpt, aside)
            return aside
    raise OSError(f"too many superseded copies of {ckpt.name} in {ckpt.parent}")


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
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{ckpt / STATE_FILE} is not a selfalign checkpoint state (it has no format)")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{ckpt} has checkpoint format {state['format']!r} but this selfalign reads format {FORMAT_VERSION} "
            f"(written by another selfalign version?): use that version, or move {ckpt.name} out of "
            f"{ckpt.parent} to use an older checkpoint")
    return state


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Name -> shape from a safetensors header (no tensor is read); CheckpointError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_slice(key).get_shape() for key in f.keys()}
    except Exception as err:     # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} cannot be read "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def verify(ckpt: Path) -> str | None:
    """None when ``ckpt`` is complete, else why not: ``state.json`` valid, every listed file at its
    size, every safetensors header readable, the optimizer state loadable without running code
    (memory-mapped: the tensors themselves are not read)."""
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
    try:
        shapes = {name: _tensor_shapes(ckpt / f"{name}.safetensors") for name in TENSOR_FILES}
    except CheckpointError as err:
        return str(err)
    if shapes["model"] != shapes["ema"]:     # the EMA mirrors the model: a damaged name or shape differs
        return f"{ckpt}: model.safetensors and ema.safetensors hold different tensors (a damaged header?)"
    if not zipfile.is_zipfile(ckpt / OPTIMIZER_FILE):
        return f"{ckpt / OPTIMIZER_FILE} is not a PyTorch zip archive (damaged, or not written by selfalign)"
    try:
        load_optimizer_state(ckpt, mmap=True)
    except CheckpointError as err:
        return str(err)
    return None


def _format_error(ckpt: Path) -> CheckpointFormatError | None:
    try:
        read_state(ckpt)
    except CheckpointFormatError as err:
        return err
    except CheckpointError:
        pass
    return None


def newest_complete(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(newest complete checkpoint or None, [(newer damaged checkpoint, why), ...])``.

    A checkpoint of another format version stops the search (:class:`CheckpointFormatError`):
    it may be complete for the version that wrote it, so nothing older is picked over it."""
    damaged = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt, damaged
        other = _format_error(ckpt)
        if other is not None:
            raise other
        damaged.append((ckpt, problem))
    return None, damaged


def fallback_message(used: Path, damaged: list[tuple[Path, str]]) -> str:
    """One line: which checkpoints are damaged, why the newest is, and which one is used instead."""
    names = ", ".join(ckpt.name for ckpt, _ in damaged)
    return (f"warning: skipping damaged checkpoint{'s' if len(damaged) > 1 else ''} {names} ({damaged[0][1]}); "
            f"using the older {used.name}")


def warn(message: str) -> None:
    """The default ``report``: a fallback to an older checkpoint is always said, on stderr."""
    print(message, file=sys.stderr, flush=True)


def latest_checkpoint(run_dir: str | os.PathLike, report=None) -> Path | None:
    """The newest complete checkpoint of a run; damaged newer ones are skipped, and ``report``
    (when given) gets one line naming them and the one used."""
    used, damaged = newest_complete(run_dir)
    if used is not None and damaged and report:
        report(fallback_message(used, damaged))
    return used


def _newest_or_refuse(run_dir: str | os.PathLike, report, advice: str = "") -> Path | None:
    """The newest complete checkpoint (a fallback reported), None where there is none; refused
    where every checkpoint is damaged."""
    used, damaged = newest_complete(run_dir)
    if used is None and damaged:
        raise CheckpointError(f"every checkpoint in {checkpoints_dir(run_dir)} is damaged (the newest: "
                              f"{damaged[0][1]}){advice}")
    if damaged:
        report(fallback_message(used, damaged))
    return used


def resolve_checkpoint(path: str | os.PathLike, report=warn) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint; a fallback past
    damaged ones is reported)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give a run directory or one of its "
                              f"{CHECKPOINT_DIR}/{PREFIX}* directories")
    if (path / STATE_FILE).exists() or path.name.startswith(PREFIX):
        problem = verify(path)
        if problem:
            raise _format_error(path) or CheckpointError(problem)
        return path
    used = _newest_or_refuse(path, report)
    if used is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (expected {CHECKPOINT_DIR}/{PREFIX}*/ "
                              f"or a checkpoint directory)")
    return used


def resume_point(run_dir: str | os.PathLike, resume: str | None, report=warn) -> Path | None:
    """The checkpoint a training run continues from, or None to start at step 0.

    ``resume``: None (a new run; refused where the run directory has checkpoints, complete or
    not), ``"auto"`` (the newest complete checkpoint, or step 0 where there is none) or a run or
    checkpoint directory. Where every checkpoint is damaged, ``"auto"`` refuses: starting at
    step 0 would replace them and the metrics history with a new run's."""
    existing = list_checkpoints(run_dir)
    if resume is None:
        if existing:
            raise UsageError(f"run directory {run_dir} already has checkpoints ({existing[-1].name}); "
                             f"pass --resume auto to continue it or choose another --run-dir")
        return None
    if resume != "auto":
        return resolve_checkpoint(resume, report)
    return _newest_or_refuse(run_dir, report, "; nothing was changed: restore them from a copy, or start "
                                              "over in a new --run-dir")


# -- loading ---------------------------------------------------------------------------------
def load_tensors(ckpt: Path, name: str, device="cpu") -> dict[str, torch.Tensor]:
    path = ckpt / f"{name}.safetensors"
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:     # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} cannot be read ({err})") from None


def load_optimizer_state(ckpt: Path, mmap: bool = False) -> dict:
    """``optimizer.pt`` with ``weights_only=True``: a file holding anything but tensors and plain
    data (e.g. a crafted pickle that would run code) is refused. ``mmap``: map the tensors
    instead of reading them (a cheap check that the file loads)."""
    path = ckpt / OPTIMIZER_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, KeyError,
            ValueError, IndexError) as err:
        raise CheckpointError(f"{path} was refused: it is not a plain tensor file ({_refusal_reason(err)}); "
                              f"it is damaged or was not written by selfalign") from None


def _refusal_reason(err: Exception) -> str:
    """What ``torch.load(weights_only=True, mmap=mmap)`` objected to, in its first sentence: never PyTorch's
    advice to load the file with ``weights_only=False`` or to allow-list its globals, which would
    run whatever code a crafted file holds."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = re.split(r"\.\s", lines[0])[0].rstrip(".") if lines else ""
    if not first or "weights_only" in first or "safe_globals" in first:
        return type(err).__name__
    if isinstance(err, (pickle.UnpicklingError, RuntimeError)):
        return first
    return f"{type(err).__name__}: {first}"


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
