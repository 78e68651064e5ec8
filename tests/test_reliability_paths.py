"""Bad paths, full disks and damaged checkpoints: one line and exit 2 (exit 1 for a training run
stopped by a full disk), nothing written before the output path is known to be usable, nothing
already written lost or replaced, and every fallback to an older checkpoint said aloud.

Full and read-only disks are real tmpfs mounts (skipped where mounting is not permitted; a
read-only mount stops root too, where ``chmod`` does not); the writers' own error types are also
raised by monkeypatching, so the conversion is tested everywhere."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import SafetensorError

from selfalign.cli import main
from selfalign.config.experiment import load_config
from selfalign.data.fashion_mnist import FILES, resolve_dir
from selfalign.errors import ConfigError, OutputError
from selfalign.formats import checkpoint as ckpt_io
from selfalign.formats import paths
from selfalign.training.outcome import TrainingStopped
from selfalign.training.trainer import train
from conftest import load_kill_harness, one_thread, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")
BATCH = 8
STEP1, STEP2 = "step-000000001", "step-000000002"


# -- fixtures ---------------------------------------------------------------------------------
def tiny_config(data: Path, steps: int) -> dict:
    kimg = BATCH / 1000
    return {"model": {"preset": "SiT-T/8"}, "data": {"kind": "fashion_mnist", "path": str(data)},
            "train": {"batch_size": BATCH, "total_kimg": steps * kimg, "log_every_kimg": kimg,
                      "ckpt_every_kimg": kimg, "device": "cpu", "lr": 1e-3, "keep_last": 5,
                      "sample_every_kimg": 0, "eval_every_kimg": 0},
            "logging": {"tensorboard": False, "progress_bar": False}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-step run with a checkpoint per step, its config file, and a small samples .npz."""
    root = tmp_path_factory.mktemp("paths")
    data = load_kill_harness().make_data(root / "fmnist", count=64)
    for name in FILES["test"]:          # eval pca draws its images from the test split
        (data / name).symlink_to(resolve_dir() / name)
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(data, 2)))
    with one_thread():
        train(load_config(tiny_config(data, 2)), root / "run", log=lambda _m: None)
    np.savez(root / "samples.npz", arr_0=np.zeros((4, 32, 32, 1), np.uint8), arr_1=np.arange(4))
    (root / "a-file").write_text("in the way\n")
    return root


@pytest.fixture
def run_copy(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    return run


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, options)`` mounts a tmpfs under tmp_path (unmounted afterwards)."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        if not sys.platform.startswith("linux") or shutil.which("mount") is None:
            pytest.skip("tmpfs mounts need Linux and mount(8)")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"mounting a tmpfs is not permitted here ({proc.stderr.strip() or proc.returncode})")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=False)


def one_line_error(capsys, code: int, expected_code: int = 2) -> str:
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# -- full disk during a checkpoint ------------------------------------------------------------
def small_checkpoint(run_dir: Path, step: int) -> Path:
    tensors = {"model": {"w": torch.full((64,), float(step))}, "ema": {"w": torch.zeros(64)}, "regularizers": {}}
    optim = {"optimizer": {"state": {0: {"exp_avg": torch.ones(64)}}, "param_groups": []}, "scaler": {}}
    return ckpt_io.save_checkpoint(run_dir, step, tensors, optim, {"images": step})


