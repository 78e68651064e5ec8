"""Frozen image encoders for REPA: images in [-1, 1] -> patch tokens (B, N, D).

An encoder is any ``nn.Module`` whose ``forward(images)`` takes raw images in ``[-1, 1]``
(B, C, H, W) and returns patch tokens (B, N, D), with an ``embed_dim`` attribute. Each encoder
owns its preprocessing (resize to its input size, channel count, normalisation); the REPA
regularizer resamples the token grid to the student's grid with :func:`match_token_grid`.

Adapters:

* :class:`DINOv2Encoder` -- DINOv2 in the timm layout (``forward_features`` returns all tokens,
  ``num_prefix_tokens`` of them class/register tokens) or the torch.hub layout
  (``forward_features`` returns a dict with ``x_norm_patchtokens``), preprocessed as REPA does.
  :func:`load_dinov2` builds one from a local weight file or a hub id (timm is an optional extra,
  imported only here, only when asked for).
* :class:`FeatureMapEncoder` -- any network returning a spatial feature map (B, C, h, w), e.g. the
  Fashion-MNIST classifier of :mod:`selfalign.models.classifier` (the offline stand-in for DINOv2).

Encoders are frozen: :func:`freeze` puts them in eval mode without gradients. REPA keeps them out
of its module tree, so they are never optimised, wrapped in DDP, or written to checkpoints.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError, ConfigError, UsageError
from ..models.classifier import load_classifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2_SIZES = {"s": 384, "b": 768, "l": 1024, "g": 1536}
DINOV2_PATCH = 14


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a fixed feature extractor."""
    return module.eval().requires_grad_(False)


def preprocess(images: torch.Tensor, size: int | tuple[int, int] | None, mean: Sequence[float],
               std: Sequence[float], channels: int, mode: str = "bicubic") -> torch.Tensor:
    """[-1, 1] images -> the encoder's input: channels matched, resized, normalised.

    Grey images are repeated to 3 channels and RGB averaged to 1 when the encoder wants it.
    The order (to [0, 1], normalise, resize bicubic without antialias) is REPA's for DINOv2.
    """
    x = (images.float() + 1) / 2
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"encoder expects {channels} channels, images have {x.shape[1]}")
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - mean_t) / std_t
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=mode, align_corners=False if mode != "nearest" else None)
    return x


def token_grid(count: int) -> tuple[int, int]:
    """The square (h, w) grid of ``count`` tokens."""
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{count} tokens do not form a square grid")
    return side, side


