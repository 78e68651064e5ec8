"""Bad input, table-driven: every bad config and CLI call ends with exactly one line on stderr,
exit code 2, no traceback, and nothing written or changed on disk (no half-made run or output
directory; an existing run or checkpoint untouched). Rows run in-process through
``selfalign.cli.main``; a few also as real processes for the real exit code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfalign.cli import main
from conftest import load_kill_harness, one_thread

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--set", "logging.progress_bar=false", "--set", "train.device=cpu"]
TRAIN = ["train", "fmnist-cpu-tiny-sra", "--run-dir", "{run}", *QUIET]


def S(*pairs):
    """``S("train.lr=-1", ...)`` -> ``["--set", "train.lr=-1", ...]``."""
    return [arg for pair in pairs for arg in ("--set", pair)]


# (id, argv, a fragment the one line must hold, environment)
ROWS = [
    # config files and presets
    ("unknown-preset", ["train", "no-such-preset", "--run-dir", "{run}"], "neither a config file nor a preset", {}),
    ("missing-config-file", ["train", "{tmp}/missing.yaml", "--run-dir", "{run}"], "not found", {}),
    ("invalid-yaml", ["train", "{files}/invalid.yaml", "--run-dir", "{run}"], "is not valid YAML at line", {}),
    ("yaml-not-a-mapping", ["train", "{files}/list.yaml", "--run-dir", "{run}"], "must hold a mapping", {}),
    ("no-config-given", ["train", "--run-dir", "{run}"], "give a config file or preset name", {}),
    ("binary-config-file", ["train", "{files}/binary.yaml", "--run-dir", "{run}"], "binary.yaml", {}),
    ("section-not-a-mapping", [*TRAIN, *S("model=3")], "model: expected a mapping", {}),
    # keys and types
    ("unknown-key", [*TRAIN, *S("train.lrr=1")], "train.lrr: unknown key", {}),
    ("unknown-section", [*TRAIN, *S("trian.lr=1")], "trian: unknown key", {}),
    ("wrong-type-int", [*TRAIN, *S("train.batch_size=abc")], "train.batch_size: expected an integer", {}),
    ("wrong-type-bool", [*TRAIN, *S("data.hflip=maybe")], "data.hflip: expected true or false", {}),
    ("override-without-value", [*TRAIN, "--set", "train.lr"], "expected KEY=VALUE", {}),
    # model, objective, regularizers
    ("unknown-model-preset", [*TRAIN, *S("model.preset=SiT-Q/2")], "model.preset", {}),
    ("objective-typo", [*TRAIN, *S("objective.kind=flwo")], "objective.kind", {}),
    ("input-size-mismatch", [*TRAIN, *S("model.input_size=16")], "model.input_size=16 does not match", {}),
    ("unknown-regularizer", [*TRAIN, *S("regularizers.sraa.weight=1")], "regularizers.sraa: unknown regularizer", {}),
    ("student-deeper-than-teacher", [*TRAIN, *S("regularizers.sra.student_layer=5",
                                                "regularizers.sra.teacher_layer=3")],
     "regularizers.sra.student_layer=5 is deeper than", {}),
    ("layer-beyond-depth", [*TRAIN, *S("regularizers.sra.teacher_layer=9")], "beyond the model depth 6", {}),
    ("layer-zero", [*TRAIN, *S("regularizers.sra.student_layer=0")], "student_layer must be >= 1", {}),
    ("k-max-above-1", [*TRAIN, *S("regularizers.sra.k_max=1.5")], "regularizers.sra.k_max must be in [0, 1]", {}),
    ("k-max-negative", [*TRAIN, *S("regularizers.sra.k_max=-0.1")], "regularizers.sra.k_max must be in [0, 1]", {}),
    ("regularizer-not-a-mapping", [*TRAIN, *S("regularizers.sra=5")], "regularizers.sra: expected a mapping", {}),
    ("regularizer-wrong-type", [*TRAIN, *S("regularizers.sra.k_max=abc")], "regularizers.sra.k_max: expected a number", {}),
    # training settings
    ("zero-batch", [*TRAIN, *S("train.batch_size=0")], "train.batch_size must be > 0", {}),
    ("negative-lr", [*TRAIN, *S("train.lr=-1e-4")], "train.lr must be > 0", {}),
    ("bad-precision", [*TRAIN, *S("train.precision=fp8")], "train.precision: expected one of 'fp32'", {}),
    ("nonfinite-policy-typo", [*TRAIN, *S("train.nonfinite=ignore")], "train.nonfinite: expected one of 'skip'", {}),
    ("zero-consecutive-bad", [*TRAIN, *S("train.max_consecutive_bad=0")], "train.max_consecutive_bad must be > 0", {}),
    ("ema-decay-above-1", [*TRAIN, *S("train.ema_decay=1.5")], "train.ema_decay must be in [0, 1]", {}),
    ("betas-out-of-range", [*TRAIN, *S("train.betas=[0.9, 1.0]")], "train.betas must be two numbers", {}),
    ("negative-micro-batch", [*TRAIN, *S("train.micro_batch=-2")], "train.micro_batch must be >= 0", {}),
    ("unknown-device", [*TRAIN, "--set", "train.device=tpu"], "train.device='tpu'", {}),
    ("batch-not-divisible-by-processes", [*TRAIN, *S("train.batch_size=64")],
     "train.batch_size=64 is not divisible by the number of processes (3)", {"WORLD_SIZE": "3"}),
    # data
    ("unknown-data-kind", [*TRAIN, *S("data.kind=tfrecords")], "data.kind: expected one of 'fashion_mnist'", {}),
    ("resolution-odd-for-fmnist", [*TRAIN, *S("data.resolution=29")], "data.resolution=29", {}),
    ("resolution-not-divisible-by-patch", [*TRAIN, *S("data.resolution=30")],
     "data.resolution=30 is not divisible by the patch size 4", {}),
    ("resolution-not-divisible-by-vae-x-patch", [*TRAIN, *S("data.kind=latents", "data.path={tmp}",
                                                             "data.resolution=72", "model.preset=SiT-T/2")],
     "not divisible by VAE factor 8 x patch 2 = 16", {}),
    ("missing-image-folder", [*TRAIN, *S("data.kind=imagefolder", "data.path={tmp}/no-images",
                                          "data.resolution=32")], "does not exist", {}),
    ("missing-fashion-mnist", [*TRAIN, *S("data.path={tmp}/no-fmnist")], "Fashion-MNIST not found", {}),
    ("latents-not-prepared", [*TRAIN, *S("data.kind=latents", "data.path={files}", "data.resolution=32",
                                          "model.preset=SiT-T/2")], "is not a prepared latent dataset", {}),
    ("channels-mismatch", [*TRAIN, *S("data.path={fm}", "model.in_channels=3")],
     "model.in_channels=3 but the data has 1 channels", {}),
    ("too-few-classes", [*TRAIN, *S("data.path={fm}", "model.num_classes=5")],
     "the data has 10 classes but model.num_classes=5", {}),
    # sampler (training grids)
    ("sampler-name-typo", [*TRAIN, *S("sampler.name=eulr")], "sampler.name: expected one of 'euler'", {}),
    ("guidance-interval-reversed", [*TRAIN, *S("sampler.guidance_low=0.8", "sampler.guidance_high=0.2")],
     "sampler.guidance_low=0.8 > sampler.guidance_high", {}),
    # resuming
    ("checkpoint-of-another-preset", ["train", "{files}/tiny.yaml", "--run-dir", "{run}", "--resume", "{ckpt}",
                                      *S("model.preset=SiT-S/8")], "model.preset is 'SiT-T/8' in the checkpoint", {}),
    ("checkpoint-of-another-run", ["train", "{files}/tiny.yaml", "--run-dir", "{run}", "--resume", "{ckpt}",
                                   *S("train.lr=0.5")], "train.lr is 0.001 in the checkpoint but 0.5 now", {}),
    ("resume-path-missing", ["train", "{files}/tiny.yaml", "--run-dir", "{run}", "--resume", "{tmp}/nowhere"],
     "does not exist", {}),
    ("resume-incomplete-checkpoint", ["train", "{files}/tiny.yaml", "--run-dir", "{run}", "--resume",
                                      "{files}/checkpoints/step-000000009"], "not a complete checkpoint", {}),
    ("resume-a-file", ["train", "{files}/tiny.yaml", "--run-dir", "{run}", "--resume", "{files}/tiny.yaml"],
     "holds no complete checkpoint", {}),
    ("run-dir-is-a-file", ["train", "{files}/tiny.yaml", "--run-dir", "{files}/list.yaml"], "is a file", {}),
    ("existing-run-without-resume", ["train", "{files}/tiny.yaml", "--run-dir", "{trained}"],
     "pass --resume auto to continue it", {}),
    # other commands with missing or bad paths
    ("sample-missing-checkpoint", ["sample", "{tmp}/no-run", "--out", "{out}", "-n", "4"], "does not exist", {}),
    ("sample-zero-count", ["sample", "{trained}", "--out", "{out}", "-n", "0"], "num", {}),
    ("sample-sampler-typo", ["sample", "{trained}", "--out", "{out}", "-n", "4", "--sampler", "eulr"],
     "sampler.name: expected one of 'euler'", {}),
    ("sample-guidance-reversed", ["sample", "{trained}", "--out", "{out}", "-n", "4",
                                  "--guidance-interval", "0.7", "0.1"], "sampler.guidance_low=0.7 >", {}),
    ("eval-ref-missing-source", ["eval", "ref", "{tmp}/no-images", "--out", "{tmp}/ref.npz"], "no-images", {}),
    ("eval-indomain-missing-samples", ["eval", "indomain", "{tmp}/no-samples.npz", "--device", "cpu"],
     "no-samples.npz", {}),
    ("prepare-missing-source", ["prepare", "{tmp}/no-images", "{out}", "--device", "cpu", "--no-progress"],
     "no-images", {}),
    ("convert-import-missing-file", ["convert", "import", "{tmp}/no.pt", "{out}", "--from", "sit"], "no.pt", {}),
    ("demo-out-is-a-file", ["demo", "--smoke", "--out", "{files}/list.yaml", "--device", "cpu"], "is a file", {}),
    ("convert-export-missing-run", ["convert", "export", "{tmp}/no-run", "{tmp}/out.pt", "--to", "sit"],
     "does not exist", {}),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Shared inputs: bad YAML files, a tiny config, a trained 2-step run and its checkpoint."""
    import yaml

    from selfalign.config.experiment import load_config
    from selfalign.training.trainer import train

    base = tmp_path_factory.mktemp("inputs")
    fm = load_kill_harness().make_data(base / "fmnist", count=64)
    (base / "invalid.yaml").write_text("model:\n  preset: [SiT-T/8\n")
    (base / "list.yaml").write_text("- model\n- train\n")
    (base / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    tiny = {"model": {"preset": "SiT-T/8"}, "regularizers": {"sra": {}},
            "data": {"kind": "fashion_mnist", "path": str(fm)},
            "train": {"batch_size": 8, "total_kimg": 0.016, "log_every_kimg": 0.008, "ckpt_every_kimg": 0.016,
                      "device": "cpu", "lr": 1e-3},
            "logging": {"tensorboard": False, "progress_bar": False}}
    (base / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    trained = base / "trained"
    with one_thread():
        train(load_config(tiny), trained, log=lambda _m: None)
    (base / "checkpoints" / "step-000000009").mkdir(parents=True)      # incomplete: no state.json
    return {"files": base, "fm": fm, "trained": trained,
            "ckpt": trained / "checkpoints" / "step-000000002"}


def snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            stat = path.stat()
            out[str(path)] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return out


def expand(argv, paths):
    return [arg.format(**paths) for arg in argv]


@pytest.mark.parametrize("argv, fragment, env", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, files, argv, fragment,
                                                          env):
    paths = {**{k: str(v) for k, v in files.items()}, "tmp": str(tmp_path), "run": str(tmp_path / "run"),
             "out": str(tmp_path / "out")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = snapshot(tmp_path, files["files"])
    code = main(expand(argv, paths))
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, captured
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("selfalign ") and ": error: " in err, err
    assert fragment.format(**paths) in err, err
    assert snapshot(tmp_path, files["files"]) == before         # nothing made, nothing changed


def test_the_table_has_at_least_30_rows_with_distinct_messages():
    assert len(ROWS) >= 30
    assert len({row[0] for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ["invalid-yaml", "k-max-above-1", "sample-missing-checkpoint"])
def test_real_processes_exit_2_with_one_line(tmp_path, files, row):
    _, argv, fragment, env = next(r for r in ROWS if r[0] == row)
    paths = {**{k: str(v) for k, v in files.items()}, "tmp": str(tmp_path), "run": str(tmp_path / "run"),
             "out": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, "-m", "selfalign.cli", *expand(argv, paths)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and fragment in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
