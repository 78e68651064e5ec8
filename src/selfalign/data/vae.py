"""The image autoencoder of latent diffusion: a diffusers ``AutoencoderKL`` (SD-VAE by default).

:class:`LatentVAE` encodes images to the encoder's Gaussian ``(mean, std)`` -- what
``selfalign prepare`` stores -- and decodes model-space latents back to images, undoing the
latent scaling. :class:`LatentScaling` is that scaling: ``x_model = (z - shift) * scale``, with
``scale = 0.18215, shift = 0`` for SD-VAE (:data:`selfalign.conventions.SD_VAE_SCALE`) or
per-channel statistics of the dataset (``scale = 1 / std_c, shift = mean_c``) as an option.

diffusers is imported only when a VAE is loaded (optional extra ``selfalign[latent]``).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..conventions import SD_VAE_SCALE
from ..errors import CheckpointError, DataError, UsageError
from .transforms import model_to_uint8, uint8_to_model

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
NORMALIZATIONS = ("scale", "channel")


@dataclass(frozen=True)
class LatentScaling:
    """``x_model = (z - shift) * scale``; ``scale``/``shift`` hold one value or one per channel."""

    scale: tuple[float, ...] = (SD_VAE_SCALE,)
    shift: tuple[float, ...] = (0.0,)

    @classmethod
    def constant(cls, scale: float = SD_VAE_SCALE) -> "LatentScaling":
        return cls((float(scale),), (0.0,))

    @classmethod
    def from_channel_stats(cls, mean: Sequence[float], std: Sequence[float]) -> "LatentScaling":
        """Whiten each channel with dataset statistics of the latent ``z = mean + std * eps``."""
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise DataError(f"channel statistics need one positive std per channel, got mean={list(mean)} "
                            f"std={list(std)}")
        return cls(tuple(1.0 / float(s) for s in std), tuple(float(m) for m in mean))

    @classmethod
    def from_index(cls, index: dict, normalization: str = "scale") -> "LatentScaling":
        """The scaling a latent dataset's ``index.json`` describes (see :mod:`selfalign.pipeline.prepare`)."""
        if normalization == "scale":
            return cls.constant(index.get("scale", SD_VAE_SCALE))
        if normalization == "channel":
            stats = index.get("channel_stats")
            if not stats:
                raise DataError("this latent dataset has no channel statistics; use normalization 'scale'")
            return cls.from_channel_stats(stats["mean"], stats["std"])
        raise ValueError(f"latent normalization {normalization!r} is not one of {NORMALIZATIONS}")

    def _view(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=torch.float32, device=like.device)
        # (C,) broadcasts over the channel axis of (B, C, H, W) or (C, H, W).
        return tensor.view(-1, 1, 1) if len(values) > 1 else tensor.view(())

    def to_model(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self._view(self.shift, z)) * self._view(self.scale, z)

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / self._view(self.scale, x) + self._view(self.shift, x)


def _diffusers():
    try:
        import diffusers  # noqa: F401  (heavy: imported only when a VAE is needed)
    except ImportError:
        raise UsageError("the VAE needs diffusers: pip install 'selfalign[latent]'") from None
    from diffusers import AutoencoderKL
    return AutoencoderKL


def load_autoencoder(spec: Any = DEFAULT_VAE, *, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32):
    """An ``AutoencoderKL`` in eval mode without gradients.

    ``spec`` is a hub id (``stabilityai/sd-vae-ft-ema``), a local directory written by
    ``save_pretrained`` (or a pipeline directory with a ``vae/`` subfolder), a config dict
    (random weights: tests and benchmarks), or an ``AutoencoderKL`` instance.
    """
    AutoencoderKL = _diffusers()
    if isinstance(spec, AutoencoderKL):
        vae = spec
    elif isinstance(spec, dict):
        vae = AutoencoderKL.from_config(spec)
    else:
        spec = str(spec)
        path = Path(spec).expanduser()
        if path.is_dir():
            sub = "vae" if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file() else None
            if sub is None and not (path / "config.json").is_file():
                raise CheckpointError(f"VAE directory {spec!r} has no config.json (write it with "
                                      f"AutoencoderKL.save_pretrained, or pass a hub id)")
            vae = AutoencoderKL.from_pretrained(str(path), subfolder=sub, low_cpu_mem_usage=False)
        elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
            raise CheckpointError(f"VAE {spec!r} is neither a directory nor a hub id like {DEFAULT_VAE!r}")
        else:
            try:
                vae = AutoencoderKL.from_pretrained(spec, low_cpu_mem_usage=False)
            except Exception as err:  # hub/network/cache errors come in many types
                offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
                reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                raise CheckpointError(
                    f"cannot load VAE {spec!r} from the Hugging Face hub{offline}: {reason}; download it "
                    f"once with network access or pass a local directory saved with save_pretrained") from None
    if next(vae.parameters()).dtype != dtype:   # diffusers warns about any dtype cast, even a no-op
        vae = vae.to(dtype=dtype)
    return vae.to(device=device).eval().requires_grad_(False)


