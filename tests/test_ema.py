"""EMA: exact copy at start, the update formula, foreach == loop, state_dict, never trained."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from selfalign.ema import EMA

pytestmark = pytest.mark.usefixtures("single_thread")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.register_buffer("count", torch.zeros(()))


def set_params(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_starts_as_exact_copy_and_is_independent(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8)
    ema = EMA(model)
    for (name, p), (ema_name, e) in zip(model.state_dict().items(), ema.model.state_dict().items()):
        assert name == ema_name and torch.equal(p, e)
        assert p.data_ptr() != e.data_ptr()
    set_params(model, 1.0)
    assert not torch.equal(ema.model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("foreach", [True, False])
def test_update_matches_formula_on_hand_values(foreach):
    model = Tiny()
    set_params(model, 1.0)
    ema = EMA(model, decay=0.9, foreach=foreach)
    set_params(model, 3.0)
    model.count.fill_(7.0)
    ema.update(model)
    # 0.9 * 1 + 0.1 * 3 = 1.2
    for e in ema.model.parameters():
        torch.testing.assert_close(e, torch.full_like(e, 1.2))
    assert ema.model.count.item() == 7.0          # buffers are copied
    ema.update(model)                             # 0.9 * 1.2 + 0.1 * 3 = 1.38
    torch.testing.assert_close(ema.model.a.bias, torch.full((2,), 1.38))
    ema.update(model, decay=0.5)                  # per-call decay: 0.5 * 1.38 + 0.5 * 3 = 2.19
    torch.testing.assert_close(ema.model.a.weight, torch.full((2, 2), 2.19))


def test_foreach_and_loop_agree(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8)
    fast, slow = EMA(model, decay=0.99, foreach=True), EMA(model, decay=0.99, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        fast.update(model)
        slow.update(model)
    for a, b in zip(fast.model.parameters(), slow.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_decay_zero_copies_and_decay_one_freezes():
    model = Tiny()
    set_params(model, 1.0)
    ema = EMA(model, decay=1.0)
    set_params(model, 5.0)
    ema.update(model)
    assert all(torch.all(e == 1.0) for e in ema.model.parameters())
    ema.update(model, decay=0.0)
    assert all(torch.all(e == 5.0) for e in ema.model.parameters())
    set_params(model, -2.0)
    ema.copy_from(model)
    assert all(torch.all(e == -2.0) for e in ema.model.parameters())


def test_state_dict_round_trip(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8)
    ema = EMA(model, decay=0.5)
    set_params(model, 0.25)
    ema.update(model)
    restored = EMA(tiny_model("SiT-T/2", input_size=8, seed=1), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    for a, b in zip(ema.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    assert all(k.startswith("model.") for k in ema.state_dict())


def test_ema_never_requires_grad_and_stays_in_eval(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8).train()
    ema = EMA(model)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in ema.parameters())
    ema.train()
    assert not ema.training and not ema.model.training
    ema.update(model)
    assert not any(p.requires_grad for p in ema.parameters())
    x = torch.randn(2, 2, 8, 8)
    out = ema(x, torch.rand(2), torch.tensor([0, 10]))
    assert not out.requires_grad


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan")])
def test_decay_out_of_range_rejected(decay):
    with pytest.raises(ValueError, match="decay"):
        EMA(Tiny(), decay=decay)
    ema = EMA(Tiny())
    with pytest.raises(ValueError, match="decay"):
        ema.update(Tiny(), decay=decay)


def test_mismatched_model_rejected():
    ema = EMA(Tiny())
    with pytest.raises(ValueError, match="different"):
        ema.update(nn.Linear(3, 3))
