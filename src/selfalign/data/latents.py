"""The latent dataset the trainer reads: shards written by ``selfalign prepare``.

Each example is the VAE encoder's ``(mean, std)`` and the class label; the model input is drawn
fresh every step with the step's generator, ``x0 = scale * (mean + std * eps)``
(:func:`draw_x0`), as the released SiT/REPA/SRA pipelines do. With ``use_flips`` the stored
latents of the horizontally flipped images double the dataset (index ``i + N`` is the mirror of
``i``). With ``with_images`` the raw image is re-read from the source and center-cropped the same
way (and mirrored for a flipped copy): REPA-style regularizers need pixels next to latents.

Shards are checked at open: every size always (a truncated shard is an error naming it), and the
sha256 checksums either all at open (``verify="full"``, the default for datasets up to 2 GiB),
shard by shard on first use (``"lazy"``), or not (``"size"``, the default above 2 GiB).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import ConfigError, DataError
from ..formats import shards as fmt
from .base import TrainingDataset
from .sources import ImageReader
from .transforms import uint8_to_model
from .vae import LatentScaling, LatentVAE

VERIFY_MODES = ("auto", "full", "lazy", "size")
AUTO_FULL_BYTES = 2 << 30


def draw_x0(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None,
            scaling: LatentScaling | None = None) -> torch.Tensor:
    """A latent sample in model space: ``scaling.to_model(mean + std * eps)``, ``eps ~ N(0, I)``.

    ``generator`` must live on ``mean``'s device; all randomness comes from it.
    """
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (scaling or LatentScaling.constant()).to_model(mean.float() + std.float() * eps)


class LatentDataset(TrainingDataset):
    """Prepared latents: ``dataset[i] -> (mean, std, label)`` (``+ image`` with ``with_images``).

    ``__getitems__(indices)`` returns the trainer's batch ``(moments, labels[, images])`` with
    ``moments = cat([mean, std], dim=1)``; :meth:`to_model` turns it into the model input. Images
    are float in [-1, 1] ``(B, 3, H, W)`` like :class:`selfalign.data.imagefolder.ImageFolder`.
    """

    flippable = False

    def __init__(self, root: str | os.PathLike, *, use_flips: bool = False, with_images: bool = False,
                 verify: str = "auto", normalization: str = "scale"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} is not one of {VERIFY_MODES}")
        self.root = Path(root).expanduser()
        self.index = fmt.load_index(self.root)
        if use_flips and not self.index["flipped"]:
            raise DataError(f"latent dataset {str(self.root)!r} has no flipped copies; prepare it with --flip "
                            f"or turn flips off")
        self.use_flips, self.with_images = use_flips, with_images
        self.scaling = LatentScaling.from_index(self.index, normalization)
        self.shards = [s for s in self.index["shards"] if s["count"] > 0]
        if not self.shards:
            raise DataError(f"latent dataset {str(self.root)!r} holds no images")
        self.offsets = np.cumsum([0] + [s["count"] for s in self.shards])
        self.labels = torch.tensor([l for s in self.shards for l in s["labels"]], dtype=torch.long)
        self.count = int(self.offsets[-1])
        self._check_labels()
        for entry in self.shards:          # sizes are cheap and catch truncation early
            path = self.root / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                fmt.verify_shard(self.root, entry)
        total = sum(s["bytes"] for s in self.shards)
        self.verify = ("full" if total <= AUTO_FULL_BYTES else "size") if verify == "auto" else verify
        self._verified: set[int] = set()
        if self.verify == "full":
            for i, entry in enumerate(self.shards):
                fmt.verify_shard(self.root, entry)
                self._verified.add(i)
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()
        self._reader = None
        self._vae = None

    # -- what the dataset is ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.index["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.index["class_names"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.index["latent_shape"])

    @property
    def channels(self) -> int:
        return self.latent_shape[0]

    @property
    def image_size(self) -> int:
        return int(self.index["image_size"])

    def __len__(self) -> int:
        return self.count * (2 if self.use_flips else 1)

    # -- reading ------------------------------------------------------------------------------
    def _locate(self, index: int) -> tuple[int, int, bool]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside the latent dataset of {len(self)} examples")
        flipped = index >= self.count
        item = index - self.count if flipped else index
        shard = int(np.searchsorted(self.offsets, item, side="right") - 1)
        return shard, item - int(self.offsets[shard]), flipped

    def _handle(self, shard: int):
        if os.getpid() != self._pid:       # a forked DataLoader worker opens its own handles
            self._handles, self._pid, self._reader = {}, os.getpid(), None
        if shard not in self._handles:
            entry = self.shards[shard]
            if self.verify == "lazy" and shard not in self._verified:
                fmt.verify_shard(self.root, entry)
                self._verified.add(shard)
            path = self.root / entry["file"]
            if self.index["file_format"] == "safetensors":
                try:
                    self._handles[shard] = safe_open(str(path), framework="pt")
                except Exception as err:
                    raise DataError(f"latent shard {str(path)!r} is unreadable ({err}); rerun "
                                    f"`selfalign prepare` to rebuild it") from None
            else:
                self._handles[shard] = fmt.read_shard(path, "npy", self.index["flipped"])
            self._check_shapes(shard, self._handles[shard])
        return self._handles[shard]

    def _check_labels(self) -> None:
        """A label outside ``0..num_classes-1`` is named with its shard and index, not found by the
        label embedding in the middle of training."""
        bad = ((self.labels < 0) | (self.labels >= self.num_classes)).nonzero().flatten()
        if len(bad):
            index = int(bad[0])
            shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
            raise DataError(f"latent shard {str(self.root / self.shards[shard]['file'])!r}: label "
                            f"{int(self.labels[index])} at index {index} is outside 0..{self.num_classes - 1} "
                            f"(num_classes in index.json); rerun `selfalign prepare` to rebuild the dataset")

    def _check_shapes(self, shard: int, handle) -> None:
        """Every array of a shard is ``(count, *latent_shape)``; a misfit is named here, not in a batch."""
        entry = self.shards[shard]
        expected = (entry["count"], *self.latent_shape)
        for key in fmt.ARRAY_KEYS if self.index["flipped"] else fmt.ARRAY_KEYS[:2]:
            try:
                shape = tuple(handle[key].shape if isinstance(handle, dict) else handle.get_slice(key).get_shape())
            except Exception:
                shape = "missing"
            if shape != expected:
                raise DataError(f"latent shard {str(self.root / entry['file'])!r}: {key} has shape {shape}, "
                                f"index.json says {expected}; rerun `selfalign prepare` to rebuild it")

    def _row(self, shard: int, row: int, key: str) -> torch.Tensor:
        handle = self._handle(shard)
        if isinstance(handle, dict):
            return handle[key][row].clone()
        return handle.get_slice(key)[row:row + 1][0]

    def _image(self, shard: int, row: int, flipped: bool) -> torch.Tensor:
        if self._reader is None:
            source = self.index["source"]
            self._reader = ImageReader(source["root"], source["prefix"])
        rel = self.shards[shard]["sources"][row]
        try:
            array = self._reader.read_cropped(rel, self.image_size)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"source image {rel!r} of latent dataset {str(self.root)!r} cannot be read "
                            f"from {self.index['source']['root']!r} ({err}); raw images need the original "
                            f"image folder in place") from None
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return image.flip(-1) if flipped else image

    def _example(self, index: int):
        shard, row, flipped = self._locate(int(index))
        suffix = "_flip" if flipped else ""
        out = [self._row(shard, row, "mean" + suffix).float(), self._row(shard, row, "std" + suffix).float(),
               self.labels[int(self.offsets[shard]) + row]]
        if self.with_images:
            out.append(self._image(shard, row, flipped))
        return out

    def __getitem__(self, index: int):
        """``(mean, std, label)``, plus the image (float in [-1, 1]) with ``with_images``."""
        example = self._example(index)
        if self.with_images:
            example[3] = uint8_to_model(example[3])
        return tuple(example)

    def __getitems__(self, indices):
        """A batch in the trainer's ``(x, y)`` form: ``(moments, labels[, images])``.

        ``moments`` is ``(B, 2C, h, w)``, mean then std along channels (the layout REPA's and
        SRA's cached latents use); :meth:`to_model` draws the model input from it.
        """
        examples = [self._example(i) for i in indices]
        moments = torch.cat([torch.stack([e[0] for e in examples]), torch.stack([e[1] for e in examples])], 1)
        batch = [moments, torch.stack([e[2] for e in examples])]
        if self.with_images:
            batch.append(uint8_to_model(torch.stack([e[3] for e in examples])))
        return tuple(batch)

    def to_model(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x0 = scale * (mean + std * eps)`` from a ``(B, 2C, h, w)`` batch of moments."""
        mean, std = moments.float().chunk(2, dim=1)
        return draw_x0(mean, std, generator, self.scaling)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> float images in [-1, 1] with the VAE the dataset was made with
        (loaded on first use, on ``x0``'s device): the trainer's sample grids call this."""
        if self._vae is None or self._vae.device != x0.device:
            self._vae = LatentVAE.for_dataset(self.index, device=x0.device)
            self._vae.scaling = self.scaling
        return self._vae.decode(x0)


def build_latent_dataset(config, split: str = "train", with_images: bool = False) -> LatentDataset:
    """The dataset of a ``data.kind: latents`` config (:class:`selfalign.config.DataConfig`).

    ``data.path`` is the folder ``selfalign prepare`` wrote; ``data.resolution`` must be the image
    size it was prepared at; ``data.hflip`` serves the stored latents of the mirrored images
    (prepared with ``--flip``) as extra examples, so the trainer must not mirror latents itself.
    A batch is ``(moments, labels[, images])``; draw the model input with :meth:`LatentDataset.to_model`
    on the training device with the step's generator.
    """
    if split != "train":
        raise DataError(f"latent datasets have one split (the prepared folder), not {split!r}")
    dataset = LatentDataset(config.path, with_images=with_images)
    if dataset.image_size != config.resolution:
        raise ConfigError(f"data.resolution={config.resolution} but {config.path!r} was prepared at "
                          f"{dataset.image_size} px; set data.resolution={dataset.image_size}")
    if config.hflip:
        if not dataset.index["flipped"]:
            raise ConfigError(f"data.hflip needs flipped latents: prepare {config.path!r} again with --flip "
                              f"(or set data.hflip=false)")
        dataset.use_flips = True
    return dataset
