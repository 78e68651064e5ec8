"""Users' own images: ``ROOT/<class name>/<image>``, ADM center crop to the training resolution.

Classes are the sub-folders in sorted order (label 0 is the first); images of every common
format are found recursively inside each class folder. A file that cannot be decoded raises a
:class:`~selfalign.errors.DataError` naming the file and its index instead of failing deep inside a DataLoader worker.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError
from .base import TrainingDataset
from .transforms import center_crop_arr, uint8_to_model

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def find_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, label), ...]) in a fixed, platform-independent order."""
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist: set data.path to a folder "
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


class ImageFolder(TrainingDataset):
    """RGB images, ADM center-cropped to ``resolution``, in [-1, 1], with integer class labels."""

    channels = 3

    def __init__(self, root: str | os.PathLike, resolution: int):
        if resolution < 1:
            raise ConfigError(f"data.resolution must be >= 1, got {resolution}")
        self.root = Path(root)
        self.resolution = resolution
        self.classes, self.samples = find_images(self.root)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load_uint8(self, index: int) -> torch.Tensor:
        path, _ = self.samples[index]
        try:
            with Image.open(path) as image:
                image = center_crop_arr(image.convert("RGB"), self.resolution)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            raise DataError(f"image {index} ({path}) cannot be read: {err}; fix or remove the file") from None
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def __getitem__(self, index: int):
        return uint8_to_model(self.load_uint8(index)), self.samples[index][1]

    def __getitems__(self, indices):
        images = torch.stack([self.load_uint8(int(i)) for i in indices])
        labels = torch.tensor([self.samples[int(i)][1] for i in indices], dtype=torch.long)
        return uint8_to_model(images), labels
