"""Where evaluated images come from: an ADM ``.npz``, a folder of images, or the built-in dataset.

Every source yields uint8 ``N x H x W x C`` batches (C = 1 or 3) and knows its length, so 50K
ImageNet samples stream through the Inception network without being held in memory at once.

Source strings (the ``selfalign eval`` commands accept these):

* ``path/to/samples.npz`` -- ADM layout, images in ``arr_0`` (labels, if any, in ``arr_1``);
* ``path/to/folder`` -- every image below it (recursively, sorted); with a ``resolution`` they
  are ADM center-cropped to it (real images), else read as they are (generated PNGs);
* ``fashion-mnist`` / ``fashion-mnist:train`` / ``fashion-mnist:test`` (default split: train).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data.fashion_mnist import NATIVE_SIZE, FashionMNIST
from ..data.imagefolder import IMAGE_EXTENSIONS
from ..data.transforms import center_crop_arr
from ..errors import DataError

DATASET_PREFIX = "fashion-mnist"


class ImageSource:
    """A sized stream of uint8 NHWC batches."""

    name: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def read_all(self, limit: int | None = None) -> np.ndarray:
        return np.concatenate(list(self.batches(1000, limit)), axis=0)


class ArraySource(ImageSource):
    def __init__(self, images: np.ndarray, name: str = "array", labels: np.ndarray | None = None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(f"{name}: expected uint8 images N x H x W (x C), got {images.dtype} {images.shape}")
        self.images = images if images.ndim == 4 else images[..., None]
        self.labels, self.name = labels, name

    def __len__(self):
        return len(self.images)

    def batches(self, batch_size, limit=None):
        end = len(self) if limit is None else min(limit, len(self))
        for start in range(0, end, batch_size):
            yield self.images[start:min(start + batch_size, end)]


class NpzSource(ImageSource):
    """Streams ``arr_0`` of an .npz without loading it whole (like ADM's ``StreamingNpzArrayReader``)."""

    def __init__(self, path: Path, key: str = "arr_0"):
        self.path, self.key, self.name = path, key, str(path)
        try:
            with zipfile.ZipFile(path) as archive:
                if f"{key}.npy" not in archive.namelist():
                    raise DataError(f"{path} has no {key}: an ADM sample batch stores its uint8 images "
                                    f"N x H x W x 3 in {key}")
                with archive.open(f"{key}.npy") as f:
                    self.shape = self._header(f)
        except zipfile.BadZipFile:
            raise DataError(f"{path} is not an .npz file") from None

    def _header(self, f):
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if dtype != np.uint8 or fortran or len(shape) not in (3, 4):
            raise DataError(f"{self.path}: {self.key} must be uint8 N x H x W x C (C-order), got "
                            f"{dtype} {shape}")
        return shape

    def __len__(self):
        return int(self.shape[0])

    @property
    def labels(self) -> np.ndarray | None:
        with np.load(self.path) as data:
            return data["arr_1"] if "arr_1" in data.files else None

    def batches(self, batch_size, limit=None):
        end = len(self) if limit is None else min(limit, len(self))
        item_shape = tuple(self.shape[1:])
        item_bytes = int(np.prod(item_shape))
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as f:
            self._header(f)
            for start in range(0, end, batch_size):
                count = min(batch_size, end - start)
                raw = f.read(count * item_bytes)
                if len(raw) != count * item_bytes:
                    raise DataError(f"{self.path}: {self.key} is truncated at image {start}")
                batch = np.frombuffer(raw, dtype=np.uint8).reshape(count, *item_shape)
                yield batch if batch.ndim == 4 else batch[..., None]


class FolderSource(ImageSource):
    """Images below a folder in sorted order; ADM center crop to ``resolution`` when given."""

    def __init__(self, root: Path, resolution: int | None = None):
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        self.files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise DataError(f"image folder {root} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.root, self.resolution, self.name = root, resolution, str(root)
        self.labels = None

    def __len__(self):
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if self.resolution:
                    image = center_crop_arr(image, self.resolution)
                return np.asarray(image, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise DataError(f"image {path} cannot be read ({err}); fix or remove it") from None

    def batches(self, batch_size, limit=None):
        end = len(self) if limit is None else min(limit, len(self))
        for start in range(0, end, batch_size):
            images = [self.load(i) for i in range(start, min(start + batch_size, end))]
            if len({im.shape for im in images}) > 1:
                raise DataError(f"{self.root}: images of different sizes ({images[0].shape} and others); "
                                "give --resolution to center-crop them to one size")
            yield np.stack(images)


class FashionMNISTSource(ArraySource):
    """A Fashion-MNIST split at ``resolution`` (padded like the training data, default 28 = native)."""

    def __init__(self, split: str = "train", resolution: int | None = None, path=None):
        dataset = FashionMNIST(split, path=path, resolution=resolution or NATIVE_SIZE)
        super().__init__(dataset.images.permute(0, 2, 3, 1).numpy(), f"{DATASET_PREFIX}:{split}",
                         dataset.labels.numpy())


def open_source(spec: str, resolution: int | None = None) -> ImageSource:
    """Parse a source string (see the module docstring)."""
    if spec.lower().startswith(DATASET_PREFIX):
        split = spec.split(":", 1)[1] if ":" in spec else "train"
        return FashionMNISTSource(split, resolution)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, resolution)
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{path}: expected an .npz of samples, a folder of images or "
                            f"'{DATASET_PREFIX}[:train|test]'")
        return NpzSource(path)
    raise DataError(f"{spec} not found: give an .npz of samples, a folder of images or "
                    f"'{DATASET_PREFIX}[:train|test]'")
