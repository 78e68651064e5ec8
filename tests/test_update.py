"""The optimizer update the trainer and the training-step benchmark share, against a hand-written
reference (clip, AdamW, EMA), and its refusals: a non-finite loss or gradient changes nothing,
an fp16 overflow is the scaler's business. Gradient accumulation over micro-batches gives the
gradients and loss terms of the whole batch."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from selfalign.ema import EMA
from selfalign.training.step import accumulate_gradients
from selfalign.training.update import OptimizerUpdate, adamw, adamw_kernel

LR, BETAS, EPS, WD, CLIP, DECAY = 0.01, (0.9, 0.99), 1e-8, 0.1, 0.5, 0.9


def setup(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    ema = EMA(model, DECAY)
    optimizer = adamw(list(model.parameters()), torch.device("cpu"), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    return model, ema, OptimizerUpdate(optimizer, ema, model, grad_clip=CLIP, **kw)


def loss_of(model, scale: float = 1.0) -> torch.Tensor:
    x = torch.linspace(-1, 1, 15).reshape(5, 3) * scale
    return model(x).pow(2).mean()


def snapshot(model, ema):
    return [p.detach().clone() for p in (*model.parameters(), *ema.model.parameters())]


def test_an_applied_update_clips_steps_adamw_and_moves_the_ema():
    model, ema, update = setup()
    before = [p.detach().clone() for p in model.parameters()]
    loss = loss_of(model, scale=30.0)            # large enough that clipping acts
    update.backward(loss)
    grads = [p.grad.clone() for p in model.parameters()]
    result = update(loss.detach())

    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    assert norm > CLIP and result.applied and result.nonfinite is None and not result.stop
    assert result.grad_norm.item() == pytest.approx(norm, rel=1e-5)
    coef = CLIP / (norm + 1e-6)
    for p, p0, g, e in zip(model.parameters(), before, grads, ema.model.parameters()):
        g = g * coef                                 # AdamW's first step, written out
        m_hat, v_hat = g, g * g                      # bias-corrected moments after one step
        expected = p0 * (1 - LR * WD) - LR * m_hat / (v_hat.sqrt() + EPS)
        assert torch.allclose(p, expected, atol=1e-6)
        assert torch.allclose(e, DECAY * p0 + (1 - DECAY) * expected, atol=1e-6)
        assert p.grad is None                       # cleared for the next step


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_a_non_finite_step_changes_nothing_and_says_which_check_refused_it(what):
    model, ema, update = setup()
    before = snapshot(model, ema)
    loss = loss_of(model)
    if what == "gradient norm":                     # a finite loss whose gradient is not
        model[0].weight.register_hook(lambda g: g * float("inf"))
    update.backward(loss)
    result = update(torch.tensor(float("nan")) if what == "loss" else loss.detach())
    assert not result.applied and result.nonfinite == what
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model, ema)))
    assert not update.optimizer.state                 # AdamW never stepped
    assert all(p.grad is None for p in model.parameters())


def test_a_stop_request_is_returned_with_the_step():
    model, ema, update = setup()
    update.backward(loss_of(model))
    assert update(loss_of(model).detach(), stop=True).stop
    update.backward(loss_of(model))
    assert not update(loss_of(model).detach()).stop


def test_an_fp16_overflow_lowers_the_scale_and_is_not_a_bad_step():
    model, ema, update = setup(scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    before = snapshot(model, ema)
    model[0].weight.register_hook(lambda g: g * float("inf"))
    loss = loss_of(model)
    update.backward(loss)
    result = update(loss.detach())
    assert not result.applied and result.nonfinite is None        # the scaler skips it, no count
    assert update.scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model, ema)))


def test_the_trainer_kernel_is_fused_on_cuda_and_foreach_elsewhere():
    assert adamw_kernel(torch.device("cuda", 0)) == "fused"
    assert adamw_kernel(torch.device("cpu")) == "foreach"
    _, _, update = setup()
    assert update.optimizer.defaults["foreach"] is True


class Quadratic(nn.Module):
    """``(w . x - y)^2`` per example; records the images each call received."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        self.calls = []

    def forward(self, x, y, images=None, scale=1.0):
        self.calls.append(images)
        per_example = (x @ self.w - y).pow(2) * scale
        return per_example.mean(), {"abs": (x @ self.w).abs().mean()}


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_micro_batches_give_the_whole_batch_gradients_and_terms(micro):
    x, y = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), torch.arange(5.0)
    whole = Quadratic()
    total, parts = whole(x, y, scale=2.0)
    total.backward()

    module, synced = Quadratic(), []

    @contextlib.contextmanager
    def no_sync():
        synced.append(False)
        yield

    terms = accumulate_gradients(module, x, y, micro, lambda loss: loss.backward(), images=x + 1,
                                 no_sync=no_sync, scale=2.0)
    assert torch.allclose(module.w.grad, whole.w.grad, atol=1e-6)
    assert terms["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    assert terms["abs"].item() == pytest.approx(parts["abs"].item(), rel=1e-6)
    chunks = math.ceil(5 / micro)
    assert len(synced) == chunks - 1                   # every micro-batch but the last skips the all-reduce
    assert torch.equal(torch.cat(module.calls), x + 1)   # images split like the batch
