"""The DiT/SiT backbone against the original DiT formulas, and its feature-tap contract."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfalign.models import BackboneConfig, DiffusionTransformer, build_model
from selfalign.models.backbone import DiTBlock, TimestepEmbedder, sincos_pos_embed_2d

pytestmark = pytest.mark.usefixtures("single_thread")


# -- independent references, written from the DiT paper / its models.py ------------------------
def dit_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE/DiT ``get_2d_sincos_pos_embed``: meshgrid(w, h); first half embeds grid[0]."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def dit_timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def reference_forward(model: DiffusionTransformer, x, t, y) -> torch.Tensor:
    """The DiT forward pass written out with plain tensor ops from the model's state dict."""
    sd, cfg = model.state_dict(), model.config
    p, d, heads = cfg.patch_size, cfg.hidden_size, cfg.num_heads

    def linear(v, name):
        return v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def layer_norm(v):
        return F.layer_norm(v, (d,), eps=1e-6)

    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]
    t_emb = linear(F.silu(linear(dit_timestep_embedding(t, 256), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    b, n, _ = tokens.shape
    for i in range(cfg.depth):
        pre = f"blocks.{i}"
        mod = linear(F.silu(c), f"{pre}.adaLN_modulation.1")
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.chunk(6, dim=1))
        h = layer_norm(tokens) * (1 + sc1) + sh1
        q, k, v = linear(h, f"{pre}.attn.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1) @ v
        tokens = tokens + g1 * linear(attn.transpose(1, 2).reshape(b, n, d), f"{pre}.attn.proj")
        h = layer_norm(tokens) * (1 + sc2) + sh2
        h = linear(F.gelu(linear(h, f"{pre}.mlp.fc1"), approximate="tanh"), f"{pre}.mlp.fc2")
        tokens = tokens + g2 * h
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = linear(layer_norm(tokens) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    # DiT unpatchify: (N, h*w, p*p*C) -> (N, C, h*p, w*p)
    side, c_out = int(n ** 0.5), cfg.out_channels
    out = out.reshape(b, side, side, p, p, c_out)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, c_out, side * p, side * p)


def inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, c.num_classes + 1, (batch,), generator=g)
    return x, t, y


# -- embeddings and initialisation -------------------------------------------------------------
@pytest.mark.parametrize("dim,grid", [(128, 4), (384, 16), (1152, 16)])
def test_pos_embed_matches_dit_formula(dim, grid):
    ours = sincos_pos_embed_2d(dim, grid)
    ref = dit_2d_sincos_pos_embed(dim, grid)
    assert ours.shape == (grid * grid, dim)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_pos_embed_first_half_follows_the_column_index():
    # DiT's meshgrid(w, h) order: token r*grid + c, the first half depends only on the column c.
    grid, dim = 4, 32
    emb = sincos_pos_embed_2d(dim, grid).reshape(grid, grid, dim)
    assert np.allclose(emb[0, :, : dim // 2], emb[3, :, : dim // 2])
    assert not np.allclose(emb[:, 0, : dim // 2], emb[:, 3, : dim // 2])
    assert np.allclose(emb[:, 0, dim // 2:], emb[:, 3, dim // 2:])


def test_model_pos_embed_buffer_is_the_formula(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8)
    ref = torch.from_numpy(dit_2d_sincos_pos_embed(128, 4)).float()[None]
    torch.testing.assert_close(model.pos_embed, ref, atol=1e-6, rtol=0)


def test_timestep_frequencies_match_dit():
    t = torch.tensor([0.0, 0.25, 1.0, 999.0])
    torch.testing.assert_close(TimestepEmbedder.frequencies(t, 256), dit_timestep_embedding(t, 256))


def test_adaln_zero_init_gives_exactly_zero_output():
    model = build_model("SiT-T/2", input_size=8, in_channels=3, num_classes=10)
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (2, 3, 8, 8)
    assert torch.count_nonzero(out) == 0
    # every block starts as the identity
    tokens = torch.randn(2, 16, 128)
    assert torch.equal(model.blocks[0](tokens, torch.randn(2, 1, 128)), tokens)


def test_state_dict_names_match_original_dit():
    model = build_model("DiT-T/2", input_size=8, in_channels=4, num_classes=10)
    expected = {"x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed",
                "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
                "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
                "y_embedder.embedding_table.weight",
                "final_layer.linear.weight", "final_layer.linear.bias",
                "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    for i in range(model.depth):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expected |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    assert set(model.state_dict()) == expected


def test_xl2_shapes_match_original_dit():
    with torch.device("meta"):
        sd = build_model("DiT-XL/2").state_dict()
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert sd["blocks.27.attn.qkv.weight"].shape == (3456, 1152)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6 * 1152, 1152)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 1152)
    assert "blocks.28.attn.qkv.weight" not in sd


@pytest.mark.parametrize("name,channels,size", [("SiT-T/2", 4, 8), ("DiT-T/4", 3, 16), ("SiT-T/1", 5, 4)])
def test_forward_matches_reference_implementation(tiny_model, name, channels, size):
    model = tiny_model(name, input_size=size, in_channels=channels)
    x, t, y = inputs(model)
    torch.testing.assert_close(model(x, t, y), reference_forward(model, x, t, y), atol=2e-5, rtol=1e-4)


# -- shapes, dtypes ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,channels,size,out_channels", [
    ("SiT-T/2", 4, 32, 4),    # SD-VAE latents
    ("SiT-T/4", 1, 32, 1),    # grey pixels
    ("SiT-T/4", 3, 32, 3),    # RGB pixels
    ("DiT-T/4", 3, 32, 6),    # learn_sigma doubles the output channels
    ("DiT-T/8", 5, 16, 10),   # odd channel count
])
def test_output_shapes(tiny_model, name, channels, size, out_channels):
    model = tiny_model(name, input_size=size, in_channels=channels)
    assert model.config.out_channels == out_channels
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (2, out_channels, size, size)
    assert torch.isfinite(out).all()


def test_learn_sigma_flag_and_override():
    assert build_model("DiT-T/2", input_size=8).config.learn_sigma
    assert not build_model("SiT-T/2", input_size=8).config.learn_sigma
    assert build_model("SiT-T/2", input_size=8, learn_sigma=True).config.out_channels == 8


def test_bf16_autocast_forward_on_cpu_close_to_fp32(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8, in_channels=4)
    x, t, y = inputs(model, batch=4)
    ref, ref_feats = model(x, t, y, taps=[3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, feats = model(x, t, y, taps=[3])
    assert torch.isfinite(out).all()
    for a, b in ((out, ref), (feats[3], ref_feats[3])):
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 3e-2, rel


def test_qk_norm_adds_norms_and_runs(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8, qk_norm=True)
    assert "blocks.0.attn.q_norm.weight" in model.state_dict()
    x, t, y = inputs(model)
    assert torch.isfinite(model(x, t, y)).all()


@pytest.mark.parametrize("overrides,key", [({"input_size": 9}, "input_size"),
                                           ({"hidden_size": 130, "num_heads": 4}, "hidden_size"),
                                           ({"hidden_size": 6, "num_heads": 2}, "hidden_size"),
                                           ({"depth": 0}, "depth")])
def test_bad_shapes_are_rejected_with_the_key(overrides, key):
    base = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    with pytest.raises(ValueError, match=key):
        DiffusionTransformer(BackboneConfig(**{**base, **overrides}))


# -- feature taps ---------------------------------------------------------------------------------
def test_taps_are_one_based_block_outputs(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8)
    x, t, y = inputs(model)
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(o)) for b in model.blocks]
    out, feats = model(x, t, y, taps=[1, 4, 6])
    for h in hooks:
        h.remove()
    assert sorted(feats) == [1, 4, 6]
    for block in (1, 4, 6):
        assert torch.equal(feats[block], seen[block - 1])
    assert torch.equal(out, model(x, t, y))


def test_truncated_features_equal_full_forward_and_stop_early(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8)
    x, t, y = inputs(model)
    _, full = model(x, t, y, taps=[2, 4])
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    hooks.append(model.final_layer.register_forward_hook(lambda m, a, o: calls.append("final")))
    out, short = model(x, t, y, taps=[4, 2], features_only=True)
    for h in hooks:
        h.remove()
    assert out is None
    assert calls == [0, 1, 2, 3]
    for block in (2, 4):
        torch.testing.assert_close(short[block], full[block], atol=1e-6, rtol=0)


@pytest.mark.parametrize("taps,features_only", [([0], False), ([7], False), ([-1], True), ([], True)])
def test_invalid_taps_raise(tiny_model, taps, features_only):
    model = tiny_model("SiT-T/2", input_size=8)   # depth 6
    x, t, y = inputs(model)
    with pytest.raises(ValueError):
        model(x, t, y, taps=taps, features_only=features_only)


def test_per_token_time_all_equal_matches_scalar_time(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8)
    x, t, y = inputs(model)
    out, feats = model(x, t, y, taps=[3])
    t_tokens = t[:, None].expand(-1, model.config.num_tokens).contiguous()
    out_tok, feats_tok = model(x, t_tokens, y, taps=[3])
    torch.testing.assert_close(out_tok, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats_tok[3], feats[3], atol=1e-5, rtol=1e-5)


def test_per_token_time_conditions_each_token(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8)
    x, t, y = inputs(model)
    t_tokens = t[:, None].repeat(1, 16)
    t_tokens[:, 5] = 0.9
    _, base = model(x, t[:, None].repeat(1, 16), y, taps=[1])
    _, changed = model(x, t_tokens, y, taps=[1])
    differs = (base[1] - changed[1]).abs().amax(dim=(0, 2)) > 1e-6
    assert differs[5]


def test_attention_groups_isolate_tokens_in_a_block(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8)
    block: DiTBlock = model.blocks[0]
    g = torch.Generator().manual_seed(1)
    tokens, cond = torch.randn(2, 16, 128, generator=g), torch.randn(2, 16, 128, generator=g)
    groups = torch.randint(0, 2, (2, 16), generator=g)
    groups[:, 0], groups[:, 1] = 0, 1
    mask = (groups[:, :, None] == groups[:, None, :])[:, None]
    perturbed = tokens + (groups == 0)[..., None] * torch.randn(2, 16, 128, generator=g)
    a, b = block(tokens, cond, mask), block(perturbed, cond, mask)
    in_b = groups == 1
    torch.testing.assert_close(a[in_b], b[in_b], atol=1e-6, rtol=0)
    assert not torch.allclose(a[~in_b], b[~in_b])
    # without the mask the groups do see each other
    assert not torch.allclose(block(tokens, cond)[in_b], block(perturbed, cond)[in_b])


def test_attention_groups_isolate_tokens_through_the_model(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8, in_channels=1)
    x, t, y = inputs(model)
    groups = torch.zeros(2, 16, dtype=torch.long)
    groups[:, 8:] = 1                          # the lower half of the 4x4 patch grid
    perturbed = x.clone()
    perturbed[:, :, :4] += 1.0                 # pixels of patch rows 0-1 = tokens 0..7 (group 0)
    a = model(x, t, y, attn_groups=groups)
    b = model(perturbed, t, y, attn_groups=groups)
    torch.testing.assert_close(a[:, :, 4:], b[:, :, 4:], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, :, :4], b[:, :, :4])
    same = model(x, t, y, attn_groups=torch.zeros(2, 16, dtype=torch.long))
    torch.testing.assert_close(same, model(x, t, y), atol=1e-6, rtol=0)


def test_gradient_checkpointing_same_output_and_gradients(tiny_model):
    plain = tiny_model("SiT-T/2", input_size=8).train()
    ckpt = tiny_model("SiT-T/2", input_size=8, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = inputs(plain)
    results = []
    for model in (plain, ckpt):
        out, feats = model(x, t, y, taps=[2])
        (out.square().mean() + feats[2].mean()).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
