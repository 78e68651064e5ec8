"""Kill anywhere: checkpoints are never half-written (also while old ones are pruned), and a run
killed with SIGKILL at random points, resumed with ``--resume auto`` each time, ends bitwise equal
to an uninterrupted run with each step in the metrics log exactly once (``scripts/kill_harness.py``
with a reduced kill count; ``docs/RELIABILITY.md`` has the full run)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from selfalign.formats import checkpoint as ckpt_io
from conftest import load_kill_harness

ROOT = Path(__file__).resolve().parents[1]


def write_small_checkpoint(run_dir, step, keep_last=None):
    tensors = {"model": {"w": torch.full((4,), float(step))}, "ema": {"w": torch.zeros(4)}, "regularizers": {}}
    optim = {"optimizer": {"state": {0: {"exp_avg": torch.ones(4)}}, "param_groups": []}, "scaler": {}}
    return ckpt_io.save_checkpoint(run_dir, step, tensors, optim, {"images": step}, keep_last=keep_last)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        write_small_checkpoint(tmp_path, step)
    real_rmtree = shutil.rmtree

    def dies_after_one_file(path, *args, **kwargs):
        victim = sorted(Path(path).iterdir())[0]
        victim.unlink()
        raise Killed

    monkeypatch.setattr(ckpt_io.shutil, "rmtree", dies_after_one_file)
    with pytest.raises(Killed):
        write_small_checkpoint(tmp_path, 3, keep_last=2)     # prunes step 1 and is "killed" doing so
    monkeypatch.setattr(ckpt_io.shutil, "rmtree", real_rmtree)
    for ckpt in ckpt_io.list_checkpoints(tmp_path):
        assert ckpt_io.verify(ckpt) is None, ckpt_io.verify(ckpt)
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step-000000003"
    # The next save clears what the killed process left behind.
    write_small_checkpoint(tmp_path, 4, keep_last=2)
    names = sorted(p.name for p in ckpt_io.checkpoints_dir(tmp_path).iterdir())
    assert names == ["step-000000003", "step-000000004"]


def test_a_step_written_again_keeps_the_earlier_directory_also_when_killed(tmp_path, monkeypatch):
    """A run resumed from step 1 writes step 2 again: the earlier step-2 is renamed aside, never
    deleted, and a kill between that rename and the new one leaves only complete checkpoints."""
    write_small_checkpoint(tmp_path, 1)
    earlier = write_small_checkpoint(tmp_path, 2)
    earlier_model = (earlier / "model.safetensors").read_bytes()
    real_set_aside = ckpt_io.set_aside

    def dies_after_setting_aside(ckpt):
        real_set_aside(ckpt)
        raise Killed

    monkeypatch.setattr(ckpt_io, "set_aside", dies_after_setting_aside)
    with pytest.raises(Killed):
        write_small_checkpoint(tmp_path, 2)
    monkeypatch.undo()
    for ckpt in ckpt_io.list_checkpoints(tmp_path):
        assert ckpt_io.verify(ckpt) is None, ckpt_io.verify(ckpt)
    aside = ckpt_io.checkpoints_dir(tmp_path) / "step-000000002.superseded"
    assert ckpt_io.verify(aside) is None and (aside / "model.safetensors").read_bytes() == earlier_model
    write_small_checkpoint(tmp_path, 2, keep_last=2)      # the next attempt; its prune clears the leftover
    names = sorted(p.name for p in ckpt_io.checkpoints_dir(tmp_path).iterdir())
    assert names == ["step-000000001", "step-000000002", "step-000000002.superseded"]


def test_five_sigkills_anywhere_then_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    harness = load_kill_harness()
    report = harness.run_harness(kills=5, seed=0, steps=16, workdir=tmp_path, launcher="fork", log=print)
    assert report["result"] == "PASS" and report["kills"] == 5
    assert sum(report["kills_by_kind"].values()) == 5
    assert report["distinct_checkpoints_compared"] >= 5     # every checkpoint written was compared
    assert [e["exit"] for e in report["events"]] == [-9] * 5 + [0]


def test_the_harness_catches_a_resume_that_forgets_the_random_streams(tmp_path, monkeypatch):
    """Negative control: with RNG restore broken (the fork launcher inherits the patch) the
    bitwise comparison against the uninterrupted run fails."""
    from selfalign.training import rng
    monkeypatch.setattr(rng, "restore", lambda state, generator: None)
    harness = load_kill_harness()
    with pytest.raises(harness.HarnessFailure, match="differs from the uninterrupted run"):
        harness.run_harness(kills=1, seed=0, steps=6, workdir=tmp_path, launcher="fork", kinds=("step",),
                            log=print)


@pytest.mark.parametrize("lines, expected", [
    (['{"kind": "train", "step": 1}', '{"kind": "tr', '{"kind": "train", "step": 2}'], "line 2 is corrupt"),
    (['{"kind": "train", "step": 1}', '{"kind": "train", "step": 1}'], "step twice"),
    (['{"kind": "train", "step": 1, "loss": 0.5}'], "differs from the uninterrupted run"),
])
def test_the_metrics_audit_catches_torn_duplicate_or_wrong_records(tmp_path, lines, expected):
    harness = load_kill_harness()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    reference = {s: {"kind": "train", "step": s} for s in (1, 2)}
    with pytest.raises(harness.HarnessFailure, match=expected):
        harness.audit(tmp_path, tmp_path, reference, set())
