#!/usr/bin/env python
"""Kill-anywhere harness: SIGKILL a short CPU training run many times, resume it with
``--resume auto`` each time, and prove nothing was lost or corrupted.

    python scripts/kill_harness.py --kills 20            # the documented full run (docs/RELIABILITY.md)
    python scripts/kill_harness.py --kills 5 --steps 16 --launcher fork   # what CI runs (tests/test_reliability_kill.py)

The run: SiT-T/8 + SRA on a 256-image slice of Fashion-MNIST (32 px, 16 tokens), global batch 8
in micro-batches of 4, random flips, fp32, one process with one thread; a metrics record every
step, a checkpoint every 2 steps, the newest 2 kept. First an uninterrupted reference run keeps
every checkpoint; then the same run is started again and again, each time killed (SIGKILL) at
a point drawn from: inside a step (after backward, before the optimizer), after any file of a
checkpoint, before its rename, after it, while an old checkpoint is pruned, halfway through a
metrics line (``selfalign.formats.faults``), or at a random moment after training started.

After every attempt every checkpoint directory is audited: complete by ``verify``, and its
weights, EMA, regularizer and optimizer tensors, RNG states and data position bitwise equal to
the reference checkpoint of that step. The metrics log may end in one torn line (the kill) but
never holds a step twice, and every record equals the reference's (timing fields aside). At the
end: final state bitwise equal, each step logged exactly once, no temporary directory left.
Exit code 0 and ``PASS`` when all of that holds; 1 and the first violation otherwise.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CKPT_EVERY = 2              # steps
BATCH = 8
DATA_SIZE = 256             # 32 steps per epoch: long runs cross epochs
TIMING_KEYS = ("img_per_s", "peak_mem_mb")
# (fault point, largest N): counts chosen so one attempt makes a few steps of progress at most.
NAMED_FAULTS = {"step": 5, "ckpt_file": 8, "ckpt_rename": 2, "ckpt_done": 2, "ckpt_prune": 2,
                "metrics_write": 5}
KINDS = (*NAMED_FAULTS, "timer")


class HarnessFailure(AssertionError):
    """A reliability property was violated; the message says which and where."""


# -- the run ---------------------------------------------------------------------------------
def make_data(folder: Path, count: int = DATA_SIZE) -> Path:
    """The first ``count`` Fashion-MNIST training images as IDX files (fast to load)."""
    from selfalign.data.fashion_mnist import FILES, resolve_dir

    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES["train"]:
        with gzip.open(resolve_dir() / name, "rb") as f:    # only the head: header + `count` items
            ndim = f.read(4)[3]
            dims = [int.from_bytes(f.read(4), "big") for _ in range(ndim)]
            item = 1
            for d in dims[1:]:
                item *= d
            body = f.read(count * item)
        header = bytes([0, 0, 8, ndim]) + b"".join(d.to_bytes(4, "big") for d in [count, *dims[1:]])
        with gzip.open(folder / name, "wb", compresslevel=1) as f:
            f.write(header + body)
    return folder


def make_config(path: Path, data: Path, steps: int) -> Path:
    import yaml

    kimg = BATCH / 1000
    config = {
        "name": "kill-harness",
        "model": {"preset": "SiT-T/8"},
        "objective": {"kind": "flow"},
        "regularizers": {"sra": {}},
        "data": {"kind": "fashion_mnist", "path": str(data), "resolution": 32, "hflip": True},
        "train": {"batch_size": BATCH, "micro_batch": 4, "lr": 1e-3, "ema_decay": 0.9, "device": "cpu",
                  "total_kimg": steps * kimg, "log_every_kimg": kimg, "ckpt_every_kimg": CKPT_EVERY * kimg,
                  "keep_last": 2, "seed": 0},
        "sampler": {"name": "euler", "steps": 2},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _fork_child(argv: list[str], log: Path, fault: str | None) -> None:
    """Child of the fork launcher: the CLI in this (already imported) interpreter."""
    import torch

    from selfalign import cli
    from selfalign.formats import faults

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.pop(faults.ENV_VAR, None)
    if fault:
        os.environ[faults.ENV_VAR] = fault
    faults._passes.clear()
    torch.set_num_threads(1)
    code = 1
    try:
        code = cli.main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Launcher:
    """Starts ``selfalign train`` as a fresh interpreter (``exec``) or a fork of this one (``fork``)."""

    def __init__(self, kind: str):
        self.kind = kind

    def start(self, argv: list[str], log: Path, fault: str | None):
        if self.kind == "exec":
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
            env.pop("SELFALIGN_FAULT", None)
            if fault:
                env["SELFALIGN_FAULT"] = fault
            with open(log, "ab") as out:
                return subprocess.Popen([sys.executable, "-m", "selfalign.cli", *argv], stdout=out,
                                        stderr=subprocess.STDOUT, env=env)
        import multiprocessing
        process = multiprocessing.get_context("fork").Process(target=_fork_child, args=(argv, log, fault))
        process.start()
        return process

    @staticmethod
    def alive(process) -> bool:
        return process.poll() is None if isinstance(process, subprocess.Popen) else process.is_alive()

    @staticmethod
    def wait(process, timeout: float) -> int:
        """The exit code; ``-9`` for SIGKILL."""
        if isinstance(process, subprocess.Popen):
            try:
                return process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise HarnessFailure(f"a training process hung for {timeout:.0f} s") from None
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise HarnessFailure(f"a training process hung for {timeout:.0f} s")
        return process.exitcode


def run_once(launcher: Launcher, argv, log: Path, fault: str | None = None, kill_after: float | None = None,
             timeout: float = 600) -> int:
    """One attempt; with ``kill_after`` the harness itself sends SIGKILL that long after the
    trainer printed its start line."""
    start = log.stat().st_size if log.exists() else 0
    process = launcher.start(argv, log, fault)
    if kill_after is not None:
        deadline = time.monotonic() + timeout
        while launcher.alive(process) and time.monotonic() < deadline:
            if b"training " in log.read_bytes()[start:]:
                time.sleep(kill_after)
                if launcher.alive(process):
                    os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    return launcher.wait(process, timeout)


# -- the audit ---------------------------------------------------------------------------------
def _load_checkpoint(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    from selfalign.formats.checkpoint import TENSOR_FILES, load_optimizer_state, read_state

    out = {name: load_file(str(ckpt / f"{name}.safetensors")) for name in TENSOR_FILES}
    out["optimizer"] = load_optimizer_state(ckpt)
    out["state"] = read_state(ckpt)
    return out


def _same(a, b) -> bool:
    import torch

    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def compare_checkpoints(ckpt: Path, reference: Path) -> None:
    """Raise unless ``ckpt`` holds bitwise the reference state of its step."""
    import torch

    got, want = _load_checkpoint(ckpt), _load_checkpoint(reference)
    for group in ("model", "ema", "regularizers", "optimizer"):
        if not _same(got[group], want[group]):
            raise HarnessFailure(f"{ckpt}: {group} differs from the uninterrupted run")
    for group in ("model", "ema"):
        bad = [k for k, v in got[group].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise HarnessFailure(f"{ckpt}: {group} {bad[0]} holds NaN/Inf")
    for key in ("step", "images", "data", "nonfinite", "world_size"):
        if got["state"].get(key) != want["state"].get(key):
            raise HarnessFailure(f"{ckpt}: state.json {key!r} differs from the uninterrupted run")
    # The streams the trainer draws from (NumPy's and Python's global generators are saved too,
    # but the trainer does not seed them, so two fresh runs start them differently).
    for rank, (a, b) in enumerate(zip(got["state"]["rng"], want["state"]["rng"])):
        for key in ("step_generator", "torch", "cuda"):
            if a.get(key) != b.get(key):
                raise HarnessFailure(f"{ckpt}: state.json rng[{rank}].{key} differs from the uninterrupted run")


def audit(run_dir: Path, reference_dir: Path, reference_metrics: dict[int, dict], seen: set[str],
          final: bool = False) -> dict:
    """Check every checkpoint directory and the metrics log; returns counts for the report."""
    from selfalign.formats.checkpoint import PREFIX, TMP_PREFIX, checkpoints_dir, verify

    root = checkpoints_dir(run_dir)
    counts = {"checkpoints": 0, "leftover_tmp": 0}
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith(TMP_PREFIX):
            counts["leftover_tmp"] += 1     # never read by --resume auto; removed by the next save
            continue
        if not (entry.is_dir() and entry.name.startswith(PREFIX) and entry.name[len(PREFIX):].isdigit()):
            raise HarnessFailure(f"unexpected entry {entry} in the checkpoint folder")
        problem = verify(entry)
        if problem:
            raise HarnessFailure(f"half-written or corrupt checkpoint: {problem}")
        counts["checkpoints"] += 1
        key = f"{entry.name}:{(entry / 'state.json').stat().st_mtime_ns}"
        if key not in seen:                 # compare each written checkpoint once
            compare_checkpoints(entry, reference_dir / "checkpoints" / entry.name)
            seen.add(key)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number != len(lines) - 1 or final:
                raise HarnessFailure(f"{metrics} line {number + 1} is corrupt: {line[:60]!r}") from None
            counts["torn_last_line"] = 1    # the kill hit the metrics write; the resume drops it
    steps = [r["step"] for r in records if r.get("kind") == "train"]
    if steps != sorted(set(steps)):
        raise HarnessFailure(f"{metrics} holds a step twice or out of order: {steps}")
    for record in records:
        want = reference_metrics.get(record["step"])
        got = {k: v for k, v in record.items() if k not in TIMING_KEYS}
        if want is None or got != {k: v for k, v in want.items() if k not in TIMING_KEYS}:
            raise HarnessFailure(f"{metrics}: the record of step {record['step']} differs from the "
                                 f"uninterrupted run")
    if final:
        expected = sorted(reference_metrics)
        if steps != expected:
            raise HarnessFailure(f"{metrics} does not hold each step exactly once: {steps}")
        if counts["leftover_tmp"]:
            raise HarnessFailure(f"temporary checkpoint directories left in {root}")
    return counts


# -- the harness -------------------------------------------------------------------------------
def fault_plan(rng: random.Random, kills: int, kinds=KINDS) -> list[str]:
    """The kind of each kill: every kind once per round, in a shuffled order."""
    plan: list[str] = []
    while len(plan) < kills:
        round_ = list(kinds)
        rng.shuffle(round_)
        plan.extend(round_)
    return plan[:kills]


def draw_fault(rng: random.Random, kind: str, done: int, steps: int, valid: int,
               seconds_per_step: float) -> tuple[str | None, float | None]:
    """``(SELFALIGN_FAULT value, None)`` or ``(None, timer delay)`` for a run resumed at step
    ``done`` with ``valid`` checkpoints, drawn so that the kill lands before the run ends."""
    remaining = steps - done
    saves = len({s for s in range(done + 1, steps + 1) if s % CKPT_EVERY == 0} | {steps})
    prunes = saves - max(0, 3 - valid - 1)          # keep_last 2: a save prunes once 3 exist
    if kind == "ckpt_prune" and prunes < 1:
        kind = "ckpt_file"
    if kind == "timer":
        return None, rng.uniform(0.0, min(6, remaining / 2) * seconds_per_step)
    limit = {"step": remaining, "metrics_write": remaining, "ckpt_file": 4 * saves,
             "ckpt_rename": saves, "ckpt_done": saves, "ckpt_prune": prunes}[kind]
    return f"{kind}:{rng.randint(1, max(1, min(NAMED_FAULTS[kind], limit)))}", None


def run_harness(kills: int = 20, seed: int = 0, steps: int | None = None, workdir: str | Path | None = None,
                launcher: str = "exec", keep: bool = False, kinds=KINDS, log=print) -> dict:
    """The whole experiment; returns the report, raises :class:`HarnessFailure` on a violation."""
    from selfalign.formats.checkpoint import latest_checkpoint, list_checkpoints
    from selfalign.training.metrics import read_metrics

    steps = steps or 3 * kills + 10
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="kill-harness-", dir=workdir))
    launch = Launcher(launcher)
    began = time.perf_counter()
    try:
        config = make_config(base / "config.yaml", make_data(base / "data"), steps)
        reference, run_dir, log_file = base / "reference", base / "run", base / "train.log"
        code = run_once(launch, ["train", str(config), "--run-dir", str(reference),
                                 "--set", f"train.keep_last={steps}"], base / "reference.log")
        if code != 0:
            raise HarnessFailure(f"the reference run failed (exit {code}); see {base / 'reference.log'}")
        reference_metrics = {r["step"]: r for r in read_metrics(reference) if r.get("kind") == "train"}
        rates = sorted(r["img_per_s"] for r in reference_metrics.values())
        seconds_per_step = BATCH / rates[len(rates) // 2]
        seen: set[str] = set()
        argv = ["train", str(config), "--run-dir", str(run_dir), "--resume", "auto"]
        events, plan = [], fault_plan(rng, kills, kinds)
        killed = audited = 0
        while True:
            kind = plan[killed] if killed < kills else None
            before = latest_checkpoint(run_dir)
            fault, kill_after = None, None
            if kind is not None:
                done = int(before.name[len("step-"):]) if before else 0
                valid = len(list_checkpoints(run_dir))
                fault, kill_after = draw_fault(rng, kind, done, steps, valid, seconds_per_step)
            code = run_once(launch, argv, log_file, fault, kill_after)
            counts = audit(run_dir, reference, reference_metrics, seen, final=code == 0)
            audited += counts["checkpoints"]
            after = latest_checkpoint(run_dir)
            events.append({"fault": fault or (f"timer:{kill_after:.2f}s" if kill_after is not None else None),
                           "exit": code,
                           "resumed_from": before.name if before else None,
                           "newest_after": after.name if after else None, **counts})
            log(f"attempt {len(events):>2}: {events[-1]['fault'] or 'no fault':<18} exit {code:>3}  "
                f"{events[-1]['resumed_from'] or 'start'} -> {events[-1]['newest_after']}  "
                f"({counts['checkpoints']} checkpoints verified, {counts['leftover_tmp']} temp dirs)")
            if code == -signal.SIGKILL:
                killed += 1
                continue
            if code != 0:
                raise HarnessFailure(f"attempt {len(events)} exited with {code}; see {log_file}")
            if killed < kills:
                raise HarnessFailure(f"the run finished after only {killed} kills; use more --steps")
            break
        compare_checkpoints(latest_checkpoint(run_dir), latest_checkpoint(reference))
        report = {"result": "PASS", "kills": killed, "attempts": len(events), "steps": steps,
                  "launcher": launcher, "seed": seed, "checkpoint_audits": audited,
                  "distinct_checkpoints_compared": len(seen),
                  "kills_by_kind": {k: sum(1 for e in events if e["exit"] == -9 and
                                           (e["fault"] or "").startswith(k)) for k in KINDS},
                  "torn_metrics_lines_seen": sum(e.get("torn_last_line", 0) for e in events),
                  "wall_s": round(time.perf_counter() - began, 1), "events": events}
        return report
    finally:
        if keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs over the run (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="draws the fault points and timings")
    parser.add_argument("--steps", type=int, default=None, help="run length (default 3 x kills + 10)")
    parser.add_argument("--launcher", choices=("exec", "fork"), default="exec",
                        help="exec: a fresh `python -m selfalign.cli train` per attempt (default); "
                             "fork: fork this interpreter (faster start, same kills)")
    parser.add_argument("--workdir", default=None, help="where the temporary runs go (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the runs and logs")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        report = run_harness(args.kills, args.seed, args.steps, args.workdir, args.launcher, args.keep)
    except HarnessFailure as err:
        print(f"FAIL: {err}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in report.items() if k != "events"}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
