"""An imported released SRA checkpoint is a run selfalign resumes where the authors' run stopped
(step, AdamW moments, the epoch-decayed SRA weight), and an import is all or nothing."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from selfalign.cli import main
from selfalign.formats import checkpoint as ckpt_io
from selfalign.models import build_model
from selfalign.pipeline.convert import export_checkpoint, export_state, read_tensors
from selfalign.pipeline.convert_args import SIT_ARGS
from selfalign.pipeline.convert_optimizer import released_parameter_names

from conftest import randomize_zero_init
from test_reliability_bad_data import make_latents      # 8 examples of 2 classes, 4x2x2 latents (16 px)

STEPS, EPOCH, PROCESSES, PER_PROCESS = 1000, 499, 2, 2     # global batch 4 on 8 examples: 2 steps an epoch


def released_tiny_checkpoint(path, seed=0):
    """A SiT-SRA train.py checkpoint of a tiny model (16 px, 2 classes), smooth-L1 with the decay."""
    torch.manual_seed(seed)
    net = randomize_zero_init(build_model("SiT-T/2", input_size=2, in_channels=4, num_classes=2), seed=seed)
    d = net.config.hidden_size
    head = {"sra.head.0.weight": torch.randn(2 * d, d), "sra.head.0.bias": torch.randn(2 * d),
            "sra.head.2.weight": torch.randn(d, 2 * d), "sra.head.2.bias": torch.randn(d)}
    ema = {k: v + 0.01 for k, v in net.state_dict().items()}
    official, _ = export_state(net.state_dict(), ema, head, net.config, "sra",
                               ema_head={"ap_head.linear1.weight": torch.zeros(2 * d, d) + 0.5,
                                         "ap_head.linear1.bias": torch.zeros(2 * d),
                                         "ap_head.linear2.weight": torch.zeros(d, 2 * d),
                                         "ap_head.linear2.bias": torch.zeros(d)})
    names = released_parameter_names(net.config)
    shapes = {k: v.shape for k, v in official["model"].items()}
    state = {i: {"step": torch.tensor(float(STEPS)), "exp_avg": torch.randn(shapes[n]) * 1e-3,
                 "exp_avg_sq": torch.rand(shapes[n]) * 1e-6} for i, n in enumerate(names) if n != "pos_embed"}
    group = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, foreach=None,
                 maximize=False, capturable=False, differentiable=False, fused=None, params=list(range(len(names))))
    args = argparse.Namespace(**{**SIT_ARGS, "model": "SiT-T/2", "exp_name": "tiny", "resolution": 16,
                                 "num_classes": 2, "batch_size": PER_PROCESS, "mixed_precision": "no",
                                 "loss_type": "sml1", "block_out_s": 2, "block_out_t": 4, "num_workers": 0})
    torch.save({**official, "opt": {"state": state, "param_groups": [group]}, "args": args, "epoch": EPOCH,
                "steps": STEPS}, path)
    return path


def test_an_imported_run_resumes_where_the_released_run_stopped(tmp_path, capsys):
    latents = make_latents(tmp_path / "latents")
    source = released_tiny_checkpoint(tmp_path / "step-1000.pt")
    run = tmp_path / "run"
    assert main(["convert", "import", str(source), str(run), "--from", "sra", "--data-path", str(latents),
                 "--processes", str(PROCESSES)]) == 0
    capsys.readouterr()
    assert main(["train", str(run / "config.yaml"), "--run-dir", str(run), "--resume", "auto",
                 "--set", f"train.total_kimg={(STEPS + 1) * 4 / 1000}", "--set", "train.sample_every_kimg=0",
                 "--set", "train.device=cpu", "--set", "logging.tensorboard=false",
                 "--set", "logging.progress_bar=false"]) == 0
    assert f"resumed from {run / 'checkpoints' / 'step-000001000'} (step {STEPS}" in capsys.readouterr().out
    ckpt = ckpt_io.latest_checkpoint(run)
    assert ckpt.name == "step-000001001"
    moments = ckpt_io.load_optimizer_state(ckpt)["optimizer"]["state"]
    assert moments and all(float(slots["step"]) == STEPS + 1 for slots in moments.values())   # AdamW went on
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    epoch = (STEPS + 1) * 4 // 8
    # SiT-SRA/train.py, smooth-L1 at a resolution other than 256: 2 * 0.1 ** ((e - 99) / 800 + 1) after epoch 99
    assert record["step"] == STEPS + 1 and record["weight/sra"] == pytest.approx(2 * 0.1 ** ((epoch - 99) / 800 + 1))

    path, notes = export_checkpoint(run, "sra", tmp_path / "continued.pt")
    back = read_tensors(path)
    assert (back["steps"], back["epoch"]) == (STEPS + 1, epoch)
    assert back["args"].batch_size == PER_PROCESS and back["args"].loss_type == "sml1"
    assert all(float(slots["step"]) == STEPS + 1 for slots in back["opt"]["state"].values())
    assert any("keeps no EMA of the SRA head" in note for note in notes)
    assert torch.equal(back["ema"]["ap_head.linear1.weight"], back["model"]["ap_head.linear1.weight"])


def test_the_imported_checkpoint_exports_with_the_emas_own_head(tmp_path):
    source = released_tiny_checkpoint(tmp_path / "official.pt")
    assert main(["convert", "import", str(source), str(tmp_path / "run"), "--from", "sra",
                 "--processes", str(PROCESSES)]) == 0
    back = read_tensors(export_checkpoint(tmp_path / "run", "sra", tmp_path / "back.pt")[0])
    official = read_tensors(source)
    for part in ("model", "ema"):
        assert all(torch.equal(back[part][k], v) for k, v in official[part].items())
    assert torch.equal(back["ema"]["ap_head.linear1.weight"], torch.full_like(back["ema"]["ap_head.linear1.weight"],
                                                                              0.5))
    assert vars(back["args"]) == vars(official["args"]) and back["epoch"] == EPOCH


def test_an_import_is_all_or_nothing(tmp_path, capsys):
    source = released_tiny_checkpoint(tmp_path / "official.pt")
    run = tmp_path / "run"
    # Killed after the first file of the checkpoint: no run directory appears.
    env = {**os.environ, "SELFALIGN_FAULT": "ckpt_file:1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "selfalign.cli", "convert", "import", str(source), str(run),
                           "--from", "sra"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not run.exists()
    assert main(["convert", "import", str(source), str(run), "--from", "sra"]) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["convert", "import", str(source), str(run), "--from", "sra"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists and is not an empty folder" in err and len(err.splitlines()) == 1
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
