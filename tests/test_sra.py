"""SRA to the letter of SPEC section 2: what the teacher sees, where gradients go, the schedule."""
from __future__ import annotations

import math

import pytest
import torch

from selfalign.ema import EMA
from selfalign.errors import ConfigError
from selfalign.objectives import FlowObjective
from selfalign.models.backbone import BackboneConfig
from selfalign.regularizers import REGISTRY, build_regularizer
from selfalign.regularizers.base import Progress, StepContext
from selfalign.regularizers.distances import get_distance
from selfalign.regularizers.sra import SRA, SRAConfig
from selfalign.training.step import TrainingStep

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_CLASSES = 10
M, N = 2, 4   # student / teacher blocks of the depth-6 tiny model
SMALL = BackboneConfig(hidden_size=64, depth=6)


class RecordingFlow(FlowObjective):
    """The flow objective, remembering every interpolate() and earlier_time() call."""

    def __init__(self):
        super().__init__()
        self.interpolations, self.earlier = [], []

    def interpolate(self, x0, noise, t):
        out = super().interpolate(x0, noise, t)
        self.interpolations.append((x0.clone(), noise.clone(), t.clone(), out.clone()))
        return out

    def earlier_time(self, t, k_max, generator=None):
        out = super().earlier_time(t, k_max, generator)
        self.earlier.append((t.clone(), k_max, out.clone()))
        return out


def record_calls(module, log):
    """Record (args, kwargs, autocast on, grad on) of every forward call of ``module``."""
    def hook(mod, args, kwargs):
        log.append((args, kwargs, torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture
def setup(tiny_model):
    def make(label_dropout=0.5, **sra_overrides):
        model = tiny_model("SiT-T/2", input_size=8, in_channels=2, num_classes=NUM_CLASSES)
        ema = EMA(model, decay=0.9)
        with torch.no_grad():   # a teacher that differs from the student, as after training
            for p in ema.model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        sra = SRA(SRAConfig(**{"student_layer": M, "teacher_layer": N, **sra_overrides}), model.config)
        objective = RecordingFlow()
        step = TrainingStep(model, objective, {"sra": sra}, label_dropout=label_dropout)
        return model, ema, sra, objective, step
    return make


def batch(size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 2, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (size,), generator=g)


def test_teacher_sees_same_data_noise_labels_at_an_earlier_time(setup):
    model, ema, sra, objective, step = setup()
    student_calls, teacher_calls = [], []
    record_calls(model, student_calls)
    record_calls(ema.model, teacher_calls)
    x0, y = batch()
    step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(3))

    assert len(student_calls) == 1 and len(teacher_calls) == 1
    (s_x0, s_noise, t, x_t), (t_x0, t_noise, t_prime, x_teacher) = objective.interpolations
    assert torch.equal(s_x0, x0) and torch.equal(t_x0, x0)
    assert torch.equal(t_noise, s_noise)
    # the teacher's input is the interpolant at t' of the same data and noise
    (tx, tt, ty), t_kwargs, _, t_grad = teacher_calls[0]
    torch.testing.assert_close(tx, objective.interpolate(x0, s_noise, t_prime), rtol=0, atol=0)
    assert torch.equal(tt, objective.model_time(t_prime))
    # t' = clamp(t - k, 0, 1), k in [0, k_max): per example, not all equal
    k = t - t_prime
    assert torch.all(k >= 0) and torch.all(k < 0.2 + 1e-7) and torch.all(t_prime >= 0)
    assert len(set(k.tolist())) > 1
    assert objective.earlier[0][1] == 0.2 and torch.equal(objective.earlier[0][0], t)
    # the same dropped labels, some of them the null class
    (_, _, sy), _, _, _ = student_calls[0]
    assert torch.equal(ty, sy)
    assert (sy == NUM_CLASSES).any() and (sy != NUM_CLASSES).any()
    assert torch.equal(sy[sy != NUM_CLASSES], y[sy != NUM_CLASSES])
    # truncated teacher at block n, without gradients
    assert t_kwargs["taps"] == [N] and t_kwargs["features_only"] is True
    assert not t_grad


def test_loss_equals_distance_of_head_and_raw_teacher_block(setup):
    model, ema, sra, objective, step = setup()
    student_taps, head_inputs, student_calls = [], [], []
    record_calls(model, student_calls)
    model.blocks[M - 1].register_forward_hook(lambda m, a, o: student_taps.append(o))
    sra.head.register_forward_hook(lambda m, a, o: head_inputs.append(a[0]))
    x0, y = batch()
    total, terms = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(3))
    assert set(terms) == {"gen", "sra"}
    torch.testing.assert_close(total, terms["gen"] + 0.2 * terms["sra"])
    # the head runs once, on the student's block m tokens only
    assert len(head_inputs) == 1 and torch.equal(head_inputs[0], student_taps[0])
    _, noise, _, _ = objective.interpolations[0]
    t_prime = objective.earlier[0][2]
    labels = student_calls[0][0][2]
    with torch.no_grad():
        _, feats = ema.model(objective.interpolate(x0, noise, t_prime), t_prime, labels, taps=[N])
        expected = get_distance("smooth_l1")(sra.head(student_taps[0]), feats[N])
    torch.testing.assert_close(terms["sra"], expected)


