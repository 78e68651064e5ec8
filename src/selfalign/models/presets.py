"""Named model presets: "SiT-XL/2", "DiT-B/4", ... and small ones for CPU.

DiT and SiT share the backbone; the family decides the defaults that differ: DiT learns the
variance (output channels doubled) and is trained with the DDPM objective, SiT predicts a
velocity with a flow objective. Published parameter counts (DiT paper, Table 1; SiT reuses
them) are kept here so tests can hold every preset to them.
"""
from __future__ import annotations

import re
from dataclasses import replace

from ..errors import ConfigError
from .backbone import BackboneConfig, DiffusionTransformer

# name: (hidden_size, depth, num_heads)
SIZES = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
    # Small sizes for CPUs and the built-in dataset (not from the papers).
    "T": (128, 6, 4),      # tiny: CPU tests and the quick demo
    "M": (256, 8, 4),      # mini: CPU demo / convergence benchmark
}
PATCHES = (1, 2, 4, 8)
FAMILIES = ("DiT", "SiT")

# Published parameter counts in millions at patch 2 (DiT paper; SiT's Table 1 lists the same
# models). Other patch sizes differ only in the patch embedding and the final layer.
PUBLISHED_PARAMS_M = {"S/2": 33.0, "B/2": 130.0, "L/2": 458.0, "XL/2": 675.0}

_NAME = re.compile(r"^(DiT|SiT)-(S|B|L|XL|T|M)/(1|2|4|8)$")


def preset_names() -> list[str]:
    return [f"{fam}-{size}/{p}" for fam in FAMILIES for size in SIZES for p in PATCHES]


def parse_preset(name: str) -> tuple[str, str, int]:
    """"SiT-XL/2" -> ("SiT", "XL", 2); one clear error for anything else."""
    match = _NAME.match(name)
    if not match:
        raise ConfigError(f"unknown model preset {name!r}: expected FAMILY-SIZE/PATCH with FAMILY in "
                          f"{FAMILIES}, SIZE in {tuple(SIZES)}, PATCH in {PATCHES} (see `selfalign models`)")
    return match.group(1), match.group(2), int(match.group(3))


def backbone_config(name: str, *, input_size: int = 32, in_channels: int = 4,
                    num_classes: int = 1000, **overrides) -> BackboneConfig:
    """The :class:`BackboneConfig` of a named preset; keyword overrides win."""
    family, size, patch = parse_preset(name)
    hidden, depth, heads = SIZES[size]
    config = BackboneConfig(input_size=input_size, in_channels=in_channels, patch_size=patch,
                            hidden_size=hidden, depth=depth, num_heads=heads,
                            num_classes=num_classes, learn_sigma=(family == "DiT"))
    return replace(config, **overrides)


def build_model(name: str, **kwargs) -> DiffusionTransformer:
    return DiffusionTransformer(backbone_config(name, **kwargs))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