class LatentVAE:
    """Encode images to ``(mean, std)`` of the latent Gaussian; decode model-space latents to images.

    Images are float ``(B, 3, H, W)`` in [-1, 1] (``encode``) or uint8 ``(B, H, W, 3)``
    (``encode_uint8``, ``decode_uint8``: the ADM ``.npz`` layout).
    """

    def __init__(self, autoencoder, scaling: LatentScaling | None = None, source: str = "",
                 batch_size: int = 64):
        self.autoencoder = autoencoder
        self.scaling = scaling or LatentScaling.constant()
        self.source = source
        self.batch_size = batch_size

    @classmethod
    def load(cls, spec: Any = DEFAULT_VAE, *, scaling: LatentScaling | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             batch_size: int = 64) -> "LatentVAE":
        source = spec if isinstance(spec, str) else "<in-memory>"
        if isinstance(spec, str) and Path(spec).expanduser().is_dir():
            source = str(Path(spec).expanduser().resolve())
        return cls(load_autoencoder(spec, device=device, dtype=dtype), scaling, source, batch_size)

    @classmethod
    def for_dataset(cls, index: dict, normalization: str = "scale", **kwargs) -> "LatentVAE":
        """The VAE (and scaling) a prepared latent dataset was encoded with, from its index."""
        return cls.load(index["vae"], scaling=LatentScaling.from_index(index, normalization), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.autoencoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    def _autocast(self):
        # Weights already carry the dtype; autocast only keeps odd ops (norms) consistent on GPU.
        if self.dtype == torch.float32 or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [-1, 1] ``(B, 3, H, W)`` -> ``(mean, std)``, float32 ``(B, C, H/f, W/f)``."""
        means, stds = [], []
        for chunk in images.split(self.batch_size):
            with self._autocast():
                dist = self.autoencoder.encode(chunk.to(self.device, self.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def encode_uint8(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(B, H, W, 3)`` -> ``(mean, std)``."""
        return self.encode(uint8_to_model(images.permute(0, 3, 1, 2)))

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents ``(B, C, h, w)`` -> float images in [-1, 1] (not clamped)."""
        out = []
        for chunk in x.split(self.batch_size):
            z = self.scaling.from_model(chunk.to(self.device))
            with self._autocast():
                out.append(self.autoencoder.decode(z.to(self.dtype)).sample.float())
        return torch.cat(out)

    def decode_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> uint8 ``(B, H, W, 3)``, the layout of ADM's sample ``.npz``."""
        return model_to_uint8(self.decode(x)).permute(0, 2, 3, 1).cpu()


def tiny_vae_config(downsample: int = 2, latent_channels: int = 4, width: int = 32) -> dict:
    """A small randomly initialised ``AutoencoderKL`` config (tests, CPU demos)."""
    blocks = {1: 1, 2: 2, 4: 3, 8: 4}.get(downsample)
    if blocks is None:
        raise ValueError(f"downsample must be 1, 2, 4 or 8, got {downsample}")
    return {"in_channels": 3, "out_channels": 3, "latent_channels": latent_channels,
            "down_block_types": ["DownEncoderBlock2D"] * blocks,
            "up_block_types": ["UpDecoderBlock2D"] * blocks,
            "block_out_channels": [width] * blocks, "layers_per_block": 1,
            "norm_num_groups": min(32, width), "sample_size": 32}


def sd_vae_config() -> dict:
    """The architecture of ``stabilityai/sd-vae-ft-ema`` (83.7 M parameters), for random-init benchmarks."""
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
            "norm_num_groups": 32, "sample_size": 256, "scaling_factor": SD_VAE_SCALE}
