"""The trainer: exact resume, end-to-end run to a sample grid, non-finite policies, CLI errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from selfalign.cli import main
from selfalign.config.experiment import load_config
from selfalign.errors import CheckpointError, UsageError
from selfalign.formats.checkpoint import latest_checkpoint, list_checkpoints
from selfalign.runs import load_for_inference
from selfalign.training.metrics import read_metrics
from selfalign.training.trainer import TrainingStopped, train

BATCH = 8


def tiny(steps: int, **train_overrides) -> dict:
    """SiT-T/8 on Fashion-MNIST (16 tokens), SRA 2 -> 4, one log record per step."""
    kimg = steps * BATCH / 1000
    return {
        "model": {"preset": "SiT-T/8"},
        "regularizers": {"sra": {}},
        "data": {"kind": "fashion_mnist", "hflip": True},
        "train": {"batch_size": BATCH, "micro_batch": 4, "total_kimg": kimg, "log_every_kimg": BATCH / 1000,
                  "ckpt_every_kimg": 3 * BATCH / 1000, "ema_decay": 0.9, "device": "cpu", "lr": 1e-3,
                  **train_overrides},
        "sampler": {"name": "euler", "steps": 2},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


def quiet(_message):
    pass


def final_tensors(run_dir):
    ckpt = latest_checkpoint(run_dir)
    out = {name: load_file(str(ckpt / f"{name}.safetensors")) for name in ("model", "ema", "regularizers")}
    out["optimizer"] = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    return ckpt, out


def assert_bitwise_equal(a, b):
    for group in ("model", "ema", "regularizers"):
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), f"{group}.{key} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        for slot in sa[pid]:
            assert torch.equal(sa[pid][slot], sb[pid][slot]), f"optimizer {pid}.{slot} differs"


def test_resume_is_bitwise_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(load_config(tiny(6)), straight, log=quiet)
    first = train(load_config(tiny(3)), resumed, log=quiet)
    assert first.step == 3
    # A torn metrics line and a stale temporary checkpoint, as a kill would leave them.
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')
    (resumed / "checkpoints" / ".tmp-step-000000004-1").mkdir()
    second = train(load_config(tiny(6)), resumed, resume="auto", log=quiet)
    assert second.step == 6

    ckpt_a, a = final_tensors(straight)
    ckpt_b, b = final_tensors(resumed)
    assert ckpt_a.name == ckpt_b.name == "step-000000006"
    assert_bitwise_equal(a, b)
    state_a = json.loads((ckpt_a / "state.json").read_text())
    state_b = json.loads((ckpt_b / "state.json").read_text())
    assert state_a["rng"] == state_b["rng"]
    assert state_a["data"] == state_b["data"] == {"position": 48, "seed": 0, "dataset_size": 60000,
                                                  "epoch": 0, "offset": 48}

    steps = [r["step"] for r in read_metrics(resumed) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]                       # each step exactly once
    straight_losses = {r["step"]: r["loss"] for r in read_metrics(straight)}
    assert {r["step"]: r["loss"] for r in read_metrics(resumed)} == straight_losses
    assert not list((resumed / "checkpoints").glob(".tmp-*"))


def test_resume_refuses_a_different_run(tmp_path):
    train(load_config(tiny(3)), tmp_path, log=quiet)
    with pytest.raises(CheckpointError, match="train.lr"):
        train(load_config(tiny(6, lr=5e-4)), tmp_path, resume="auto", log=quiet)
    with pytest.raises(UsageError, match="--resume auto"):
        train(load_config(tiny(6)), tmp_path, log=quiet)


def test_end_to_end_cli_writes_grid_metrics_and_loadable_checkpoint(tmp_path, capsys):
    import yaml
    cfg = tiny(4, sample_every_kimg=2 * BATCH / 1000, sample_count=10)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    assert main(["train", str(path), "--run-dir", str(run_dir), "--set", "train.seed=3"]) == 0
    assert "done: step 4" in capsys.readouterr().out
    grids = sorted((run_dir / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-000000002.png", "step-000000004.png"]
    from PIL import Image
    with Image.open(grids[-1]) as grid:
        assert grid.size == (10 * 34 + 2, 34 + 2)       # one row of the 10 classes, 32 px + padding
    records = read_metrics(run_dir)
    assert {"loss", "loss/gen", "loss/sra", "grad_norm", "lr", "img_per_s", "kimg", "peak_mem_mb"} <= set(records[-1])
    assert load_config(run_dir / "config.yaml").train.seed == 3

    model, objective, config = load_for_inference(run_dir)
    assert config.model.preset == "SiT-T/8" and objective.kind == "flow" and not model.training
    out = model(torch.zeros(2, 1, 32, 32), torch.full((2,), 0.5), torch.tensor([0, 1]))
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("argv, expected", [
    (["train", "fmnist-cpu-tiny-sra", "--set", "train.lrr=1"], "train.lrr: unknown key"),
    (["train", "fmnist-cpu-tiny-sra", "--set", "train.lr=-1"], "train.lr must be > 0"),
    (["train", "fmnist-cpu-tiny-sra", "--set", "regularizers.sra.teacher_layer=9"], "beyond the model depth 6"),
    (["train", "no-such-preset"], "neither a config file nor a preset"),
    (["train", "fmnist-cpu-tiny-sra", "--set", "data.path=/nonexistent"], "apt-get install dataset-fashion-mnist"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, expected):
    run_dir = tmp_path / "run"
    assert main([*argv, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err
    assert not run_dir.exists()


def nan_batch_at(step):
    def hook(trainer, index, x, y):
        if index == step:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return x, y
    return hook


def test_nonfinite_batch_is_skipped_and_counted(tmp_path):
    result = train(load_config(tiny(4)), tmp_path, batch_hook=nan_batch_at(1), log=quiet)
    assert result.step == 4 and result.skipped_steps == 1
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert records[2]["skipped_in_window"] == 1 and records[4]["skipped_steps"] == 1
    _, tensors = final_tensors(tmp_path)
    assert all(torch.isfinite(v).all() for group in ("model", "ema") for v in tensors[group].values())


def test_nonfinite_stop_policy_stops_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingStopped, match=r"step 1 .*non-finite loss, train.nonfinite=stop"):
        train(load_config(tiny(4, nonfinite="stop")), tmp_path, batch_hook=nan_batch_at(1), log=quiet)


def test_nan_parameter_stops_after_consecutive_bad_steps_and_keeps_checkpoints_finite(tmp_path):
    def poison(trainer, index, x, y):
        if index == 4:      # after the step-3 checkpoint
            with torch.no_grad():
                trainer.model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
        return x, y

    with pytest.raises(TrainingStopped, match="2 non-finite steps in a row"):
        train(load_config(tiny(9, max_consecutive_bad=2)), tmp_path, batch_hook=poison, log=quiet)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000003"]
    _, tensors = final_tensors(tmp_path)
    assert all(torch.isfinite(v).all() for v in tensors["model"].values())


def test_fp16_loss_scaling_and_tensorboard(tmp_path):
    config = tiny(2, precision="fp16")
    config["logging"]["tensorboard"] = True
    train(load_config(config), tmp_path, log=quiet)
    config["train"]["total_kimg"] = 3 * BATCH / 1000
    train(load_config(config), tmp_path, resume="auto", log=quiet)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["loss_scale"] > 1 for r in records)
    scaler = torch.load(latest_checkpoint(tmp_path) / "optimizer.pt", weights_only=True)["scaler"]
    assert scaler["scale"] == records[-1]["loss_scale"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_compile_trains_like_eager_and_saves_plain_keys(tmp_path):
    """train.compile compiles the student and the SRA teacher's forward; the losses follow the eager
    run's and checkpoints keep the plain parameter names (no ``_orig_mod.`` of the wrappers)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(load_config(tiny(2)), eager, log=quiet)
    result = train(load_config(tiny(2, compile=True)), compiled, log=quiet)
    assert result.step == 2
    a, b = read_metrics(eager), read_metrics(compiled)
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "loss/gen", "loss/sra"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-3), key
    _, ta = final_tensors(eager)
    _, tb = final_tensors(compiled)
    for group in ("model", "ema", "regularizers"):
        assert ta[group].keys() == tb[group].keys()
        for key in ta[group]:
            torch.testing.assert_close(tb[group][key], ta[group][key], rtol=1e-3, atol=1e-4)


def test_fp8_teacher_trains_close_to_the_autocast_teacher_and_saves_the_same_tensors(tmp_path):
    """sra.teacher_precision=fp8 runs the teacher on an fp8 view of the EMA: nothing of the view
    reaches the checkpoint, and the SRA loss barely moves. Step 1 cannot tell them apart (adaLN-Zero
    closes every block at initialisation); at step 2 the student is still the same, the target not."""
    plain, cheap = tmp_path / "plain", tmp_path / "fp8"
    config = tiny(2)
    train(load_config(config), plain, log=quiet)
    config["regularizers"]["sra"]["teacher_precision"] = "fp8"
    assert train(load_config(config), cheap, log=quiet).step == 2
    second_plain, second_cheap = read_metrics(plain)[1], read_metrics(cheap)[1]
    assert second_cheap["loss/gen"] == second_plain["loss/gen"]
    assert second_cheap["loss/sra"] == pytest.approx(second_plain["loss/sra"], rel=0.05)
    assert second_cheap["loss/sra"] != second_plain["loss/sra"]    # the trainer did use the view
    _, ta = final_tensors(plain)
    _, tb = final_tensors(cheap)
    for group in ("model", "ema", "regularizers"):
        assert ta[group].keys() == tb[group].keys()
