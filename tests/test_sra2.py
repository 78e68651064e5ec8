"""SRA 2: the target is the patchified model input, smooth-L1 on hand-made tensors, gradients."""
import pytest
import torch
from torch import nn

from selfalign.objectives import FlowObjective
from selfalign.errors import ConfigError
from selfalign.regularizers import REGISTRY, StepContext
from selfalign.regularizers.sra2 import SRA2, SRA2Config
from selfalign.training.step import TrainingStep


def make_ctx(model, x0, feats):
    b = len(x0)
    return StepContext(model=model, objective=FlowObjective(), x0=x0, noise=torch.randn_like(x0),
                       t=torch.rand(b), x_t=x0, y=torch.zeros(b, dtype=torch.long), features=feats)


def test_target_is_the_patchified_input_with_smooth_l1(tiny_model):
    model = tiny_model(input_size=4, in_channels=2)           # p=2: 4 tokens of 2*2*2 = 8 values
    reg = SRA2(SRA2Config(layer=2), model.config)
    reg.head = nn.Identity()                                   # look at the loss alone
    x0 = torch.arange(32.0).view(1, 2, 4, 4)
    # token 0 is the top-left 2x2 patch, channels last within a pixel (the final layer's layout)
    patches = torch.tensor([[x0[0, c, i, j].item() for i in range(2) for j in range(2) for c in range(2)]])
    assert torch.equal(model.patchify(x0)[0, :1], patches)
    assert reg(make_ctx(model, x0, {2: model.patchify(x0)})).item() == 0.0
    # |d| = 0.01 < beta = 0.05: 0.5 d^2 / beta; |d| = 1: |d| - beta / 2
    assert reg(make_ctx(model, x0, {2: model.patchify(x0) + 0.01})).item() == pytest.approx(1e-3, rel=1e-4)
    assert reg(make_ctx(model, x0, {2: model.patchify(x0) - 1})).item() == pytest.approx(0.975, rel=1e-6)


def test_head_shape_presets_and_checks(tiny_model):
    model = tiny_model(input_size=8, in_channels=4)
    reg = REGISTRY["sra2"].regularizer(SRA2Config(layer=2), model.config)
    assert reg.head[0].in_features == 128 and reg.head[-1].out_features == 2 * 2 * 4
    assert not reg.needs_teacher() and not reg.needs_images() and reg.student_layers() == (2,)
    assert SRA2Config.for_model("SiT-XL/2").layer == 8 and SRA2Config.for_model("SiT-B/2").layer == 3
    with pytest.raises(ConfigError, match=r"^sra2.layer=9 must be a block in 1..6$"):
        SRA2Config(layer=9).validate(depth=6)


def test_gradients_reach_blocks_up_to_the_layer_and_the_head(tiny_model):
    model = tiny_model(in_channels=2)
    reg = SRA2(SRA2Config(layer=2, hidden_dim=32), model.config)
    step = TrainingStep(model, FlowObjective(), {"sra2": reg})
    _, terms = step(torch.randn(3, 2, 8, 8), torch.arange(3), generator=torch.Generator().manual_seed(0))
    terms["sra2"].backward()
    upstream = ("x_embedder", "t_embedder", "y_embedder", "blocks.0.", "blocks.1.")
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == name.startswith(upstream), name
    assert all(p.grad is not None for p in reg.head.parameters())
