"""The on-disk format of a prepared latent dataset: shards, their checksums, and the index.

A dataset directory holds::

    index.json                  what the dataset is: source, VAE, scale, classes, shards + sha256
    shards/shard-000000.safetensors   (or .npy)
    shards/shard-000000.json    the shard's own record (written after the shard, used to resume)
    skipped.txt                 images that could not be read, one "path<TAB>error" per line

A safetensors shard holds ``mean`` and ``std`` ``(n, C, h, w)``, ``labels`` ``(n,)`` and, when
flipped copies were made, ``mean_flip`` and ``std_flip``. An ``.npy`` shard is one array
``(n, K, C, h, w)`` with ``K`` = [mean, std] or [mean, std, mean_flip, std_flip] (memory
mappable); its labels are in the index. Files are written under a temporary name and renamed,
so a crash never leaves a half-written file under a final name.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from ..errors import DataError

FORMATS = ("safetensors", "npy")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
INDEX_NAME = "index.json"
SHARD_DIR = "shards"
SKIPPED_NAME = "skipped.txt"
INDEX_KIND = "selfalign-latents"
INDEX_VERSION = 1
ARRAY_KEYS = ("mean", "std", "mean_flip", "std_flip")


def shard_file(index: int, fmt: str) -> str:
    return f"{SHARD_DIR}/shard-{index:06d}.{fmt}"


def record_file(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:06d}.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def encode_shard(arrays: dict[str, torch.Tensor], labels: torch.Tensor, fmt: str) -> bytes:
    """The bytes of one shard; deterministic for equal inputs (multi-process runs compare them)."""
    if fmt == "safetensors":
        tensors = {k: v.contiguous() for k, v in arrays.items()}
        tensors["labels"] = labels.to(torch.int64).contiguous()
        return save(tensors, metadata={"format": INDEX_KIND})
    if fmt == "npy":
        stacked = torch.stack([arrays[k] for k in ARRAY_KEYS if k in arrays], dim=1).numpy()
        buffer = io.BytesIO()
        np.save(buffer, stacked, allow_pickle=False)
        return buffer.getvalue()
    raise ValueError(f"shard format {fmt!r} is not one of {FORMATS}")


def read_shard(path: str | os.PathLike, fmt: str, flipped: bool) -> dict[str, torch.Tensor]:
    """The arrays of one shard (``labels`` only for safetensors); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"latent shard {str(path)!r} is missing; run `selfalign prepare` again "
                        f"with the same arguments to rebuild it")
    try:
        if fmt == "safetensors":
            return load_file(str(path))
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        with warnings.catch_warnings():     # read-only memory map: rows are copied before use
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            stacked = torch.from_numpy(array)
    except Exception as err:
        raise DataError(f"latent shard {str(path)!r} is unreadable or truncated ({type(err).__name__}: "
                        f"{str(err)[:100]}); run `selfalign prepare` again to rebuild it") from None
    keys = ARRAY_KEYS if flipped else ARRAY_KEYS[:2]
    if stacked.dim() != 5 or stacked.shape[1] != len(keys):
        raise DataError(f"latent shard {str(path)!r} has shape {tuple(stacked.shape)}, expected "
                        f"(n, {len(keys)}, C, h, w)")
    return {k: stacked[:, i] for i, k in enumerate(keys)}


def load_index(root: str | os.PathLike) -> dict:
    """The ``index.json`` of a prepared dataset, with one clear error for anything else."""
    root = Path(root)
    path = root / INDEX_NAME if root.is_dir() else root
    if not path.is_file():
        hint = (" (prepare has not finished: rerun it with the same arguments to complete it)"
                if (root / SHARD_DIR).is_dir() else " (create it with `selfalign prepare`)")
        raise DataError(f"{str(root)!r} is not a prepared latent dataset: no {INDEX_NAME}{hint}")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{str(path)!r} is not valid JSON; rerun `selfalign prepare` to rewrite it") from None
    if not isinstance(index, dict) or index.get("kind") != INDEX_KIND:
        raise DataError(f"{str(path)!r} is not a selfalign latent index (kind != {INDEX_KIND!r})")
    if index.get("version", 0) > INDEX_VERSION:
        raise DataError(f"{str(path)!r} has format version {index['version']}; this selfalign reads "
                        f"up to {INDEX_VERSION}: upgrade selfalign")
    return index


def verify_shard(root: Path, entry: dict) -> None:
    """Raise :class:`DataError` naming the file if a shard's size or sha256 differs from its index entry."""
    path = root / entry["file"]
    if not path.is_file():
        raise DataError(f"latent shard {str(path)!r} is missing; rerun `selfalign prepare` "
                        f"with the same arguments to rebuild it")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataError(f"latent shard {str(path)!r} is truncated or changed: {size} bytes, index says "
                        f"{entry['bytes']}; rerun `selfalign prepare` to rebuild it")
    if sha256_file(path) != entry["sha256"]:
        raise DataError(f"latent shard {str(path)!r} fails its sha256 checksum; rerun `selfalign "
                        f"prepare` to rebuild it")
