"""Training data: Fashion-MNIST (built in), ImageFolder (ADM center crop), cached latents.

Every dataset is a :class:`~.base.TrainingDataset`: whole batches from ``__getitems__(indices) ->
(x, y)``; :mod:`.order` decides which indices a rank trains on at each step.
"""
from __future__ import annotations

from ..errors import ConfigError
from .base import TrainingDataset
from .fashion_mnist import FashionMNIST
from .imagefolder import ImageFolder
from .latents import build_latent_dataset
from .order import DataOrder, step_batches
from .transforms import center_crop_arr, model_to_uint8, uint8_to_model


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


__all__ = ["TrainingDataset", "FashionMNIST", "ImageFolder", "DataOrder", "step_batches", "build_dataset",
           "center_crop_arr", "model_to_uint8", "uint8_to_model"]
