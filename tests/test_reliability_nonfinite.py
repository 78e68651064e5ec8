"""Non-finite values: NaN/Inf in a batch, in a gradient, in a parameter or in the EMA.

The skip policy skips the step (the weights, EMA and optimizer are untouched; the step is
counted in metrics.jsonl and logged), the stop policy and K consecutive bad steps stop the run
with one clear line, and no checkpoint ever holds a non-finite tensor.
"""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from selfalign.config.experiment import load_config
from selfalign.formats.checkpoint import latest_checkpoint, list_checkpoints, load_optimizer_state
from selfalign.training.metrics import read_metrics
from selfalign.training.trainer import TrainingStopped, train
from conftest import load_kill_harness

pytestmark = pytest.mark.usefixtures("single_thread")
BATCH = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """256 Fashion-MNIST images (loads in milliseconds), made by the kill harness's helper."""
    harness = load_kill_harness()
    return harness.make_data(tmp_path_factory.mktemp("fmnist"))


def config(data_dir, steps, **train):
    kimg = BATCH / 1000
    return load_config({
        "model": {"preset": "SiT-T/8"},
        "regularizers": {"sra": {}},
        "data": {"kind": "fashion_mnist", "path": str(data_dir)},
        "train": {"batch_size": BATCH, "total_kimg": steps * kimg, "log_every_kimg": kimg,
                  "ckpt_every_kimg": 2 * kimg, "ema_decay": 0.9, "device": "cpu", "lr": 1e-3, **train},
        "logging": {"tensorboard": False, "progress_bar": False},
    })


def snapshot(trainer):
    return {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "ema": {k: v.clone() for k, v in trainer.ema.model.state_dict().items()},
            "adam_steps": [s["step"].clone() for s in trainer.optimizer.state.values()]}


def assert_same(a, b):
    for group in ("model", "ema"):
        assert all(torch.equal(a[group][k], b[group][k]) for k in a[group]), group
    assert all(torch.equal(x, y) for x, y in zip(a["adam_steps"], b["adam_steps"]))


def assert_checkpoints_finite(run_dir):
    assert list_checkpoints(run_dir)
    for ckpt in list_checkpoints(run_dir):
        for name in ("model", "ema", "regularizers"):
            for key, value in load_file(str(ckpt / f"{name}.safetensors")).items():
                assert torch.isfinite(value).all(), f"{ckpt.name} {name} {key}"
        for slots in load_optimizer_state(ckpt)["optimizer"]["state"].values():
            assert all(torch.isfinite(v).all() for v in slots.values())


def poison_batches(bad_steps, value):
    def hook(trainer, step, x, y):
        if step in bad_steps:
            x = x.clone()
            x[1, 0, 5, 7] = value
        return x, y
    return hook


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_bad_batch_is_skipped_untouched_counted_and_logged(tmp_path, data_dir, value):
    states, messages = {}, []

    def hook(trainer, step, x, y):
        states[step] = snapshot(trainer)
        return poison_batches({2}, value)(trainer, step, x, y)

    result = train(config(data_dir, 5), tmp_path, batch_hook=hook, log=messages.append)
    assert result.step == 5 and result.skipped_steps == 1
    assert_same(states[2], states[3])           # the skipped step changed nothing
    warnings = [m for m in messages if "skipped" in m and "non-finite" in m]
    assert len(warnings) == 1 and "step 2" in warnings[0] and "non-finite loss" in warnings[0]
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert [records[s]["skipped_in_window"] for s in range(1, 6)] == [0, 0, 1, 0, 0]
    assert records[5]["skipped_steps"] == 1
    assert "loss" not in records[3] and "loss" in records[4]    # nothing to average over a skipped step
    assert_checkpoints_finite(tmp_path)


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(tmp_path, data_dir):
    messages = []

    def hook(trainer, step, x, y):
        if step == 1:
            weight = trainer.model.blocks[2].attn.qkv.weight
            handle = weight.register_hook(lambda g: g * float("nan"))
            trainer._remove_hook = handle
        elif step == 2:
            trainer._remove_hook.remove()
        return x, y

    result = train(config(data_dir, 3), tmp_path, batch_hook=hook, log=messages.append)
    assert result.skipped_steps == 1
    assert any("step 1" in m and "non-finite gradient norm" in m for m in messages)
    assert_checkpoints_finite(tmp_path)


def test_the_stop_policy_stops_at_the_first_bad_step_with_one_line(tmp_path, data_dir):
    with pytest.raises(TrainingStopped) as info:
        train(config(data_dir, 6, nonfinite="stop"), tmp_path, batch_hook=poison_batches({3}, float("nan")),
              log=lambda _m: None)
    message = str(info.value)
    assert "\n" not in message
    assert "stopped at step 3" in message and "train.nonfinite=stop" in message
    assert "step-000000002" in message           # where to resume from
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000002"]
    assert_checkpoints_finite(tmp_path)


@pytest.mark.parametrize("bad_steps, stops", [
    ({1, 2, 3}, True),              # three in a row: stop at the third
    ({1, 2, 4, 5}, False),          # never three in a row: four skipped, run completes
])
def test_skip_policy_stops_after_k_consecutive_bad_steps(tmp_path, data_dir, bad_steps, stops):
    cfg = config(data_dir, 6, max_consecutive_bad=3)
    hook = poison_batches(bad_steps, float("nan"))
    if stops:
        with pytest.raises(TrainingStopped, match=r"stopped at step 3 .*3 non-finite steps in a row"):
            train(cfg, tmp_path, batch_hook=hook, log=lambda _m: None)
    else:
        assert train(cfg, tmp_path, batch_hook=hook, log=lambda _m: None).skipped_steps == 4
    assert_checkpoints_finite(tmp_path)


@pytest.mark.parametrize("where", ["model", "ema"])
def test_a_nan_weight_is_never_written_into_a_checkpoint(tmp_path, data_dir, where):
    """A NaN parameter (student) or EMA weight (SRA teacher) makes every step bad; with a large
    K the next checkpoint comes first, and it is refused rather than written."""
    def poison(trainer, step, x, y):
        if step == 3:
            module = trainer.model if where == "model" else trainer.ema.model
            with torch.no_grad():
                module.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
        return x, y

    with pytest.raises(TrainingStopped) as info:
        train(config(data_dir, 8, max_consecutive_bad=100), tmp_path, batch_hook=poison, log=lambda _m: None)
    message = str(info.value)
    assert "\n" not in message
    assert (f"refusing to write checkpoint step-000000004: {where}: blocks.1.mlp.fc2.weight holds NaN/Inf; "
            f"the previous checkpoint is kept") in message
    assert latest_checkpoint(tmp_path).name == "step-000000002"
    assert_checkpoints_finite(tmp_path)
