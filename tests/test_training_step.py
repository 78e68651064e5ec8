"""TrainingStep: one student forward, every loss term, all randomness from the generator."""
from __future__ import annotations

import pytest
import torch

from selfalign.ema import EMA
from selfalign.models import drop_labels
from selfalign.objectives import FlowObjective
from selfalign.models.backbone import BackboneConfig
from selfalign.regularizers.base import Progress, Regularizer, RegularizerConfig
from selfalign.regularizers.sra import SRA, SRAConfig
from selfalign.training.step import TrainingStep

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 10


class Probe(Regularizer):
    """A regularizer that taps blocks, changes the student's input in prepare(), and records."""

    def __init__(self, layers=(1, 5), per_token=False):
        super().__init__(RegularizerConfig(), BackboneConfig())   # no settings of its own
        self.layers, self.per_token, self.seen = tuple(layers), per_token, []
        self.scale = torch.nn.Parameter(torch.ones(()))

    def student_layers(self):
        return self.layers

    def prepare(self, ctx):
        if self.per_token:   # dual-timestep style: one time per token, two attention groups
            b, n = ctx.x0.shape[0], ctx.model.config.num_tokens
            ctx.t = ctx.t[:, None].repeat(1, n)
            ctx.attn_groups = (torch.arange(n) % 2)[None].repeat(b, 1)

    def weight(self, progress):
        return 0.5 + progress.epoch

    def loss(self, ctx):
        self.seen.append(ctx)
        return self.scale * sum(ctx.features[m].square().mean() for m in self.layers)


def make_step(tiny_model, regularizers=None, label_dropout=0.1):
    model = tiny_model("SiT-T/2", input_size=8, in_channels=2, num_classes=NUM_CLASSES)
    return model, TrainingStep(model, FlowObjective(), regularizers or {}, label_dropout=label_dropout)


def record_student(model):
    calls = []
    def hook(mod, args, kwargs, out):
        calls.append((args, kwargs, out, torch.is_autocast_enabled("cpu")))
    model.register_forward_hook(hook, with_kwargs=True)
    return calls


def data(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


def test_one_student_forward_tapping_the_union_of_layers(tiny_model):
    probe = Probe(layers=(1, 5))
    model = tiny_model("SiT-T/2", input_size=8, in_channels=2, num_classes=NUM_CLASSES)
    sra = SRA(SRAConfig(student_layer=2, teacher_layer=4), model.config)
    step = TrainingStep(model, FlowObjective(), {"sra": sra, "probe": probe})
    ema = EMA(model)
    calls = record_student(model)
    x0, y = data()
    total, terms = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(0),
                        progress=Progress(images=2500, dataset_size=1000))
    assert len(calls) == 1
    assert calls[0][1]["taps"] == [1, 2, 5]
    assert set(terms) == {"gen", "sra", "probe"}
    expected = terms["gen"] + sra.weight(Progress()) * terms["sra"] + (0.5 + 2) * terms["probe"]
    torch.testing.assert_close(total, expected)
    assert probe.seen[0].model_output is calls[0][2][0]


def test_generative_loss_is_the_velocity_regression(tiny_model):
    model, step = make_step(tiny_model, label_dropout=0.0)
    objective = step.objective
    calls = record_student(model)
    x0, y = data()
    _, terms = step(x0, y, generator=torch.Generator().manual_seed(1))
    (x_t, t, labels), _, (out, _), _ = calls[0]
    assert torch.equal(labels, y)
    # recover the noise from x_t = (1 - t) x0 + t eps (linear path)
    noise = (x_t - (1 - t)[:, None, None, None] * x0) / t[:, None, None, None]
    expected = ((out - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(terms["gen"], expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(objective.model_time(t), t)


def test_same_generator_seed_same_loss_and_no_global_rng_use(tiny_model):
    sra = SRA(SRAConfig(student_layer=2, teacher_layer=4), BackboneConfig(hidden_size=128, depth=6))
    model, step = make_step(tiny_model, {"sra": sra})
    ema = EMA(model)
    x0, y = data()
    state = torch.get_rng_state()
    a, _ = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state), "a step drew from the global RNG"
    b, _ = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(7))
    c, _ = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(8))
    assert a.item() == b.item() and a.item() != c.item()


def test_labels_dropped_to_the_null_class_at_rate_p():
    y = torch.randint(0, NUM_CLASSES, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, 0.1, NUM_CLASSES, torch.Generator().manual_seed(1))
    is_null = dropped == NUM_CLASSES
    assert 0.09 < is_null.float().mean().item() < 0.11
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(drop_labels(y, 0.0, NUM_CLASSES), y)
    assert (drop_labels(y, 1.0, NUM_CLASSES) == NUM_CLASSES).all()


@pytest.mark.parametrize("p,expect_null", [(0.0, False), (1.0, True)])
def test_step_drops_labels_before_the_forward(tiny_model, p, expect_null):
    model, step = make_step(tiny_model, label_dropout=p)
    calls = record_student(model)
    x0, y = data()
    step(x0, y, generator=torch.Generator().manual_seed(0))
    labels = calls[0][0][2]
    assert torch.equal(labels, torch.full_like(y, NUM_CLASSES) if expect_null else y)


def test_prepare_can_change_time_and_attention_groups(tiny_model):
    probe = Probe(layers=(3,), per_token=True)
    model, step = make_step(tiny_model, {"probe": probe})
    calls = record_student(model)
    x0, y = data()
    _, terms = step(x0, y, generator=torch.Generator().manual_seed(0))
    (_, t, _), kwargs, _, _ = calls[0]
    assert t.shape == (6, 16)
    assert torch.equal(kwargs["attn_groups"], probe.seen[0].attn_groups)
    assert torch.isfinite(terms["gen"]) and torch.isfinite(terms["probe"])


def test_autocast_student_forward_fp32_losses(tiny_model):
    model, step = make_step(tiny_model, {"probe": Probe(layers=(2,))})
    calls = record_student(model)
    x0, y = data()
    total, terms = step(x0, y, generator=torch.Generator().manual_seed(0),
                        autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert calls[0][3]
    assert terms["gen"].dtype == torch.float32 and total.dtype == torch.float32
    total.backward()
    assert model.x_embedder.proj.weight.grad is not None


def test_no_regularizer_is_plain_training(tiny_model):
    model, step = make_step(tiny_model)
    total, terms = step(*data(), generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"gen"} and total is terms["gen"]
    assert step.student_layers() == []
