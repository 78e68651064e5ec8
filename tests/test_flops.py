"""The analytic FLOP counter against the DiT paper's numbers and against torch's own counter."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from selfalign.models.flops import forward_flops, head_flops, sra_floor_ratio, training_step_flops
from selfalign.models import backbone_config, build_model
from selfalign.regularizers.sra import SRA, SRAConfig

# DiT paper, Table 1: Gflops (multiply-adds) of a forward at 256 px (32x32x4 latents).
PUBLISHED_GMACS = {"DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.64}


def counted_flops(fn) -> int:
    # The math backend decomposes attention into matmuls that FlopCounterMode counts on CPU.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_forward_matches_published_dit_gflops(name):
    gmacs = sum(forward_flops(backbone_config(name)).values()) / 2e9
    assert gmacs == pytest.approx(PUBLISHED_GMACS[name], rel=2e-3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("SiT-T/2", input_size=8, in_channels=3, num_classes=10)
    batch = 2
    inputs = (torch.randn(batch, 3, 8, 8), torch.rand(batch), torch.randint(0, 10, (batch,)))
    return model, inputs, batch


def test_forward_equals_torch_flop_counter(tiny):
    model, (x, t, y), batch = tiny
    assert counted_flops(lambda: model(x, t, y)) == batch * sum(forward_flops(model.config).values())


def test_truncated_teacher_forward_equals_counter(tiny):
    model, (x, t, y), batch = tiny
    expected = batch * sum(forward_flops(model.config, blocks=4, final=False).values())
    assert counted_flops(lambda: model(x, t, y, taps=[4], features_only=True)) == expected
    assert expected < batch * sum(forward_flops(model.config).values())


def test_per_token_time_counts_conditioning_per_token(tiny):
    model, (x, _, y), batch = tiny
    t = torch.rand(batch, model.config.num_tokens)
    expected = batch * sum(forward_flops(model.config, per_token_time=True).values())
    assert counted_flops(lambda: model(x, t, y)) == expected


def test_training_step_is_three_forwards(tiny):
    # The only matmul whose input gradient is skipped is the patch embedding's; within 1 %.
    model, (x, t, y), batch = tiny
    counted = counted_flops(lambda: model(x, t, y).square().mean().backward())
    assert counted == pytest.approx(batch * training_step_flops(model.config)["total"], rel=1e-2)


def test_sra_step_adds_teacher_and_head(tiny):
    model, (x, t, y), batch = tiny
    config = model.config
    vanilla = training_step_flops(config)
    sra = training_step_flops(config, teacher_layer=4, head=True)
    assert vanilla["teacher"] == vanilla["head"] == 0
    assert sra["teacher"] == sum(forward_flops(config, blocks=4, final=False).values())
    assert sra["head"] == 3 * head_flops(config)
    half = training_step_flops(config, teacher_layer=4, teacher_fraction=0.5)
    assert half["teacher"] == sra["teacher"] / 2 and half["head"] == sra["head"] / 2
    # the head's forward, counted by torch on the regularizer's own head
    head = SRA(SRAConfig(student_layer=2, teacher_layer=4), config).head
    tokens = torch.randn(batch, config.num_tokens, config.hidden_size)
    assert counted_flops(lambda: head(tokens)) == batch * head_flops(config)


def test_floor_ratio_of_sit_xl():
    # The estimate: SiT-XL/2 with its teacher at block 20 of 28 is about 1.24x vanilla.
    assert sra_floor_ratio(backbone_config("SiT-XL/2"), 20) == pytest.approx(1.24, abs=0.005)


def test_rejects_blocks_beyond_depth():
    with pytest.raises(ValueError, match="outside"):
        forward_flops(backbone_config("SiT-T/2"), blocks=7)
