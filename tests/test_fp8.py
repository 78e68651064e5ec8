"""The fp8 teacher view: scaled e4m3 matmuls, which layers use them, shared tensors, accuracy."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from selfalign.ema import EMA
from selfalign.models import fp8
from selfalign.models.fp8 import FP8_MAX, Float8Linear, float8_view, fp8_unavailable_reason, quantize_rows

pytestmark = pytest.mark.usefixtures("single_thread")


def features(model, x, t, y, layer=4):
    with torch.no_grad():
        _, feats = model(x, t, y, taps=[layer], features_only=True)
    return feats[layer]


def inputs(batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, 8, 8, generator=g), torch.rand(batch, generator=g),
            torch.randint(0, 10, (batch,), generator=g))


def test_quantize_rows_keeps_each_row_within_e4m3_precision():
    x = torch.randn(5, 64) * torch.logspace(-3, 3, 5)[:, None]     # rows six decades apart
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((5,), FP8_MAX))   # each row's amax -> 448
    back = q.float() * scale
    big = x.abs() > x.abs().amax(dim=1, keepdim=True) / 64                       # normal e4m3 range
    assert ((back - x).abs() <= x.abs() * 2 ** -4 + 1e-30)[big].all()           # 3 mantissa bits


def test_fp8_linear_is_the_product_of_the_dequantized_operands():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    out = Float8Linear(linear)(x)
    assert out.shape == (3, 7, 48) and out.dtype == torch.float32
    qx, sx = quantize_rows(x.reshape(-1, 64))
    qw, sw = quantize_rows(linear.weight.detach())
    expected = (qx.double() * sx) @ (qw.double() * sw).T + linear.bias.double()
    torch.testing.assert_close(out.reshape(-1, 48).double(), expected, rtol=2 ** -7, atol=1e-3)
    exact = linear(x)
    error = ((out - exact).norm() / exact.norm()).item()
    assert 1e-3 < error < 0.06       # it really is fp8, and fp8 is close


def test_fp8_linear_follows_autocast_dtype():
    linear = nn.Linear(32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Float8Linear(linear)(torch.randn(4, 32)).dtype == torch.bfloat16


def test_view_converts_the_block_linears_only(tiny_model):
    model = tiny_model("SiT-T/2")
    view = float8_view(model)
    for block in view.blocks:
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert isinstance(layer, Float8Linear)
        assert type(block.adaLN_modulation[1]) is nn.Linear      # one row per image: stays
    assert type(view.final_layer.linear) is nn.Linear and type(view.t_embedder.mlp[0]) is nn.Linear
    assert not any(isinstance(m, Float8Linear) for m in model.modules())   # the source is untouched
    model.compile()      # in place: the view must run its own forward, not the source's compiled one
    assert float8_view(model)._compiled_call_impl is None
    # sizes _scaled_mm cannot take (not multiples of 16) stay in the caller's precision
    odd = float8_view(tiny_model("SiT-T/2", hidden_size=40, num_heads=2))
    assert type(odd.blocks[0].attn.qkv) is nn.Linear


def test_view_shares_the_ema_tensors_and_follows_its_updates(tiny_model):
    model = tiny_model("SiT-T/2")
    ema = EMA(model, decay=0.5)
    view = float8_view(ema.model)
    own = dict(ema.model.named_parameters())
    for name, param in view.named_parameters():
        assert param is own[name]
    assert view.pos_embed is ema.model.pos_embed
    assert view.state_dict().keys() == ema.model.state_dict().keys()
    x, t, y = inputs()
    before = features(view, x, t, y)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema.update(model)
    after = features(view, x, t, y)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, features(float8_view(ema.model), x, t, y), rtol=0, atol=0)


def test_teacher_features_stay_close_to_full_precision(tiny_model):
    model = tiny_model("SiT-T/2")
    x, t, y = inputs()
    exact, cheap = features(model, x, t, y), features(float8_view(model), x, t, y)
    cosine = torch.nn.functional.cosine_similarity(exact.flatten(1), cheap.flatten(1))
    assert cosine.min() > 0.999
    assert 0 < ((cheap - exact).norm() / exact.norm()).item() < 0.02


def test_fp8_needs_a_recent_gpu(monkeypatch):
    assert fp8_unavailable_reason("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert "7.0" in fp8_unavailable_reason("cuda") and "8.9" in fp8_unavailable_reason("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_unavailable_reason("cuda") is None
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "ROCm" in fp8_unavailable_reason("cuda")
    monkeypatch.delattr(torch, "_scaled_mm")
    assert "no torch._scaled_mm" in fp8.fp8_unavailable_reason("cpu")
