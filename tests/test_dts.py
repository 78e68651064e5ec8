"""Dual-timestep scheduling + attention separation: token groups, per-token times, the student
input and the generative target at each pixel's time, attention really separated, the teacher's
view, the loss and its gradients."""
import math

import pytest
import torch
from torch import nn

from selfalign.ema import EMA
from selfalign.errors import ConfigError
from selfalign.objectives import DDPMObjective, FlowObjective
from selfalign.objectives.base import expand_time
from selfalign.objectives.flow import FlowConfig
from selfalign.regularizers import REGISTRY, StepContext
from selfalign.regularizers.dts import DTS, DTSConfig, split_tokens
from selfalign.training.step import TrainingStep


def prepared(model, config, objective=None, batch=3, seed=0):
    objective = objective or FlowObjective(FlowConfig(path="cosine"))   # velocity depends on t
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x0 = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = objective.sample_time(batch, "cpu", g)
    ctx = StepContext(model=model, objective=objective, x0=x0, noise=noise, t=t,
                      x_t=objective.interpolate(x0, noise, t), y=torch.arange(batch), generator=g)
    reg = DTS(config, model.config)
    reg.prepare(ctx)
    return reg, ctx, t


def test_split_tokens_exact_count_random_positions():
    g = torch.Generator().manual_seed(0)
    groups = split_tokens(5, 64, 0.25, "cpu", g)
    assert groups.shape == (5, 64) and (groups.sum(1) == 16).all()
    assert len({tuple(row.tolist()) for row in groups}) == 5            # different per image
    assert torch.equal(groups, split_tokens(5, 64, 0.25, "cpu", torch.Generator().manual_seed(0)))
    assert split_tokens(2, 16, 0.0, "cpu").sum() == 0 and split_tokens(2, 16, 1.0, "cpu").sum() == 32


def test_per_token_times_inputs_and_targets_are_consistent(tiny_model):
    model = tiny_model(input_size=8, in_channels=2)
    reg, ctx, t = prepared(model, DTSConfig(student_layer=2, teacher_layer=4))
    groups, t_first, t2 = reg._step
    assert torch.equal(t_first, t) and not torch.equal(t2, t)
    assert ctx.t.shape == (3, 16) and torch.equal(ctx.attn_groups, groups)
    assert torch.equal(ctx.t, torch.where(groups.bool(), t2[:, None], t[:, None]))
    # every patch of x_t is interpolated at its own token's time (checked in token space)
    obj, patch = ctx.objective, model.patchify
    tok_t = ctx.t[..., None]
    alpha, sigma, d_alpha, d_sigma = obj.coefficients(tok_t)
    assert torch.allclose(patch(ctx.x_t), alpha * patch(ctx.x0) + sigma * patch(ctx.noise), atol=1e-6)
    # the generative loss's target uses the per-pixel time: compare with a token-space reference
    out = torch.randn(ctx.x0.shape, generator=torch.Generator().manual_seed(5))
    target = d_alpha * patch(ctx.x0) + d_sigma * patch(ctx.noise)
    reference = ((patch(out) - target) ** 2).mean(dim=(1, 2))
    assert torch.allclose(obj.loss(out, ctx.x0, ctx.noise, ctx.t, ctx.x_t), reference, atol=1e-6)
    # and differs from a loss that (wrongly) used one time per image
    assert not torch.allclose(obj.loss(out, ctx.x0, ctx.noise, t, ctx.x_t), reference, atol=1e-3)


def test_expand_time_maps_tokens_to_their_patches():
    t = torch.arange(4.0).view(1, 4)                        # a 2x2 token grid, patch 3
    pixels = expand_time(t, torch.zeros(1, 5, 6, 6))
    assert pixels.shape == (1, 1, 6, 6)
    assert pixels[0, 0, 0, 0] == 0 and pixels[0, 0, 2, 5] == 1
    assert pixels[0, 0, 5, 0] == 2 and pixels[0, 0, 5, 5] == 3
    assert expand_time(torch.ones(2), torch.zeros(2, 1, 4, 4)).shape == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="does not tile"):
        expand_time(torch.ones(1, 5), torch.zeros(1, 1, 4, 4))


def test_options_single_time_and_no_separation(tiny_model):
    model = tiny_model(input_size=8, in_channels=2)
    _, ctx, t = prepared(model, DTSConfig(student_layer=2, teacher_layer=4, dual_timestep=False,
                                          attention_separation=False))
    assert ctx.attn_groups is None and torch.equal(ctx.t, t[:, None].expand(-1, 16))
    with pytest.raises(ConfigError, match=r"^regularizers.dts needs objective.kind=flow"):
        prepared(model, DTSConfig(student_layer=2, teacher_layer=4), objective=DDPMObjective())
    reg, ctx, _ = prepared(model, DTSConfig(student_layer=2, teacher_layer=4))
    with pytest.raises(ConfigError, match="per-token times already set: use one token-time regularizer"):
        reg.prepare(ctx)                                  # a second token-time regularizer


