"""Training data: Fashion-MNIST (built in), ImageFolder (ADM center crop), cached latents.

Every dataset is a :class:`~.base.TrainingDataset`: whole batches from ``__getitems__(indices) ->
(x, y)``; :mod:`.order` decides which indices a rank trains on at each step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..formats.shards import load_index
from .base import TrainingDataset
from .fashion_mnist import FashionMNIST
from .imagefolder import ImageFolder, describe_folder
from .latents import build_latent_dataset
from .order import DataOrder, step_batches
from .transforms import center_crop_arr, model_to_uint8, uint8_to_model


@dataclass(frozen=True)
class DataFacts:
    """What a data set says about itself, for the model it trains."""

    num_classes: int
    channels: int
    where: str          # how messages name it


def describe_data(config) -> DataFacts | None:
    """Classes and channels of an image folder (file headers; the resolution is checked too) or
    of prepared latents (``index.json``); None for Fashion-MNIST and for data that is not there
    yet (building the dataset then says what is missing)."""
    if config.kind == "imagefolder" and Path(config.path).is_dir():
        summary = describe_folder(config.path)
        summary.check_resolution(config.resolution)
        return DataFacts(summary.num_classes, summary.channels, f"the image folder {config.path!r}")
    if config.kind == "latents" and (Path(config.path) / "index.json").is_file():
        index = load_index(config.path)
        return DataFacts(int(index["num_classes"]), int(index["latent_shape"][0]),
                         f"the latent dataset {config.path!r}")
    return None


def build_dataset(config, split: str = "train", with_images: bool = False) -> TrainingDataset:
    """The dataset a :class:`~selfalign.config.DataConfig` describes; ``with_images`` asks a latent
    dataset for the raw pixels too (pixel datasets are images already)."""
    if config.kind == "fashion_mnist":
        return FashionMNIST(split, config.path or None, config.resolution)
    if config.kind == "imagefolder":
        return ImageFolder(config.path, config.resolution)
    if config.kind == "latents":
        return build_latent_dataset(config, split, with_images=with_images)
    raise ConfigError(f"data.kind={config.kind!r} is not supported")


__all__ = ["TrainingDataset", "FashionMNIST", "ImageFolder", "DataOrder", "DataFacts", "step_batches",
           "build_dataset", "describe_data",
           "center_crop_arr", "model_to_uint8", "uint8_to_model"]
