"""Disk full and write errors while a checkpoint is written: the run stops with one line saying
what happened, the previous checkpoint stays complete and loadable, nothing half-written is
left behind, and resuming from it ends exactly where an undisturbed run ends."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfalign.config.experiment import load_config
from selfalign.formats import checkpoint as ckpt_io
from selfalign.training.trainer import TrainingStopped, train
from conftest import load_kill_harness, one_thread

pytestmark = pytest.mark.usefixtures("single_thread")
BATCH = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    harness = load_kill_harness()
    return harness.make_data(tmp_path_factory.mktemp("fmnist"), count=64)


def config(data_dir, steps):
    kimg = BATCH / 1000
    return load_config({
        "model": {"preset": "SiT-T/8"}, "regularizers": {"sra": {}},
        "data": {"kind": "fashion_mnist", "path": str(data_dir), "hflip": True},
        "train": {"batch_size": BATCH, "total_kimg": steps * kimg, "log_every_kimg": kimg,
                  "ckpt_every_kimg": 2 * kimg, "ema_decay": 0.9, "device": "cpu", "lr": 1e-3, "keep_last": 5},
        "logging": {"tensorboard": False, "progress_bar": False},
    })


def no_space(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path else None)


class OsWithFailingRename:
    """``os`` as the checkpoint module sees it, with ``rename`` of a checkpoint failing."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def rename(src, dst):
        if Path(src).name.startswith(ckpt_io.TMP_PREFIX):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return os.rename(src, dst)


def install_failure(monkeypatch, where: str) -> None:
    """From now on every checkpoint write fails at ``where``."""
    if where == "safetensors":             # half a file written, then the disk is full
        real = ckpt_io.save_file

        def half_then_full(tensors, filename, *args, **kwargs):
            real(tensors, filename, *args, **kwargs)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise no_space(filename)
        monkeypatch.setattr(ckpt_io, "save_file", half_then_full)
    elif where == "optimizer":
        def full(obj, path):
            Path(path).write_bytes(b"PK\x03\x04 partial")
            raise no_space(path)
        monkeypatch.setattr(ckpt_io, "write_torch", full)
    elif where == "fsync":
        def io_error(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        monkeypatch.setattr(ckpt_io, "fsync_path", io_error)
    else:
        monkeypatch.setattr(ckpt_io, "os", OsWithFailingRename())


@pytest.fixture(scope="module")
def undisturbed(data_dir, tmp_path_factory):
    with one_thread():
        run = tmp_path_factory.mktemp("undisturbed")
        train(config(data_dir, 6), run, log=lambda _m: None)
    return {name: load_file(str(ckpt_io.latest_checkpoint(run) / f"{name}.safetensors")) for name in ("model", "ema")}


@pytest.mark.parametrize("where, what", [
    ("safetensors", "No space left on device"),
    ("optimizer", "No space left on device"),
    ("fsync", "Input/output error"),
    ("rename", "Input/output error"),
])
def test_a_failing_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, data_dir, undisturbed, where, what):
    def fail_from_step_3(trainer, step, x, y):
        if step == 3:                      # after the step-2 checkpoint, before the step-4 one
            install_failure(monkeypatch, where)
        return x, y

    with pytest.raises(TrainingStopped) as info:
        train(config(data_dir, 6), tmp_path, batch_hook=fail_from_step_3, log=lambda _m: None)
    message = str(info.value)
    assert "\n" not in message
    assert "could not write checkpoint step-000000004" in message and what in message
    assert "the previous checkpoint step-000000002 is intact" in message
    monkeypatch.undo()

    names = sorted(p.name for p in ckpt_io.checkpoints_dir(tmp_path).iterdir())
    assert names == ["step-000000002"]                 # no half-written or temporary directory
    assert ckpt_io.verify(ckpt_io.checkpoints_dir(tmp_path) / "step-000000002") is None
    result = train(config(data_dir, 6), tmp_path, resume="auto", log=lambda _m: None)
    assert result.step == 6
    for name in ("model", "ema"):
        resumed = load_file(str(ckpt_io.latest_checkpoint(tmp_path) / f"{name}.safetensors"))
        assert all(torch.equal(resumed[k], undisturbed[name][k]) for k in resumed), name


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys, data_dir):
    import yaml

    from selfalign.cli import main
    cfg = config(data_dir, 2).to_dict()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(__import__("json").loads(__import__("json").dumps(cfg))))
    install_failure(monkeypatch, "safetensors")
    assert main(["train", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "could not write checkpoint step-000000002" in err and "No space left on device" in err
    assert "no earlier checkpoint exists" in err


def test_a_full_disk_while_writing_metrics_is_one_line(tmp_path, monkeypatch, capsys, data_dir):
    """The metrics log is the other file a run keeps writing; a full disk there is one line too."""
    import json

    import yaml

    from selfalign.cli import main
    from selfalign.training import metrics
    cfg = json.loads(json.dumps(config(data_dir, 2).to_dict()))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))

    class FullDisk:
        def __init__(self, real):
            self.real = real

        def write(self, text):
            raise no_space()

        def __getattr__(self, name):
            return getattr(self.real, name)

    real_init = metrics.MetricsLog.__init__

    def open_on_a_full_disk(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._file = FullDisk(self._file)
    monkeypatch.setattr(metrics.MetricsLog, "__init__", open_on_a_full_disk)
    code = main(["train", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "Traceback" not in err, err
    assert "No space left on device" in err and "metrics.jsonl" in err