def test_attention_separation_blocks_attention_between_groups(tiny_model):
    model = tiny_model(input_size=8, in_channels=2).eval()
    reg, ctx, _ = prepared(model, DTSConfig(student_layer=2, teacher_layer=4), batch=2)
    groups = ctx.attn_groups
    # perturb only the pixels of group-1 tokens
    mask = expand_time(groups.float(), ctx.x_t)
    perturbed = ctx.x_t + mask * torch.randn(ctx.x_t.shape, generator=torch.Generator().manual_seed(9))
    keep = ~groups.bool()

    def run(x, attn_groups):
        with torch.no_grad():
            out, feats = model(x, ctx.t, ctx.y, taps=[model.depth], attn_groups=attn_groups)
        return model.patchify(out), feats[model.depth]

    for attn_groups, separated in ((groups, True), (None, False)):
        (out_a, feat_a), (out_b, feat_b) = run(ctx.x_t, attn_groups), run(perturbed, attn_groups)
        same = torch.allclose(feat_a[keep], feat_b[keep], atol=1e-5) and \
            torch.allclose(out_a[keep], out_b[keep], atol=1e-5)
        assert same == separated
        assert not torch.allclose(feat_a[~keep], feat_b[~keep], atol=1e-5)


class SpyTeacher(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, y, **kw):
        self.calls.append((x, t, kw.get("attn_groups")))
        return self.model(x, t, y, **kw)


def test_teacher_sees_whole_image_at_the_lower_noise_with_full_attention(tiny_model):
    model = tiny_model(input_size=8, in_channels=2)
    reg, ctx, _ = prepared(model, DTSConfig(student_layer=2, teacher_layer=4))
    groups, t, t2 = reg._step
    ctx.teacher = SpyTeacher(EMA(model).model)
    _, ctx.features = model(ctx.x_t, ctx.t, ctx.y, taps=[2], attn_groups=ctx.attn_groups)
    reg(ctx)
    x, time, attn = ctx.teacher.calls[0]
    assert attn is None and torch.equal(time, torch.minimum(t, t2))
    assert torch.allclose(x, ctx.objective.interpolate(ctx.x0, ctx.noise, torch.minimum(t, t2)))


def test_teacher_per_group_with_mask_and_earlier_time(tiny_model):
    model = tiny_model(input_size=8, in_channels=2)
    config = DTSConfig(student_layer=2, teacher_layer=4, teacher_time="per_group", teacher_k_max=0.2,
                       teacher_attention_separation=True)
    reg, ctx, _ = prepared(model, config)
    groups = reg._step[0]
    ctx.teacher = SpyTeacher(EMA(model).model)
    _, ctx.features = model(ctx.x_t, ctx.t, ctx.y, taps=[2], attn_groups=ctx.attn_groups)
    reg(ctx)
    _, time, attn = ctx.teacher.calls[0]
    assert torch.equal(attn, groups) and time.shape == (3, 16)
    earlier = ctx.t - time
    assert (earlier >= 0).all() and (earlier < 0.2 + 1e-6).all() and (earlier > 0).any()
    for row, g in zip(time, groups):                      # one time per group per image
        assert len(set(row[g == 0].tolist())) == 1 and len(set(row[g == 1].tolist())) == 1


def test_cosine_loss_on_hand_made_features(tiny_model):
    model = tiny_model(input_size=4, in_channels=1)       # 4 tokens
    reg, ctx, _ = prepared(model, DTSConfig(student_layer=1, teacher_layer=1), batch=1)
    reg.head = nn.Identity()
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    reg.teacher_features = lambda ctx: target
    ctx.teacher = object()
    ctx.features = {1: torch.tensor([[[2.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]])}
    # 1 - cos per token: 0, 1, 0, 2
    assert reg(ctx).item() == pytest.approx(0.75, abs=1e-6)
    with pytest.raises(RuntimeError, match="without dts.prepare"):
        reg(ctx)


def test_training_step_gradients_and_frozen_teacher(tiny_model):
    model = tiny_model(input_size=8, in_channels=2)
    ema = EMA(model)
    reg = REGISTRY["dts"].regularizer(DTSConfig(student_layer=2, teacher_layer=4), model.config)
    step = TrainingStep(model, FlowObjective(), {"dts": reg})
    total, terms = step(torch.randn(3, 2, 8, 8), torch.arange(3), teacher=ema.model,
                        generator=torch.Generator().manual_seed(0))
    assert math.isfinite(terms["gen"].item()) and math.isfinite(terms["dts"].item())
    terms["dts"].backward()
    upstream = ("x_embedder", "t_embedder", "y_embedder", "blocks.0.", "blocks.1.")
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == name.startswith(upstream), name
    assert all(p.grad is not None for p in reg.head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in ema.model.parameters())
    assert not {id(p) for p in ema.model.parameters()} & {id(p) for p in step.parameters()}
