"""Named presets: the papers' sizes and parameter counts, and clear errors for bad names."""
from __future__ import annotations

import pytest
import torch

from selfalign.models import backbone_config, build_model, count_parameters, parse_preset, preset_names

# DiT paper, Table 1 (SiT reuses the same models): millions of parameters at patch 2.
PUBLISHED_M = {"S": 33.0, "B": 130.0, "L": 458.0, "XL": 675.0}
# DiT paper, Table 1: (hidden size, depth, heads).
PAPER_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def meta_count(name: str, **kwargs) -> int:
    with torch.device("meta"):   # no memory for the weights
        return count_parameters(build_model(name, **kwargs))


@pytest.mark.parametrize("family", ["DiT", "SiT"])
@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_paper_preset_parameter_counts(family, size):
    params = meta_count(f"{family}-{size}/2")
    published = PUBLISHED_M[size] * 1e6
    assert abs(params - published) / published < 0.005, (family, size, params)


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_paper_preset_shapes(size):
    config = backbone_config(f"SiT-{size}/2")
    assert (config.hidden_size, config.depth, config.num_heads) == PAPER_SIZES[size]
    assert config.num_tokens == 256 and config.in_channels == 4 and config.num_classes == 1000


def test_dit_xl2_count_is_the_original_code_minus_its_pos_embed_parameter():
    # The original models.py counts 675,129,632 including pos_embed (a frozen nn.Parameter);
    # here pos_embed is a buffer, 256 tokens x 1152.
    assert meta_count("DiT-XL/2") == 675_129_632 - 256 * 1152


@pytest.mark.parametrize("family,c_out_factor", [("DiT", 2), ("SiT", 1)])
@pytest.mark.parametrize("patch", [1, 4, 8])
def test_patch_size_changes_only_embedding_and_final_layer(family, c_out_factor, patch):
    d, c = 768, 4
    c_out = c * c_out_factor
    expected = (patch ** 2 - 4) * c * d + (patch ** 2 - 4) * c_out * (d + 1)
    assert meta_count(f"{family}-B/{patch}") - meta_count(f"{family}-B/2") == expected


def test_preset_names_cover_families_sizes_and_patches():
    names = preset_names()
    assert len(names) == len(set(names)) == 2 * 6 * 4
    for name in ("SiT-XL/2", "DiT-B/4", "SiT-S/8", "DiT-L/1", "SiT-T/2", "DiT-M/2"):
        assert name in names
        assert parse_preset(name)[0] == name[:3]
    assert parse_preset("SiT-XL/2") == ("SiT", "XL", 2)


@pytest.mark.parametrize("bad", ["SiT-XL/3", "sit-xl/2", "SiT-XXL/2", "SiT-XL", "REPA-B/2", ""])
def test_unknown_preset_names_are_rejected(bad):
    with pytest.raises(ValueError, match="selfalign models"):
        parse_preset(bad)


def test_family_defaults_and_overrides():
    assert backbone_config("DiT-B/2").learn_sigma and backbone_config("DiT-B/2").out_channels == 8
    assert not backbone_config("SiT-B/2").learn_sigma
    cfg = backbone_config("SiT-T/4", input_size=16, in_channels=1, num_classes=10, qk_norm=True)
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.qk_norm, cfg.patch_size) == (16, 1, 10, True, 4)
    with pytest.raises(TypeError):
        backbone_config("SiT-T/4", not_a_field=1)


def test_small_presets_build_on_cpu():
    model = build_model("SiT-T/2", input_size=8, in_channels=1, num_classes=10)
    assert model.config.depth == 6 and count_parameters(model) < 3_000_000
