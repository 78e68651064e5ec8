"""Output paths, checked before a command does any work, and written without tracebacks.

Every command that writes (a run directory, samples, a JSON report, a reference batch, a plot,
latent shards) checks its output path first, so a read-only file system, a file where a
directory is needed (or the reverse), a name longer than the file system allows or a missing
permission ends in one line naming the flag and the path, before hours of work and before
anything is created. A write that fails later anyway (a full disk) is one line too
(:func:`writing`).
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError, OutputError

DEFAULT_NAME_MAX = 255          # bytes per path component on every common file system
DEFAULT_PATH_MAX = 4096

_ADVICE = {
    errno.ENOSPC: "free some space (or choose another location) and run again",
    errno.EDQUOT: "free some space (or choose another location) and run again",
    errno.EROFS: "choose a writable location",
    errno.EACCES: "choose a location you may write to",
    errno.EPERM: "choose a location you may write to",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.ENOTDIR: "a file stands where a directory is needed; move it or choose another location",
    errno.EISDIR: "a directory stands where a file is needed; choose a file name",
    errno.EEXIST: "a file stands where a directory is needed; move it or choose another location",
    errno.EIO: "check the disk (an input/output error) and run again",
    errno.EFBIG: "the file system cannot hold a file this large; choose another location",
}


def _limit(existing: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(existing, name)
    except (AttributeError, ValueError, OSError):     # no pathconf (Windows) or no such limit
        return default


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _not_writable(target: Path) -> str | None:
    """Why nothing can be created in (or written to) ``target``, or None."""
    wanted = os.W_OK | (os.X_OK if target.is_dir() else 0)
    if os.access(target, wanted):       # access() honours read-only mounts, also for root
        return None
    try:
        read_only = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):
        read_only = False
    return "is on a read-only file system" if read_only else "is not writable (permission denied)"


def check_output(path: str | os.PathLike, flag: str, *, directory: bool) -> Path:
    """``path`` as a :class:`Path` when a directory (``directory=True``) or a file can be
    written there; else :class:`OutputError` naming ``flag``. Nothing is created."""
    path = Path(path)
    anchor = _nearest_existing(path.absolute())
    name_max = _limit(anchor, "PC_NAME_MAX", DEFAULT_NAME_MAX)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            raise OutputError(f"{flag}: the name {shown!r} is {len(os.fsencode(part))} bytes long, more than the "
                              f"{name_max} this file system allows; use a shorter name")
    path_max = _limit(anchor, "PC_PATH_MAX", DEFAULT_PATH_MAX)
    if len(os.fsencode(str(path.absolute()))) >= path_max:
        raise OutputError(f"{flag}: the path is longer than the {path_max} bytes this file system allows; "
                          f"use a shorter one")
    if anchor == path.absolute():
        if directory and not path.is_dir():
            raise OutputError(f"{flag} {path} is a file; give a directory (a new one, or one this command wrote)")
        if not directory and path.is_dir():
            raise OutputError(f"{flag} {path} is a directory; give a file name")
        target = anchor if directory else anchor.parent     # a file is replaced through its directory
    elif not anchor.is_dir():
        raise OutputError(f"{flag} {path}: {anchor} is a file, so nothing can be created under it; "
                          f"move it or choose another location")
    else:
        target = anchor
    problem = _not_writable(target)
    if problem:
        raise OutputError(f"{flag} {path}: {target} {problem}; choose a writable location")
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    return check_output(path, flag, directory=True)


def check_output_file(path: str | os.PathLike, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Also refuses a file name without one of ``suffixes`` (e.g. ``(".json",)``), when given."""
    path = check_output(path, flag, directory=False)
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputError(f"{flag} {path}: give a file name ending in {' or '.join(suffixes)}")
    return path


def write_advice(err: OSError) -> str:
    """What to do about a failed write, or ``""`` where it is no write failure."""
    return _ADVICE.get(err.errno, "")


@contextmanager
def writing(path: str | os.PathLike, flag: str):
    """An :class:`OSError` while writing under ``path`` (full disk, I/O error, a path that became
    read-only) becomes one line naming the flag, the file and what to do."""
    try:
        yield
    except OSError as err:
        advice = write_advice(err)
        if not advice:
            raise       # e.g. a missing input file: not a failed write
        where = err.filename or path
        raise OutputError(f"{flag} {path}: could not write {where}: {err.strerror or err}; {advice}") from None


def write_text(path: str | os.PathLike, text: str, flag: str) -> Path:
    """Write a small text file under a temporary name, then rename it: a failed write never
    leaves half a file under the real name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, flag):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def check_run_name(name: str, key: str = "name") -> str:
    """A run name becomes a directory (``runs/<name>``): no separators, no ``..``, no control
    characters, and short enough for any file system."""
    if not name:
        return name
    if "/" in name or "\\" in name or name in (".", "..") or any(ord(c) < 32 for c in name):
        raise ConfigError(f"{key}={name!r} is used as a directory name (runs/<{key}>): give a plain name "
                          f"without '/', '\\', control characters or '..', or choose the directory with --run-dir")
    if len(os.fsencode(name)) > DEFAULT_NAME_MAX:
        raise ConfigError(f"{key} is {len(os.fsencode(name))} bytes long; a run name is a directory name and "
                          f"may be at most {DEFAULT_NAME_MAX} bytes: give a shorter one")
    return name