def match_token_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample tokens (B, N, D) on a square grid to ``grid`` by 2-D bilinear interpolation.

    Antialiased when shrinking (an area-like average), plain bilinear when enlarging; returns the
    input unchanged when the grids agree.
    """
    h, w = token_grid(tokens.shape[1])
    if (h, w) == tuple(grid):
        return tokens
    b, _, d = tokens.shape
    fmap = tokens.transpose(1, 2).reshape(b, d, h, w).float()
    shrink = grid[0] < h or grid[1] < w
    fmap = F.interpolate(fmap, size=tuple(grid), mode="bilinear", align_corners=False, antialias=shrink)
    return fmap.flatten(2).transpose(1, 2).to(tokens.dtype)


def resample_abs_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int],
                           num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a ViT's absolute position embedding (1, prefix + h*w, D) to ``grid``.

    Bicubic with antialias, as ``timm.layers.resample_abs_pos_embed`` (which REPA applies to
    DINOv2 once, at load time).
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    h, w = token_grid(patches.shape[1])
    if (h, w) == tuple(grid):
        return pos_embed
    d = patches.shape[-1]
    fmap = patches.reshape(1, h, w, d).permute(0, 3, 1, 2).float()
    fmap = F.interpolate(fmap, size=tuple(grid), mode="bicubic", antialias=True, align_corners=False)
    patches = fmap.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class DINOv2Encoder(nn.Module):
    """DINOv2 patch tokens, REPA's way: [0, 1], ImageNet mean/std, bicubic resize to ``input_size``.

    ``layout="timm"``: ``model.forward_features(x)`` is (B, prefix + N, D) and the first
    ``model.num_prefix_tokens`` are dropped (timm's DINOv2 ends with its final norm, so these are
    the normalised patch tokens). ``layout="hub"``: the torch.hub model's
    ``forward_features(x)["x_norm_patchtokens"]``.
    """

    def __init__(self, model: nn.Module, layout: str = "timm", input_size: int = 224):
        super().__init__()
        if layout not in ("timm", "hub"):
            raise ValueError(f"DINOv2 layout must be 'timm' or 'hub', got {layout!r}")
        self.model = freeze(model)
        self.layout = layout
        self.input_size = input_size
        self.embed_dim = int(getattr(model, "embed_dim", getattr(model, "num_features", 0)))
        freeze(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images, self.input_size, IMAGENET_MEAN, IMAGENET_STD, channels=3)
        out = self.model.forward_features(x)
        if self.layout == "hub":
            return out["x_norm_patchtokens"]
        return out[:, int(getattr(self.model, "num_prefix_tokens", 1)):]


class FeatureMapEncoder(nn.Module):
    """Tokens from a network that returns a spatial feature map (B, C, h, w): one token per cell.

    ``features`` maps the preprocessed input to the map (default: the module's forward).
    """

    def __init__(self, module: nn.Module, embed_dim: int, *, input_size: int | None = None,
                 channels: int = 1, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.module = freeze(module)
        self.embed_dim = embed_dim
        self.input_size = input_size
        self.channels = channels
        self.mean, self.std = tuple(mean), tuple(std)
        self.features = features
        freeze(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = preprocess(images, self.input_size, self.mean, self.std, self.channels, mode="bilinear")
        fmap = self.features(self.module, x) if self.features else self.module(x)
        if fmap.dim() != 4:
            raise ValueError(f"feature map must be (B, C, h, w), got shape {tuple(fmap.shape)}")
        return fmap.flatten(2).transpose(1, 2)


# -- loading -----------------------------------------------------------------------------------
def fashion_classifier_encoder(weights: str | None = None, *, stage: int = -1,
                               classifier: nn.Module | None = None) -> FeatureMapEncoder:
    """The Fashion-MNIST classifier of :mod:`selfalign.models.classifier` as REPA's offline
    stand-in for DINOv2: stage ``stage``'s feature map as tokens (last stage: 7x7 tokens of 128).

    The classifier prepares its own input from [-1, 1] images (gray, centre 28x28 crop of the
    padded 32x32 data), so the adapter hands the images over unchanged (mean = std = 0.5 undoes
    the [0, 1] step). Its tokens cover the central 28 pixels; resampled to the student's grid they
    are offset by at most the 2-pixel blank padding.
    """
    model = classifier if classifier is not None else load_classifier(weights)
    width = model.stages[stage][-1][0].out_channels      # the stage's last conv
    return FeatureMapEncoder(model, width, channels=1, mean=(0.5,), std=(0.5,),
                             features=lambda module, x: module.feature_map(x, stage))


def _import_timm():
    try:
        import timm  # noqa: F401  (optional extra)
    except ImportError:
        raise UsageError("the timm layout needs timm: pip install 'selfalign[timm]' "
                         "(or use encoder_layout: hub)") from None
    return timm


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def parse_dinov2_name(name: str) -> tuple[str, bool]:
    """"dinov2-vitb14" / "dinov2-vitb14-reg" -> ("b", registers)."""
    parts = name.lower().split("-")
    if len(parts) not in (2, 3) or parts[0] != "dinov2" or not parts[1].startswith("vit") \
            or parts[1][3:] not in {f"{s}14" for s in DINOV2_SIZES} or parts[2:] not in ([], ["reg"]):
        raise ConfigError(f"unknown DINOv2 encoder {name!r}: expected dinov2-vit{{s,b,l,g}}14[-reg]")
    return parts[1][3], len(parts) == 3


def load_dinov2(name: str = "dinov2-vitb14", *, layout: str = "timm", weights: str = "",
                grid: int = 16, hub_repo: str = "facebookresearch/dinov2") -> DINOv2Encoder:
    """A frozen DINOv2 whose patch grid is ``grid`` x ``grid`` (input ``14 * grid`` pixels).

    ``weights``: a local ``.safetensors``/``.pth`` file, or empty to download (timm: from the
    Hugging Face hub, or a ``hf-hub:`` id given here; hub: ``torch.hub`` from ``hub_repo``,
    a GitHub repo or a local clone). The position embedding is resampled to ``grid`` once, as
    REPA does.
    """
    size, registers = parse_dinov2_name(name)
    input_size = DINOV2_PATCH * grid
    local = Path(weights) if weights and not weights.startswith("hf-hub:") else None
    if local is not None and not local.is_file():
        raise CheckpointError(f"encoder weights {weights!r} not found: give a local .safetensors/.pth "
                              "file, or leave encoder_weights empty to download")
    if layout == "timm":
        timm = _import_timm()
        width = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
        arch = f"vit_{width}_patch14{'_reg4' if registers else ''}_dinov2.lvd142m"
        if local is None:
            model = timm.create_model(weights or arch, pretrained=True, img_size=input_size, num_classes=0)
        else:
            model = timm.create_model(arch, pretrained=False, img_size=input_size, num_classes=0)
            from timm.models.vision_transformer import checkpoint_filter_fn
            model.load_state_dict(checkpoint_filter_fn(_read_state_dict(local), model))
    elif layout == "hub":
        entry = f"dinov2_vit{size}14{'_reg' if registers else ''}"
        source = "local" if Path(hub_repo).is_dir() else "github"
        model = torch.hub.load(hub_repo, entry, source=source, pretrained=local is None)
        if local is not None:
            model.load_state_dict(_read_state_dict(local))
        with torch.no_grad():   # the hub model's pos_embed holds the class token + patches only
            model.pos_embed.data = resample_abs_pos_embed(model.pos_embed.data, (grid, grid))
        model.head = nn.Identity()
    else:
        raise ValueError(f"encoder_layout must be 'timm' or 'hub', got {layout!r}")
    return DINOv2Encoder(model, layout=layout, input_size=input_size)
