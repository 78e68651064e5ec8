"""Fashion-MNIST, the built-in dataset: read from the standard IDX ``.gz`` files into memory.

60,000 training and 10,000 test images of 28x28, 10 classes. Images are padded to 32x32 with the
background value (0 -> -1 after scaling) so a patch size of 2, 4 or 8 tiles them, and scaled to
[-1, 1]. The whole split lives in one uint8 tensor; batches are gathered by index, so no
DataLoader workers are needed and the data order is exactly the sampler's.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import TrainingDataset
from .transforms import uint8_to_model

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "SELFALIGN_FASHION_MNIST"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_SIZES = {"train": 60000, "test": 10000}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
NUM_CLASSES = len(CLASSES)
NATIVE_SIZE = 28
DOWNLOAD_HINT = ("install it with `apt-get install dataset-fashion-mnist`, or download the four IDX "
                 "files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                 "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from "
                 "https://github.com/zalandoresearch/fashion-mnist and set data.path or "
                 f"${ENV_VAR} to their folder")


def resolve_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder holding the IDX files: ``path``, else ``$SELFALIGN_FASHION_MNIST``, else the Debian one."""
    return Path(path or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def read_idx(path: Path) -> np.ndarray:
    """Parse one (gzipped) IDX file into a uint8 array; a clear error names a damaged file."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"Fashion-MNIST file {path} is unreadable ({err}); {DOWNLOAD_HINT}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; {DOWNLOAD_HINT}")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    expected = int(np.prod(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != expected:
        raise DataError(f"{path} is truncated: header says {dims} ({expected} bytes), found "
                        f"{data.size}; {DOWNLOAD_HINT}")
    return data.reshape(dims)


class FashionMNIST(TrainingDataset):
    """One split in memory: ``images`` uint8 ``(N, 1, S, S)``, ``labels`` int64 ``(N,)``.

    ``dataset[i]`` -> (image float32 ``(1, S, S)`` in [-1, 1], label); batched access through
    ``__getitems__`` gathers with one index operation.
    """

    num_classes = NUM_CLASSES
    channels = 1

    def __init__(self, split: str = "train", path: str | os.PathLike | None = None,
                 resolution: int = 32):
        if split not in FILES:
            raise DataError(f"Fashion-MNIST split must be one of {tuple(FILES)}, got {split!r}")
        if resolution < NATIVE_SIZE or (resolution - NATIVE_SIZE) % 2:
            raise ConfigError(f"data.resolution={resolution} does not fit Fashion-MNIST: use an even "
                              f"size >= {NATIVE_SIZE} (images are padded, default 32)")
        root = resolve_dir(path)
        image_file, label_file = (root / name for name in FILES[split])
        missing = [str(p) for p in (image_file, label_file) if not p.is_file()]
        if missing:
            raise DataError(f"Fashion-MNIST not found ({missing[0]} is missing); {DOWNLOAD_HINT}")
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):
            raise DataError(f"{image_file}: expected images of {NATIVE_SIZE}x{NATIVE_SIZE}, got shape {images.shape}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{label_file}: {labels.shape[0]} labels for {images.shape[0]} images")
        if labels.size and labels.max() >= NUM_CLASSES:
            bad = int(np.argmax(labels >= NUM_CLASSES))
            raise DataError(f"{label_file}: label {labels[bad]} at index {bad} is outside 0..{NUM_CLASSES - 1}")
        pad = (resolution - NATIVE_SIZE) // 2
        tensor = torch.from_numpy(images.copy())[:, None]
        self.images = torch.nn.functional.pad(tensor, (pad, pad, pad, pad), value=0)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.split, self.root, self.resolution = split, root, resolution

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int):
        return uint8_to_model(self.images[index]), int(self.labels[index])

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long)
        return uint8_to_model(self.images[index]), self.labels[index]