def test_gradients_reach_student_and_head_never_the_teacher(setup):
    model, ema, sra, objective, step = setup()
    x0, y = batch()
    _, terms = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(0))
    terms["sra"].backward()
    for name, p in model.named_parameters():
        block = int(name.split(".")[1]) + 1 if name.startswith("blocks.") else None
        if block is not None and block > M or name.startswith("final_layer"):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name   # after block m
    for i in range(M):
        assert torch.count_nonzero(model.blocks[i].attn.qkv.weight.grad) > 0
    assert torch.count_nonzero(model.x_embedder.proj.weight.grad) > 0
    assert all(torch.count_nonzero(p.grad) > 0 for p in sra.head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in ema.parameters())


def test_teacher_unchanged_by_an_optimizer_step_and_has_no_head(setup):
    model, ema, sra, objective, step = setup()
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_ids = {id(p) for p in ema.parameters()}
    assert not ema_ids & {id(p) for p in step.parameters()}
    assert not any("head" in k for k in ema.state_dict())
    x0, y = batch()
    total, _ = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(0))
    total.backward()
    with torch.no_grad():   # a plain gradient step on everything the trainer optimises
        for p in step.parameters():
            if p.grad is not None:
                p.sub_(p.grad)
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())


@pytest.mark.parametrize("truncate,expected", [(True, [0, 1, 2, 3]), (False, [0, 1, 2, 3, 4, 5, "final"])])
def test_teacher_forward_stops_after_block_n(setup, truncate, expected):
    model, ema, sra, objective, step = setup(teacher_truncate=truncate)
    calls = []
    for i, block in enumerate(ema.model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    ema.model.final_layer.register_forward_hook(lambda m, a, o: calls.append("final"))
    x0, y = batch()
    _, terms = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(0))
    assert calls == expected
    # truncation does not change the target
    _, full = setup(teacher_truncate=not truncate)[4](x0, y, teacher=ema.model,
                                                       generator=torch.Generator().manual_seed(0))
    assert terms["sra"].item() == pytest.approx(full["sra"].item(), rel=1e-5)


@pytest.mark.parametrize("precision,teacher_autocast", [("autocast", True), ("fp32", False)])
def test_teacher_precision(setup, precision, teacher_autocast):
    model, ema, sra, objective, step = setup(teacher_precision=precision)
    student_calls, teacher_calls, head_calls = [], [], []
    record_calls(model, student_calls)
    record_calls(ema.model, teacher_calls)
    record_calls(sra.head, head_calls)
    x0, y = batch()
    _, terms = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(0),
                    autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert student_calls[0][2] and head_calls[0][2]          # the student runs under autocast
    assert teacher_calls[0][2] is teacher_autocast
    assert torch.isfinite(terms["sra"]) and terms["sra"].dtype == torch.float32


def test_teacher_fraction_uses_the_first_examples(setup):
    model, ema, sra, objective, step = setup(teacher_fraction=0.5)
    teacher_calls, head_outputs = [], []
    record_calls(ema.model, teacher_calls)
    x0, y = batch(size=5)
    _, terms = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(0))
    (tx, tt, ty), _, _, _ = teacher_calls[0]
    assert tx.shape[0] == ty.shape[0] == tt.shape[0] == math.ceil(0.5 * 5) == 3
    _, noise, t, _ = objective.interpolations[0]
    torch.testing.assert_close(tx, objective.interpolate(x0[:3], noise[:3], objective.earlier[0][2]),
                               rtol=0, atol=0)
    assert torch.equal(objective.earlier[0][0], t[:3])


def test_sra_step_is_deterministic_given_the_generator(setup):
    _, ema, _, _, step = setup()
    x0, y = batch()
    a = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(5))[1]
    b = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(5))[1]
    c = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(6))[1]
    assert a["sra"].item() == b["sra"].item() and a["gen"].item() == b["gen"].item()
    assert a["sra"].item() != c["sra"].item()


def test_missing_teacher_is_an_error(setup):
    *_, step = setup()
    with pytest.raises(RuntimeError, match="teacher"):
        step(*batch(), teacher=None)


def test_no_head_ablation_aligns_raw_student_tokens(setup):
    model, ema, sra, *_ = setup(head=False)
    assert not list(sra.parameters())


