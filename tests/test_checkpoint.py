"""Checkpoints: atomic writes, failed writes keep the previous one, safe loading, wrong presets."""
from __future__ import annotations

import errno
import json
import os
import pickle

import pytest
import torch

from selfalign.config.experiment import load_config
from selfalign.formats import checkpoint as ckpt_io
from selfalign.runs import load_for_inference
from selfalign.training.trainer import TrainingStopped, train

BATCH = 8


def tiny(steps: int, preset: str = "SiT-T/8", **train_overrides) -> dict:
    return {
        "model": {"preset": preset},
        "data": {"kind": "fashion_mnist"},
        "train": {"batch_size": BATCH, "total_kimg": steps * BATCH / 1000, "log_every_kimg": BATCH / 1000,
                  "ckpt_every_kimg": 2 * BATCH / 1000, "device": "cpu", **train_overrides},
        "logging": {"tensorboard": False, "progress_bar": False},
    }


def quiet(_message):
    pass


def fake_checkpoint(run_dir, step, tensors=None, optimizer=None):
    tensors = tensors or {"w": torch.ones(3)}
    return ckpt_io.save_checkpoint(run_dir, step, {"model": tensors, "ema": tensors, "regularizers": {}},
                                   optimizer or {"optimizer": {}, "scaler": {}},
                                   {"images": step, "data": {"position": step}})


def test_write_layout_and_keep_last(tmp_path):
    for step in (1, 2, 3):
        path = fake_checkpoint(tmp_path, step)
    ckpt_io.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step-000000002", "step-000000003"]
    assert sorted(os.listdir(path)) == ["ema.safetensors", "model.safetensors", "optimizer.pt",
                                        "regularizers.safetensors", "state.json"]
    assert ckpt_io.verify(path) is None
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 3 and set(state["files"]) == {"model.safetensors", "ema.safetensors",
                                                          "regularizers.safetensors", "optimizer.pt"}


def test_incomplete_checkpoints_are_skipped_by_resume_auto(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    torn = fake_checkpoint(tmp_path, 4)
    with open(torn / "model.safetensors", "r+b") as f:       # truncated by a crash or a copy
        f.truncate(10)
    no_state = tmp_path / "checkpoints" / "step-000000006"
    no_state.mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-000000008-123").mkdir()
    reports = []
    assert ckpt_io.latest_checkpoint(tmp_path, report=reports.append) == good
    assert len(reports) == 1 and "\n" not in reports[0]        # one line: the damaged ones, why, and which is used
    assert "step-000000006, step-000000004" in reports[0] and "state.json is missing" in reports[0]
    assert reports[0].endswith("using the older step-000000002")
    with pytest.raises(ckpt_io.CheckpointError, match="truncated"):
        ckpt_io.resolve_checkpoint(torn)


def test_nonfinite_tensors_are_never_written(tmp_path):
    fake_checkpoint(tmp_path, 1)
    with pytest.raises(ckpt_io.CheckpointWriteError, match="model: w holds NaN"):
        fake_checkpoint(tmp_path, 2, tensors={"w": torch.tensor([1.0, float("nan")])})
    moment = {"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}, "scaler": {}}
    with pytest.raises(ckpt_io.CheckpointWriteError, match="optimizer: 0.exp_avg"):
        fake_checkpoint(tmp_path, 2, optimizer=moment)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step-000000001"]


def test_disk_full_during_a_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = ckpt_io.write_torch

    def fails_second_time(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:           # half a file, then the disk is full
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(ckpt_io, "write_torch", fails_second_time)
    with pytest.raises(TrainingStopped, match=r"No space left on device; the previous checkpoint "
                                               r"step-000000002 is intact"):
        train(load_config(tiny(6)), tmp_path, log=quiet)
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["step-000000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(ckpt_io, "write_torch", real)
    result = train(load_config(tiny(6)), tmp_path, resume="auto", log=quiet)
    assert result.step == 6


def test_optimizer_file_with_code_is_refused(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 1)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump({"optimizer": Exploit()}, f, protocol=2)
    with pytest.raises(ckpt_io.CheckpointError, match="refused"):
        ckpt_io.load_optimizer_state(ckpt)
    assert not (tmp_path / "pwned").exists()


def test_other_preset_is_refused_naming_the_key(tmp_path):
    train(load_config(tiny(2)), tmp_path, log=quiet)
    model, objective, config = load_for_inference(tmp_path, use_ema=False)
    assert config.model.preset == "SiT-T/8" and objective.kind == "flow"
    with pytest.raises(ValueError, match="model.preset is 'SiT-T/8' in the checkpoint but 'SiT-T/4'"):
        train(load_config(tiny(4, preset="SiT-T/4")), tmp_path, resume="auto", log=quiet)
    other = load_config(tiny(2, preset="SiT-T/4"))
    from selfalign.models.backbone import DiffusionTransformer
    ckpt = ckpt_io.latest_checkpoint(tmp_path)
    with pytest.raises(ckpt_io.CheckpointError, match=r"model 'pos_embed' has shape \(1, 16, 128\) in the "
                                                         r"checkpoint but \(1, 64, 128\) here"):
        ckpt_io.load_module(DiffusionTransformer(other.backbone_config()),
                            ckpt_io.load_tensors(ckpt, "model"), "model", ckpt)
