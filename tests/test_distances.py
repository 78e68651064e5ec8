"""Each distance equals its formula on hand-made (B, N, D) tensors."""
from __future__ import annotations

import math

import pytest
import torch

from selfalign.regularizers.distances import DISTANCES, SMOOTH_L1_BETA, get_distance

# B=1, N=2 tokens, D=2 channels
PRED = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
TARGET = torch.tensor([[[1.0, 0.02], [3.0, 2.0]]])


def test_smooth_l1_uses_the_papers_beta_and_formula():
    assert SMOOTH_L1_BETA == 0.05
    # |d| = 0, 0.02, 3, 0: quadratic 0.5 d^2 / beta below beta, |d| - beta / 2 above.
    per_element = [0.0, 0.5 * 0.02 ** 2 / 0.05, 3.0 - 0.025, 0.0]
    assert get_distance("smooth_l1")(PRED, TARGET).item() == pytest.approx(sum(per_element) / 4)


def test_l1_and_l2():
    assert get_distance("l1")(PRED, TARGET).item() == pytest.approx((0.02 + 3.0) / 4)
    assert get_distance("l2")(PRED, TARGET).item() == pytest.approx((0.02 ** 2 + 9.0) / 4)


def test_cosine_is_per_token_over_channels():
    pred = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    target = torch.tensor([[[0.0, 2.0], [3.0, 3.0]]])   # token 0: orthogonal, token 1: parallel
    assert get_distance("cosine")(pred, target).item() == pytest.approx(((1 - 0) + (1 - 1)) / 2)
    assert get_distance("negative_cosine")(pred, target).item() == pytest.approx(-(0 + 1) / 2)


def test_channel_cosine_is_across_tokens_per_channel():
    pred = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    target = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    # channel 0: (1, 0) vs (0, 1) -> cos 0; channel 1: (1, 1) vs (1, 1) -> cos 1
    assert get_distance("channel_cosine")(pred, target).item() == pytest.approx(((1 - 0) + (1 - 1)) / 2)
    # per token: token 0 (1,1).(0,1) -> 1/sqrt2; token 1 (0,1).(1,1) -> 1/sqrt2
    assert get_distance("cosine")(pred, target).item() == pytest.approx(1 - 1 / math.sqrt(2))


def test_cosine_and_channel_cosine_differ_and_scale_differently():
    # Scaling one token of the target leaves the per-token cosine unchanged but not the
    # released code's channel cosine: the two readings are different losses.
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 5, 3, generator=g)
    scaled = pred.clone()
    scaled[:, 0] *= 10.0
    cos, ccos = get_distance("cosine"), get_distance("channel_cosine")
    assert cos(pred, scaled).item() == pytest.approx(0.0, abs=1e-6)
    assert ccos(pred, scaled).item() > 0.05


def test_zero_distance_at_equality_and_gradients_flow():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, generator=g)
    for name, fn in DISTANCES.items():
        pred = x.clone().requires_grad_(True)
        value = fn(pred, x)
        expected = -1.0 if name == "negative_cosine" else 0.0
        assert value.dim() == 0 and value.item() == pytest.approx(expected, abs=1e-6), name
        fn(pred, x + 0.3).backward()
        assert pred.grad is not None and torch.isfinite(pred.grad).all(), name


def test_unknown_distance_names_the_choices():
    with pytest.raises(ValueError, match="smooth_l1"):
        get_distance("cos")
