"""Distributed consistency (2 processes, gloo): ranks that start with different configs or would
resume from different steps all stop at start with the same one-line message and exit code 2,
before any step is taken or anything is written."""
from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from selfalign.config.experiment import load_config
from selfalign.formats.checkpoint import list_checkpoints
from selfalign.training.trainer import train
from conftest import load_kill_harness, one_thread

BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config file and a finished one-process run with checkpoints at steps 2 and 4."""
    harness = load_kill_harness()
    base = tmp_path_factory.mktemp("dist")
    config = {"model": {"preset": "SiT-T/8"}, "regularizers": {"sra": {}},
              "data": {"kind": "fashion_mnist", "path": str(harness.make_data(base / "data", count=64))},
              "train": {"batch_size": BATCH, "total_kimg": 4 * BATCH / 1000, "log_every_kimg": BATCH / 1000,
                        "ckpt_every_kimg": 2 * BATCH / 1000, "keep_last": 5, "device": "cpu", "lr": 1e-3},
              "logging": {"tensorboard": False, "progress_bar": False}}
    (base / "tiny.yaml").write_text(yaml.safe_dump(config))
    with one_thread():
        train(load_config(config), base / "run", log=lambda _m: None)
    return base


def _rank_main(argv: list[str], env: dict, log: str) -> None:
    """One rank: ``selfalign ...`` in a fork of this interpreter (no second torch import)."""
    from selfalign.cli import main

    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.stdout = open(os.devnull, "w")
    torch.set_num_threads(1)
    code = 1
    try:
        code = main(argv)
    finally:
        sys.stderr.flush()
        os._exit(code)


def run_ranks(argvs: list[list[str]], tmp_path: Path) -> list[tuple[int, str]]:
    """``(exit code, stderr)`` of each rank of a ``len(argvs)``-process gloo group."""
    context = multiprocessing.get_context("fork")
    port = str(free_port())
    procs = []
    for rank, argv in enumerate(argvs):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(argvs)),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        proc = context.Process(target=_rank_main, args=(argv, env, str(tmp_path / f"rank{rank}.err")))
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join(240)
    if any(proc.is_alive() for proc in procs):
        for proc in procs:
            proc.kill()
        pytest.fail("a rank hung instead of stopping")
    return [(proc.exitcode, (tmp_path / f"rank{rank}.err").read_text()) for rank, proc in enumerate(procs)]


def assert_all_stop_with_one_message(results, *fragments) -> str:
    lines = []
    for rank, (code, err) in enumerate(results):
        err = err.strip()
        assert code == 2, (rank, err)
        assert "\n" not in err and "Traceback" not in err, (rank, err)
        lines.append(err)
    assert len(set(lines)) == 1, lines           # every rank says the same one thing
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_ranks_with_different_configs_all_stop_with_one_message(setup, tmp_path):
    base = [str(setup / "tiny.yaml"), "--run-dir", str(tmp_path / "run")]
    results = run_ranks([["train", *base], ["train", *base, "--set", "train.lr=2e-3"]], tmp_path)
    assert_all_stop_with_one_message(results, "processes disagree on the config hash", "rank 0:", "rank 1:")
    assert not (tmp_path / "run").exists()


def test_ranks_resuming_from_different_steps_all_stop_with_one_message(setup, tmp_path):
    step2, step4 = list_checkpoints(setup / "run")[:2]
    base = ["train", str(setup / "tiny.yaml"), "--run-dir", str(tmp_path / "run"),
            "--set", f"train.total_kimg={8 * BATCH / 1000}"]
    results = run_ranks([[*base, "--resume", str(step4)], [*base, "--resume", str(step2)]], tmp_path)
    assert_all_stop_with_one_message(results, "processes disagree on the resume step", "rank 0: 4",
                                     "rank 1: 2")
    assert not (tmp_path / "run").exists()
    assert [p.name for p in list_checkpoints(setup / "run")] == ["step-000000002", "step-000000004"]