class FullDiskFile:
    """A file whose writes fail with ENOSPC once ``room`` bytes were written."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def assert_only_previous_checkpoint(run_dir: Path) -> None:
    names = sorted(p.name for p in ckpt_io.checkpoints_dir(run_dir).iterdir())
    assert names == [STEP1]                        # no temporary directory left behind
    assert ckpt_io.verify(ckpt_io.checkpoints_dir(run_dir) / STEP1) is None


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_the_writers_own_full_disk_errors_become_one_line(tmp_path, monkeypatch, writer):
    """safetensors reports a full disk as SafetensorError, torch.save as RuntimeError('unexpected
    pos ...'): both become the OSError they hide, then CheckpointWriteError."""
    small_checkpoint(tmp_path, 1)
    if writer == "safetensors":
        def full(*_args, **_kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(ckpt_io, "save_file", full)
    else:       # the real torch.save, into a file that runs out of room after 100 bytes
        monkeypatch.setattr(ckpt_io, "open", lambda path, mode: FullDiskFile(open(path, mode), 100), raising=False)
    with pytest.raises(ckpt_io.CheckpointWriteError) as info:
        small_checkpoint(tmp_path, 2)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message
    assert f"the previous checkpoint {STEP1} is intact" in message and "free some space" in message
    assert isinstance(info.value, OutputError)     # a SelfalignError: the command line prints one line
    assert_only_previous_checkpoint(tmp_path)


def test_a_writer_bug_keeps_its_traceback_but_leaves_no_temporary_directory(tmp_path, monkeypatch):
    small_checkpoint(tmp_path, 1)

    def broken(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: some tensors share memory")
    monkeypatch.setattr(ckpt_io, "save_file", broken)
    with pytest.raises(SafetensorError, match="share memory"):
        small_checkpoint(tmp_path, 2)
    monkeypatch.undo()

    def torch_bug(obj, f):
        raise RuntimeError("an internal torch error, no failed write")
    monkeypatch.setattr(torch, "save", torch_bug)
    with pytest.raises(RuntimeError, match="no failed write"):
        small_checkpoint(tmp_path, 2)
    assert_only_previous_checkpoint(tmp_path)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up, then free ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    size = filler.stat().st_size
    with open(filler, "r+b") as f:
        f.truncate(max(0, size - leave))
    return filler


@pytest.mark.parametrize("fails_in", ["model.safetensors", "optimizer.pt"])
def test_a_real_full_disk_during_a_checkpoint(base, tmpfs, fails_in):
    """On a tmpfs filled after the first checkpoint, the second one fails in the named file: one
    line, the temporary directory removed, the first checkpoint intact; with room made, the run
    resumes and finishes."""
    disk = tmpfs("disk", "size=64m")
    run = disk / "run"
    sizes = {}

    def full_after_step_1(trainer, step, x, y):
        if step == 1:
            files = ckpt_io.read_state(ckpt_io.checkpoints_dir(run) / STEP1)["files"]
            tensor_bytes = sum(v for k, v in files.items() if k.endswith(".safetensors"))
            leave = (files["model.safetensors"] // 2 if fails_in == "model.safetensors"
                     else tensor_bytes + files["optimizer.pt"] // 2)
            sizes["filler"] = fill(disk, leave)
        return x, y

    data = base / "fmnist"
    with pytest.raises(TrainingStopped) as info:
        train(load_config(tiny_config(data, 2)), run, batch_hook=full_after_step_1, log=lambda _m: None)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message, message
    assert f"could not write checkpoint {STEP2}" in message and f"{STEP1} is intact" in message
    assert_only_previous_checkpoint(run)
    sizes["filler"].unlink()
    result = train(load_config(tiny_config(data, 2)), run, resume="auto", log=lambda _m: None)
    assert result.step == 2 and ckpt_io.verify(ckpt_io.checkpoints_dir(run) / STEP2) is None


def test_the_cli_on_a_disk_too_small_for_one_checkpoint(base, tmpfs, capsys):
    """The report's reproduction: a 2 MB tmpfs as the run directory."""
    disk = tmpfs("small", "size=2m")
    code = main(["train", str(base / "tiny.yaml"), "--run-dir", str(disk / "run")])
    err = one_line_error(capsys, code, expected_code=1)
    assert "No space left on device" in err and "no earlier checkpoint exists" in err, err
    assert list(ckpt_io.checkpoints_dir(disk / "run").iterdir()) == []


# -- output paths -----------------------------------------------------------------------------
# (id, argv; {ro} is a read-only directory, {run} a trained run, {samples} a samples .npz)
OUTPUT_ROWS = [
    ("train-run-dir", ["train", "{base}/tiny.yaml", "--run-dir", "{ro}/run"], "--run-dir"),
    ("sample-out", ["sample", "{run}", "--out", "{ro}/samples", "-n", "2"], "--out"),
    ("eval-fid-json", ["eval", "fid", "{samples}", "--ref", "{samples}", "--json", "{ro}/fid.json"], "--json"),
    ("eval-cknna-json", ["eval", "cknna", "{run}", "--json", "{ro}/cknna.json"], "--json"),
    ("eval-indomain-json", ["eval", "indomain", "{samples}", "--json", "{ro}/indomain.json"], "--json"),
    ("eval-ref-out", ["eval", "ref", "fashion-mnist:test", "--out", "{ro}/ref.npz"], "--out"),
    ("eval-pca-out", ["eval", "pca", "{run}", "--out", "{ro}/pca.png"], "--out"),
    ("eval-probe-out", ["eval", "probe", "{run}", "--out", "{ro}/probe"], "--out"),
    ("prepare-out", ["prepare", "{base}/fmnist", "{ro}/latents", "--device", "cpu"], "output folder"),
    ("demo-out", ["demo", "--smoke", "--out", "{ro}/demo", "--device", "cpu"], "--out"),
]


def expand(argv, **values):
    return [arg.format(**values) for arg in argv]


@pytest.mark.parametrize("argv, flag", [r[1:] for r in OUTPUT_ROWS], ids=[r[0] for r in OUTPUT_ROWS])
def test_a_read_only_output_is_one_line_before_any_work(base, tmpfs, capsys, argv, flag):
    read_only = tmpfs("ro", "ro,size=1m")
    before = snapshot(base)
    code = main(expand(argv, base=base, ro=read_only, run=base / "run", samples=base / "samples.npz"))
    err = one_line_error(capsys, code)
    assert flag in err and "read-only file system" in err and str(read_only) in err, err
    assert snapshot(base) == before


@pytest.mark.parametrize("argv, flag", [r[1:] for r in OUTPUT_ROWS], ids=[r[0] for r in OUTPUT_ROWS])
def test_an_output_under_a_file_is_one_line(base, capsys, argv, flag):
    """A file where a directory would have to be created (NotADirectoryError before)."""
    before = snapshot(base)
    code = main(expand(argv, base=base, ro=base / "a-file", run=base / "run", samples=base / "samples.npz"))
    err = one_line_error(capsys, code)
    assert flag in err and "a-file is a file, so nothing can be created under it" in err, err
    assert snapshot(base) == before


@pytest.mark.parametrize("argv, fragment", [
    (["train", "{base}/tiny.yaml", "--run-dir", "{base}/a-file"], "--run-dir {base}/a-file is a file"),
    (["sample", "{run}", "--out", "{base}/a-file", "-n", "2"], "--out {base}/a-file is a file"),
    (["demo", "--smoke", "--out", "{base}/a-file"], "--out {base}/a-file is a file"),
    (["prepare", "{base}/fmnist", "{base}/a-file"], "{base}/a-file is a file"),
    (["eval", "pca", "{run}", "--out", "{base}"], "--out {base} is a directory; give a file name"),
    (["eval", "cknna", "{run}", "--json", "{base}"], "--json {base} is a directory"),
    (["eval", "ref", "fashion-mnist:test", "--out", "{base}/ref.zip"], "give a file name ending in .npz"),
    (["eval", "pca", "{run}", "--out", "{base}/pca"], "give a file name ending in .png"),
], ids=["train-run-dir-is-a-file", "sample-out-is-a-file", "demo-out-is-a-file", "prepare-out-is-a-file",
        "pca-out-is-a-directory", "json-is-a-directory", "ref-not-npz", "pca-without-suffix"])
def test_a_file_or_directory_in_the_way_is_one_line(base, capsys, argv, fragment):
    before = snapshot(base)
    code = main(expand(argv, base=base, run=base / "run"))
    err = one_line_error(capsys, code)
    assert fragment.format(base=base) in err, err
    assert snapshot(base) == before


def test_names_too_long_or_leaving_runs_are_refused(base, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)         # the default run directory is runs/<name> here
    config = str(base / "tiny.yaml")
    code = main(["train", config, "--set", f"name={'n' * 300}"])
    err = one_line_error(capsys, code)
    assert "name is 300 bytes long" in err and "at most 255" in err, err
    for escaping in ("../../escaped", "..", "a/b", "a\\b"):
        code = main(["train", config, "--set", f"name={escaping}"])
        err = one_line_error(capsys, code)
        assert f"name={escaping!r}" in err and "--run-dir" in err, err
    code = main(["train", config, "--run-dir", str(tmp_path / ("d" * 300))])
    err = one_line_error(capsys, code)
    assert "--run-dir: the name" in err and "300 bytes long" in err, err
    assert list(tmp_path.iterdir()) == [] and not (base.parent / "escaped").exists()


def test_the_path_checks_themselves(tmp_path):
    assert paths.check_output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()                     # checking creates nothing
    (tmp_path / "f.json").write_text("{}")
    assert paths.check_output_file(tmp_path / "f.json", "--json", (".json",)) == tmp_path / "f.json"
    with pytest.raises(OutputError, match="--json .* is a directory"):
        paths.check_output_file(tmp_path, "--json")
    with pytest.raises(OutputError, match="is a file; give a directory"):
        paths.check_output_dir(tmp_path / "f.json", "--out")
    assert paths.check_run_name("sit-xl2 run.3") == "sit-xl2 run.3"
    for bad in ("x\x00y", "tab\there", "../up"):
        with pytest.raises(ConfigError):
            paths.check_run_name(bad)
    paths.write_text(tmp_path / "f.json", '{"a": 1}', "--json")
    assert json.loads((tmp_path / "f.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]   # no temporary file left


def test_a_full_disk_while_writing_a_small_output_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "out.json").write_text("old")

    def full(self, text, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match=r"--json .*No space left on device; free some space"):
        paths.write_text(tmp_path / "out.json", "new", "--json")
    monkeypatch.undo()
    assert (tmp_path / "out.json").read_text() == "old"         # the previous file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(FileNotFoundError):                       # not a failed write: left alone
        with paths.writing(tmp_path, "--out"):
            open(tmp_path / "missing" / "input")


# -- lost or replaced data --------------------------------------------------------------------
def set_format(ckpt: Path, version) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    state["format"] = version
    (ckpt / "state.json").write_text(json.dumps(state))


def damage(ckpt: Path, how: str) -> None:
    if how == "truncated":
        with open(ckpt / "model.safetensors", "r+b") as f:
            f.truncate(100)
    elif how == "header-bit-flip":          # the header length's high byte: "header too large"
        data = bytearray((ckpt / "ema.safetensors").read_bytes())
        data[6] ^= 0x01
        (ckpt / "ema.safetensors").write_bytes(bytes(data))
    elif how == "tensor-name-bit-flip":     # still a valid header, but a tensor renamed
        data = bytearray((ckpt / "model.safetensors").read_bytes())
        data[data.index(b'"x_embedder') + 1] ^= 0x01
        (ckpt / "model.safetensors").write_bytes(bytes(data))
    elif how == "random-optimizer":         # same size, random bytes
        size = (ckpt / "optimizer.pt").stat().st_size
        (ckpt / "optimizer.pt").write_bytes(np.random.default_rng(0).bytes(size))
    elif how == "garbage-state":
        (ckpt / "state.json").write_text("{not json")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "header-bit-flip", "tensor-name-bit-flip", "random-optimizer",
                                 "garbage-state"])
def test_every_kind_of_damage_leads_to_the_same_fallback(run_copy, how):
    newest = ckpt_io.checkpoints_dir(run_copy) / STEP2
    damage(newest, how)
    assert ckpt_io.verify(newest) is not None
    reports = []
    assert ckpt_io.latest_checkpoint(run_copy, report=reports.append).name == STEP1
    assert len(reports) == 1 and STEP2 in reports[0] and reports[0].endswith(f"using the older {STEP1}")
    with pytest.raises(ckpt_io.CheckpointError):       # named directly, it is refused, not replaced
        ckpt_io.resolve_checkpoint(newest)


def test_resume_auto_refuses_a_checkpoint_of_another_format(run_copy, capsys, base):
    newest = ckpt_io.checkpoints_dir(run_copy) / STEP2
    set_format(newest, 2)
    before = snapshot(run_copy)
    code = main(["train", str(base / "tiny.yaml"), "--run-dir", str(run_copy), "--resume", "auto",
                 "--set", "train.total_kimg=0.032"])
    err = one_line_error(capsys, code)
    assert "has checkpoint format 2 but this selfalign reads format 1" in err, err
    assert f"move {STEP2} out of" in err
    assert snapshot(run_copy) == before                 # not skipped, not replaced


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(run_copy, capsys, base):
    for ckpt in ckpt_io.list_checkpoints(run_copy):
        damage(ckpt, "random-optimizer")
    before = snapshot(run_copy)
    config = str(base / "tiny.yaml")
    code = main(["train", config, "--run-dir", str(run_copy), "--resume", "auto"])
    err = one_line_error(capsys, code)
    assert "every checkpoint in" in err and "is damaged" in err and "new --run-dir" in err, err
    code = main(["train", config, "--run-dir", str(run_copy)])       # nor a fresh start over it
    err = one_line_error(capsys, code)
    assert f"already has checkpoints ({STEP2})" in err, err
    assert snapshot(run_copy) == before                 # metrics.jsonl and checkpoints untouched


def test_a_fresh_start_never_truncates_an_existing_metrics_log(base, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(base / "run" / "metrics.jsonl", run / "metrics.jsonl")     # a run killed before its first checkpoint
    before = snapshot(run)
    code = main(["train", str(base / "tiny.yaml"), "--run-dir", str(run)])
    err = one_line_error(capsys, code)
    assert "already holds metrics.jsonl" in err and "--resume auto" in err, err
    assert snapshot(run) == before


def test_a_damaged_newest_checkpoint_is_skipped_aloud_and_kept(run_copy, capsys, base):
    newest = ckpt_io.checkpoints_dir(run_copy) / STEP2
    damage(newest, "truncated")
    damaged = {p.name: p.read_bytes() for p in newest.iterdir()}
    code = main(["train", str(base / "tiny.yaml"), "--run-dir", str(run_copy), "--resume", "auto"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"skipping damaged checkpoint {STEP2}" in out and f"using the older {STEP1}" in out, out
    assert f"{STEP2} (not written by this run) is kept as" in out
    aside = ckpt_io.checkpoints_dir(run_copy) / f"{STEP2}.superseded"
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == damaged
    assert ckpt_io.verify(newest) is None               # written again by this run


# -- silent fallbacks -------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["sample", "{run}", "--out", "{tmp}/samples", "-n", "2", "--steps", "2", "--device", "cpu", "--no-progress"],
    ["eval", "pca", "{run}", "--out", "{tmp}/pca.png", "--count", "1", "--t", "0.5", "--layers", "1",
     "--device", "cpu"],
    ["convert", "export", "{run}", "{tmp}/exported.safetensors", "--to", "sit"],
], ids=["sample", "eval-pca", "convert-export"])
def test_a_fallback_to_an_older_checkpoint_is_said_on_stderr(run_copy, tmp_path, capsys, argv):
    damage(ckpt_io.checkpoints_dir(run_copy) / STEP2, "header-bit-flip")
    code = main(expand(argv, run=run_copy, tmp=tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping damaged checkpoint")]
    assert len(warnings) == 1, err
    assert STEP2 in warnings[0] and "ema.safetensors cannot be read" in warnings[0]
    assert warnings[0].endswith(f"using the older {STEP1}")


# -- other one-line cases ---------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_prepare_on_cuda_without_cuda_is_one_line(base, tmp_path, capsys):
    code = main(["prepare", str(base / "fmnist"), str(tmp_path / "latents"), "--device", "cuda"])
    err = one_line_error(capsys, code)
    assert "--device" in err and "no CUDA device" in err and "use cpu" in err, err
    assert not (tmp_path / "latents").exists()


def test_a_classifier_that_is_not_safetensors_is_one_line(base, tmp_path, capsys):
    (tmp_path / "weights.safetensors").write_bytes(np.random.default_rng(1).bytes(5000))
    for weights in (tmp_path / "weights.safetensors", base / "tiny.yaml"):
        code = main(["eval", "indomain", str(base / "samples.npz"), "--classifier", str(weights),
                     "--device", "cpu"])
        err = one_line_error(capsys, code)
        assert f"classifier weights {weights} are not a readable safetensors file" in err, err