# -- weight schedule --------------------------------------------------------------------------
def lam(epoch, **overrides):
    sra = SRA(SRAConfig(student_layer=2, teacher_layer=4, weight_schedule="official_decay", **overrides), SMALL)
    return sra.weight(Progress(images=epoch * 1000 + 999, dataset_size=1000))


def test_official_decay_schedule_values():
    assert lam(0) == 0.2 and lam(149) == 0.2
    assert lam(1149) == pytest.approx(0.2 * 0.1)
    assert lam(649) == pytest.approx(2 * 0.1 ** (1 + 500 / 1000))   # the released formula
    assert lam(150) == pytest.approx(2 * 0.1 ** (1 + 1 / 1000)) and lam(150) < 0.2
    # 512 px: after epoch 99 with period 800; DiT: base 0.04
    assert lam(899, decay_start_epoch=99, decay_period=800) == pytest.approx(0.02)
    assert lam(1149, weight=0.04) == pytest.approx(0.004)


def test_constant_weight_ignores_the_epoch():
    sra = SRA(SRAConfig(student_layer=2, teacher_layer=4, weight=0.3), SMALL)
    assert sra.weight(Progress(images=10 ** 9, dataset_size=1000)) == 0.3
    assert Progress(images=5, dataset_size=0).epoch == 0


# -- presets and validation -------------------------------------------------------------------
SPEC_TABLE = {"SiT-B/2": (3, 8), "SiT-L/2": (6, 16), "SiT-XL/2": (8, 20),
              "DiT-B/2": (3, 7), "DiT-L/2": (6, 14), "DiT-XL/2": (8, 16)}


@pytest.mark.parametrize("preset", sorted(SPEC_TABLE))
def test_for_model_matches_spec_table(preset):
    config = SRAConfig.for_model(preset)
    assert (config.student_layer, config.teacher_layer) == SPEC_TABLE[preset]
    assert config.k_max == 0.2 and config.distance == "smooth_l1" and config.weight == 0.2
    assert SRAConfig.for_model(preset.split("/")[0]) == config
    config.validate(depth={"B": 12, "L": 24, "XL": 28}[preset.split("-")[1][:-2]])


def test_for_model_overrides_and_unknown():
    assert SRAConfig.for_model("SiT-B/2", distance="channel_cosine").distance == "channel_cosine"
    with pytest.raises(ValueError, match="SRA layer preset"):
        SRAConfig.for_model("REPA-B/2")


@pytest.mark.parametrize("overrides,message", [
    ({"student_layer": 9, "teacher_layer": 8}, "sra.student_layer=9 is deeper than sra.teacher_layer=8 (need m <= n)"),
    ({"student_layer": 3, "teacher_layer": 13}, "sra.teacher_layer=13 is beyond the model depth 12"),
    ({"student_layer": 0}, "sra.student_layer must be >= 1, got 0"),
    ({"k_max": 1.5}, "sra.k_max must be in [0, 1], got 1.5"),
    ({"k_max": -0.1}, "sra.k_max must be in [0, 1], got -0.1"),
    ({"distance": "cos"}, "sra.distance: expected one of 'smooth_l1', 'cosine', 'channel_cosine', "
                          "'negative_cosine', 'l1', 'l2', got 'cos'"),
    ({"weight": -1.0}, "sra.weight must be >= 0, got -1.0"),
    ({"weight_schedule": "cosine"}, "sra.weight_schedule: expected one of 'constant', 'official_decay', got 'cosine'"),
    ({"teacher_precision": "fp16"}, "sra.teacher_precision: expected one of 'autocast', 'fp32', 'fp8', got 'fp16'"),
    ({"teacher_fraction": 0.0}, "sra.teacher_fraction must be in (0, 1], got 0.0"),
    ({"decay_period": 0.0}, "sra.decay_period must be > 0, got 0.0"),
])
def test_validation_errors(overrides, message):
    # built in Python, not loaded: the constructor's validate() still checks ranges and choices
    config = SRAConfig(**{"student_layer": 3, "teacher_layer": 8, **overrides})
    with pytest.raises(ConfigError) as err:
        SRA(config, BackboneConfig(hidden_size=64, depth=12))
    assert str(err.value) == message


def test_registry_builds_sra_for_a_model(tiny_model):
    model = tiny_model("SiT-T/2", input_size=8)
    config_class, _ = REGISTRY["sra"]
    sra = build_regularizer("sra", config_class(student_layer=2, teacher_layer=4), model.config)
    assert isinstance(sra, SRA) and sra.student_layers() == (2,) and sra.needs_teacher()
    assert sra.head[0].in_features == 128 and sra.head[0].out_features == 256
    with pytest.raises(ValueError, match="depth"):
        build_regularizer("sra", config_class(student_layer=2, teacher_layer=7), model.config)
    with pytest.raises(ConfigError, match="unknown regularizer"):
        build_regularizer("nope", None, model.config)


