"""A small Fashion-MNIST CNN: the in-domain judge of generated images and REPA's stand-in encoder.

Architecture (VGG-style, 3 stages of conv3x3-BN-ReLU): one conv at 28x28 (32 ch), two at 14x14
(64 ch) and two at 7x7 (128 ch), 2x2 max-pooling between stages, global average pooling, dropout, linear. Its
outputs are the logits, the pooled 128-d feature (for Frechet distance and precision/recall in its
feature space) and the last stage's feature map as 49 tokens ``(B, 49, 128)`` (or the 14x14 stage
as 196 tokens of 64), for REPA.

Input: images in [-1, 1], ``(B, 1 or 3, H, W)``. :meth:`FashionClassifier.prepare` averages RGB to
gray, undoes the dataset's padding (center crop to 28 when ``H > 28``) and resizes smaller images.
Trained by ``scripts/train_classifier.py``; the weights ship in ``selfalign/assets``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError

NATIVE_SIZE = 28
ASSET = Path(__file__).resolve().parent.parent / "assets" / "fashion_mnist_classifier.safetensors"


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FashionClassifier(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), depths: tuple[int, ...] = (1, 2, 2),
                 num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        stages, cin = [], 1
        for width, depth in zip(widths, depths):
            stages.append(nn.Sequential(*(_conv(cin if i == 0 else width, width) for i in range(depth))))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any channel count/size -> ``(B, 1, 28, 28)``."""
        if images.dim() != 4:
            raise ValueError(f"classifier input must be (B, C, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        h, w = x.shape[-2:]
        if h >= NATIVE_SIZE and w >= NATIVE_SIZE:     # padded like the training data: crop the centre
            top, left = (h - NATIVE_SIZE) // 2, (w - NATIVE_SIZE) // 2
            x = x[..., top:top + NATIVE_SIZE, left:left + NATIVE_SIZE]
        else:
            x = F.interpolate(x, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", align_corners=False)
        return x

    def feature_map(self, images: torch.Tensor, stage: int = -1) -> torch.Tensor:
        """Output of stage ``stage`` (0-based, -1 = last): ``(B, D, h, w)``."""
        x = self.prepare(images)
        last = stage % len(self.stages)
        for index, block in enumerate(self.stages):
            if index:
                x = F.max_pool2d(x, 2)
            x = block(x)
            if index == last:
                break
        return x

    def tokens(self, images: torch.Tensor, stage: int = -1) -> torch.Tensor:
        """The feature map as patch tokens ``(B, h*w, D)`` (row-major, like the DiT patch order)."""
        return self.feature_map(images, stage).flatten(2).transpose(1, 2)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.feature_map(images).mean(dim=(2, 3))
        return pooled, self.head(self.dropout(pooled))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


def classifier_weights(path: str | Path | None = None) -> Path:
    """The classifier's weight file: ``path``, else the committed one; one line when it is missing."""
    path = Path(path) if path else ASSET
    if not path.is_file():
        raise CheckpointError(f"classifier weights {path} not found: train them with "
                              "`python scripts/train_classifier.py --out PATH`")
    return path


def load_classifier(path: str | Path | None = None, device="cpu") -> FashionClassifier:
    """The committed classifier (``selfalign/assets``) or one trained by ``scripts/train_classifier.py``."""
    path = classifier_weights(path)
    model = FashionClassifier()
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit the Fashion-MNIST classifier: "
                              f"{str(err).splitlines()[0]}") from None
    return model.eval().requires_grad_(False).to(device)
