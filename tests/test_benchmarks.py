"""The benchmarks' CPU dry run, stage by stage, as ``benchmarks/gpu/run.sh --tiny`` runs it: every
script runs at its smallest size in a subprocess, writes valid JSON with the rows it promises, and
the closing table reads it. Timing is never asserted."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import load_kill_harness

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300         # a hang, not a slow machine: each stage takes seconds of CPU time
BASE_ROWS = {"vanilla", "sra", "sra_released", "teacher_only"}
# Eager toggles of train_step_rows.TOGGLES; sra_adam_foreach is left out on a CPU, where foreach
# already is the trainer's AdamW kernel (the base row's).
EAGER_TOGGLES = {"sra_sdpa_math", "sra_sdpa_flash", "sra_sdpa_efficient", "sra_sdpa_cudnn", "sra_adam_fused",
                 "sra_ema_loop", "sra_full_teacher", "sra_teacher_fp32", "sra_teacher_fp8", "teacher_only_fp8",
                 "sra_grad_checkpointing", "sra_teacher_fraction_0.5"}


def run_stage(stage: str, out: Path, **env) -> tuple[str, dict[str, dict]]:
    """``run.sh --tiny --stages=STAGE``: its output and every JSON it wrote, by file name."""
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--tiny", f"--stages={stage}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    log = (out / "run.log").read_text() if (out / "run.log").is_file() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-3000:]
    return done.stdout, {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}


def only(results: dict[str, dict], prefix: str) -> dict:
    names = [n for n in results if n.startswith(prefix)]
    assert len(names) == 1, sorted(results)
    return results[names[0]]


def test_train_step_dry_run_times_every_eager_row(tmp_path):
    stdout, results = run_stage("xl2", tmp_path)
    data = only(results, "train_step_dry")
    rows = data["rows"]
    assert data["benchmark"] == "train_step" and data["settings"]["preset"] == "dry"
    assert set(rows) == BASE_ROWS | EAGER_TOGGLES
    for name, row in rows.items():
        if name in ("sra_sdpa_flash", "sra_sdpa_efficient", "sra_sdpa_cudnn"):   # kernels a CPU may lack
            assert row["status"] == "ok" or row["status"].startswith("failed: "), name
        elif "fp8" in name:                     # the CPU build may lack fp8 matmuls: skipped, with why
            assert row["status"] == "ok" or row["status"].startswith("skipped: "), name
        else:
            assert row["status"] == "ok", (name, row["status"])
        if row["status"] == "ok":
            assert row["n"] == len(row["samples_ms"]) >= 1 and row["median_ms"] > 0
            assert row["model_tflops_per_step"] > 0
    assert data["analysis"]["lines"] and data["analysis"]["sra_over_vanilla"] > 0
    assert "== train step dry" in stdout          # the closing table read it


def test_trainer_check_tiny_trains_resumes_and_samples(tmp_path):
    data_dir = load_kill_harness().make_data(tmp_path / "fmnist", count=64)
    stdout, results = run_stage("trainer_check", tmp_path / "out", SELFALIGN_FASHION_MNIST=str(data_dir))
    data = results["trainer_check_dry.json"]
    assert data["checks"] == {name: True for name in (
        "train", "checkpoints_written", "resume", "resume_continues_from_checkpoint", "losses_finite",
        "loss_falls", "sample", "samples_shape_and_range")}
    assert data["all_passed"] and data["dry_run"]
    assert [r["step"] for r in data["train_records"]] == [1, 2, 3, 4, 5, 6]
    assert data["first_run_records"] == 4
    assert all(c["status"].startswith("skipped") for c in data["controls"].values())
    assert "== trainer check" in stdout and "all checks passed" in stdout


def test_sampling_dry_run_counts_guided_calls(tmp_path):
    stdout, results = run_stage("sampling", tmp_path)
    rows = only(results, "sampling_dry")["rows"]
    assert set(rows) == {"euler5", "euler5_cfg", "euler5_cfg_interval", "sde25", "sde25_cfg_interval"}
    for name, row in rows.items():
        assert row["status"] == "ok" and row["images_per_s"] > 0, name
        assert row["calls"] == (25 if name.startswith("sde") else 5)
        # a guided call evaluates every image twice (conditional and null label)
        assert row["network_images_per_image"] == row["calls"] + row["guided_calls"]
    assert rows["euler5"]["guided_calls"] == rows["sde25"]["guided_calls"] == 0
    assert rows["euler5_cfg"]["guided_calls"] == 5
    assert 0 < rows["euler5_cfg_interval"]["guided_calls"] < 5
    assert 0 < rows["sde25_cfg_interval"]["guided_calls"] < 25
    assert "== sampling dry" in stdout


def test_vae_encode_dry_run(tmp_path):
    pytest.importorskip("diffusers")
    stdout, results = run_stage("vae", tmp_path)
    data = results["vae_encode_dry.json"]
    assert data["dry_run"] and set(data["rows"]) == {"bf16-b2", "fp32-b2"}
    for row in data["rows"].values():
        assert row["status"] == "ok" and row["images_per_s"] > 0 and row["n"] == 2
    assert "== vae_encode_dry.json" in stdout
