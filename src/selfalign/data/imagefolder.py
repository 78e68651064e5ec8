"""Users' own images: ``ROOT/<class name>/<image>``, ADM center crop to the training resolution.

Classes are the sub-folders in sorted order (label 0 is the first); images of every common
format are found recursively inside each class folder. The folder decides what it can:
:func:`describe_folder` reads every image's header (not its pixels) and tells the number of
classes, the channels (1 when every image is grayscale, else 3) and the smallest image, so a
config never has to repeat them and one that contradicts them is refused. A file that cannot be
decoded raises a :class:`~selfalign.errors.DataError` naming the file and its index instead of
failing deep inside a DataLoader worker.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError
from .base import TrainingDataset
from .transforms import center_crop_arr, uint8_to_model

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


class MissingFolderError(DataError, FileNotFoundError):
    """The image folder does not exist (a FileNotFoundError for callers that test for one)."""


def find_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, label), ...]) in a fixed, platform-independent order."""
    if not root.is_dir():
        raise MissingFolderError(f"image folder {str(root)!r} does not exist: set data.path to a folder "
                                 f"with one sub-folder of images per class")
    classes = sorted(entry.name for entry in os.scandir(root)
                     if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {str(root)!r} has no class sub-folders: expected "
                        f"ROOT/<class>/<image> (put all images in one sub-folder for one class)")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        samples.extend((path, label) for path in files)
    if not samples:
        raise DataError(f"image folder {str(root)!r} contains no images with extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)}")
    return classes, samples


@dataclass(frozen=True)
class FolderSummary:
    """What an image folder says about itself (from the file headers)."""

    root: Path
    classes: tuple[str, ...]
    count: int
    channels: int                       # 1: every image is grayscale; 3: at least one is colour
    smallest: tuple[int, int]           # (width, height) of the image with the shortest side
    samples: tuple[tuple[Path, int], ...]   # (file, label) in the training order

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check_resolution(self, resolution: int, key: str = "data.resolution") -> None:
        """Refuse a training resolution larger than the smallest image (it would be upscaled)."""
        width, height = self.smallest
        if min(width, height) < resolution:
            raise DataError(f"{key}={resolution} but the smallest image in {str(self.root)!r} is "
                            f"{width}x{height}: images would be upscaled; set {key} to at most "
                            f"{min(width, height)} or remove the small images")


def describe_folder(root: str | os.PathLike) -> FolderSummary:
    """Classes, channels and the smallest image of an image folder, from the file headers."""
    root = Path(root)
    classes, samples = find_images(root)
    channels, smallest = 1, None
    for index, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as image:      # reads the header only
                mode, size = image.mode, image.size
        except _READ_ERRORS as err:
            raise DataError(f"image {index} ({path}) cannot be read: {err}; fix or remove the file") from None
        if mode not in GRAYSCALE_MODES:
            channels = 3
        if smallest is None or min(size) < min(smallest):
            smallest = size
    return FolderSummary(root, tuple(classes), len(samples), channels, tuple(smallest), tuple(samples))


class ImageFolder(TrainingDataset):
    """Images ADM center-cropped to ``resolution``, in [-1, 1], with integer class labels.

    ``channels`` is 1 (grayscale) or 3 (RGB); by default the folder decides
    (:func:`describe_folder`)."""

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int | None = None):
        if resolution < 1:
            raise ConfigError(f"data.resolution must be >= 1, got {resolution}")
        self.root = Path(root)
        self.resolution = resolution
        self.summary = describe_folder(self.root)
        self.summary.check_resolution(resolution)
        if channels not in (None, 1, 3):
            raise DataError(f"an image folder has 1 (grayscale) or 3 (RGB) channels, not {channels}")
        self.channels = channels or self.summary.channels
        self.classes, self.samples = list(self.summary.classes), list(self.summary.samples)
        self.num_classes = len(self.classes)
        self._mode = "L" if self.channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def load_uint8(self, index: int) -> torch.Tensor:
        """``(C, H, W)`` uint8 of image ``index``, center-cropped."""
        path, _ = self.samples[index]
        try:
            with Image.open(path) as image:
                image = center_crop_arr(image.convert(self._mode), self.resolution)
        except _READ_ERRORS as err:
            raise DataError(f"image {index} ({path}) cannot be read: {err}; fix or remove the file") from None
        array = np.asarray(image).copy()
        return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())

    def __getitem__(self, index: int):
        return uint8_to_model(self.load_uint8(index)), self.samples[index][1]

    def __getitems__(self, indices):
        images = torch.stack([self.load_uint8(int(i)) for i in indices])
        labels = torch.tensor([self.samples[int(i)][1] for i in indices], dtype=torch.long)
        return uint8_to_model(images), labels