def test_sra_reads_only_the_context(tiny_model):
    # A StepContext built by hand (as another trainer would) is enough for SRA.
    model = tiny_model("SiT-T/2", input_size=8)
    ema = EMA(model)
    sra = SRA(SRAConfig(student_layer=2, teacher_layer=2, k_max=0.0, head=False, distance="l2"), model.config)
    x0, y = torch.randn(3, 2, 8, 8), torch.tensor([1, 2, 10])
    noise, t, objective = torch.randn_like(x0), torch.rand(3), FlowObjective()
    x_t = objective.interpolate(x0, noise, t)
    _, feats = model(x_t, t, y, taps=[2])
    ctx = StepContext(model=model, objective=objective, x0=x0, noise=noise, t=t, x_t=x_t, y=y,
                      teacher=ema.model, features=feats)
    # k_max = 0, the teacher an exact copy, no head: the distance is exactly zero (3->3 ablation)
    assert sra.loss(ctx).item() == pytest.approx(0.0, abs=1e-10)


def test_dit_teacher_gets_discrete_earlier_steps_of_the_same_noise(tiny_model):
    from selfalign.objectives import DDPMObjective

    class RecordingDDPM(DDPMObjective):
        def __init__(self):
            super().__init__()
            self.interpolations = []

        def interpolate(self, x0, noise, t):
            self.interpolations.append((noise.clone(), t.clone()))
            return super().interpolate(x0, noise, t)

    model = tiny_model("DiT-T/2", input_size=8, in_channels=2, num_classes=NUM_CLASSES)
    ema = EMA(model)
    objective = RecordingDDPM()
    sra = SRA(SRAConfig.for_model("DiT-T/2"), model.config)
    step = TrainingStep(model, objective, {"sra": sra})
    teacher_calls = []
    record_calls(ema.model, teacher_calls)
    x0 = torch.randn(64, 2, 8, 8)
    y = torch.randint(0, NUM_CLASSES, (64,))
    _, terms = step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(0))
    (noise, t), (t_noise, t_prime) = objective.interpolations
    assert torch.equal(noise, t_noise) and t_prime.dtype == torch.long
    k = t - t_prime
    assert torch.all((k >= 0) & (k < 200) | (t_prime == 1))   # clamp(t - randint(0, 200), 1, 999)
    assert torch.all((t_prime >= 1) & (t_prime <= 999)) and len(set(k.tolist())) > 5
    (tx, tt, _), _, _, _ = teacher_calls[0]
    torch.testing.assert_close(tx, objective.interpolate(x0, noise, t_prime), rtol=0, atol=0)
    assert torch.equal(tt, t_prime.float())
    assert torch.isfinite(terms["sra"])


def test_fp8_teacher_is_a_view_of_the_ema_and_gives_nearly_the_same_loss(setup):
    model, ema, sra, objective, step = setup(teacher_precision="fp8")
    teacher = sra.adapt_teacher(ema.model)
    assert teacher is not ema.model
    assert all(a is b for a, b in zip(teacher.parameters(), ema.model.parameters()))
    plain = setup(teacher_precision="autocast")
    assert plain[2].adapt_teacher(plain[1].model) is plain[1].model    # the others run the EMA itself
    x0, y = batch()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    _, fp8_terms = step(x0, y, teacher=teacher, generator=torch.Generator().manual_seed(0), autocast=autocast)
    _, ref_terms = plain[4](x0, y, teacher=plain[1].model, generator=torch.Generator().manual_seed(0),
                            autocast=autocast)
    assert fp8_terms["sra"].item() == pytest.approx(ref_terms["sra"].item(), rel=0.05)
    assert fp8_terms["sra"].item() != ref_terms["sra"].item()
    with pytest.raises(RuntimeError, match="adapt_teacher"):     # the EMA itself would silently be bf16
        step(x0, y, teacher=ema.model, generator=torch.Generator().manual_seed(0), autocast=autocast)


def test_fp8_teacher_on_a_device_without_fp8_is_a_one_line_error(setup, monkeypatch):
    import selfalign.regularizers.sra as sra_module
    model, ema, sra, objective, step = setup(teacher_precision="fp8")
    monkeypatch.setattr(sra_module, "fp8_unavailable_reason",
                        lambda device: "Tesla V100 has compute capability 7.0; fp8 matmuls need 8.9 or newer")
    with pytest.raises(ValueError, match=r"^sra.teacher_precision=fp8: Tesla V100 .*use sra.teacher_precision=autocast$"):
        sra.adapt_teacher(ema.model)
