"""Safe loading: a checkpoint is read without running pickled code. A crafted pickle whose
``__reduce__`` would create a marker file, placed as ``optimizer.pt`` (zip or legacy format, alone
or hidden inside a real optimizer state) or as ``model.safetensors``, is refused with one line
and the marker never appears."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from selfalign.cli import main
from selfalign.config.experiment import load_config
from selfalign.formats import checkpoint as ckpt_io
from selfalign.training.trainer import train
from conftest import load_kill_harness, one_thread

pytestmark = pytest.mark.usefixtures("single_thread")


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import yaml

    harness = load_kill_harness()
    base = tmp_path_factory.mktemp("safe")
    config = {"model": {"preset": "SiT-T/8"},
              "data": {"kind": "fashion_mnist", "path": str(harness.make_data(base / "data", count=64))},
              "train": {"batch_size": 8, "total_kimg": 0.016, "log_every_kimg": 0.008, "ckpt_every_kimg": 0.008,
                        "device": "cpu", "lr": 1e-3, "keep_last": 5},
              "logging": {"tensorboard": False, "progress_bar": False}}
    (base / "tiny.yaml").write_text(yaml.safe_dump(config))
    with one_thread():
        train(load_config(config), base / "run", log=lambda _m: None)
    return base


def plant(run: Path, filename: str, data: bytes) -> Path:
    """Replace a file of the newest checkpoint and fix the sizes in state.json, as an attacker would."""
    ckpt = ckpt_io.latest_checkpoint(run)
    (ckpt / filename).write_bytes(data)
    state = json.loads((ckpt / "state.json").read_text())
    state["files"][filename] = len(data)
    (ckpt / "state.json").write_text(json.dumps(state))
    assert ckpt_io.verify(ckpt) is None            # it passes the completeness check
    return ckpt


def torch_bytes(obj, path: Path) -> bytes:
    torch.save(obj, path)
    return path.read_bytes()


def malicious(kind: str, marker: Path, scratch: Path, real_optimizer: Path) -> bytes:
    if kind == "legacy-pickle":
        return pickle.dumps({"optimizer": Payload(marker), "scaler": {}}, protocol=2)
    if kind == "torch-zip":
        return torch_bytes({"optimizer": Payload(marker), "scaler": {}}, scratch / "evil.pt")
    state = torch.load(real_optimizer, weights_only=True)      # a real state with one poisoned entry
    state["optimizer"]["param_groups"][0]["note"] = Payload(marker)
    return torch_bytes(state, scratch / "evil.pt")


def test_the_payload_is_real(tmp_path):
    """Control: unpickled the usual way, the payload does create the marker."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["legacy-pickle", "torch-zip", "hidden-in-real-state"])
def test_a_malicious_optimizer_file_is_refused_on_resume(tmp_path, capsys, trained, kind):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    marker = tmp_path / "code-ran"
    real = ckpt_io.latest_checkpoint(run) / ckpt_io.OPTIMIZER_FILE
    ckpt = plant(run, ckpt_io.OPTIMIZER_FILE, malicious(kind, marker, tmp_path, real))

    with pytest.raises(ckpt_io.CheckpointError, match="was refused: it is not a plain tensor file"):
        ckpt_io.load_optimizer_state(ckpt)
    code = main(["train", str(trained / "tiny.yaml"), "--run-dir", str(run), "--resume", "auto",
                 "--set", "train.total_kimg=0.032"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "optimizer.pt was refused" in err
    assert not marker.exists()
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step-000000001", "step-000000002"]


def test_a_pickle_in_place_of_the_weights_is_refused_by_sample(tmp_path, capsys, trained):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    marker = tmp_path / "code-ran"
    plant(run, "ema.safetensors", pickle.dumps(Payload(marker)))
    code = main(["sample", str(run), "--out", str(tmp_path / "out"), "-n", "2", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "ema.safetensors cannot be read" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
