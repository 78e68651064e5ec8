"""Bad values, table-driven: a number out of range, NaN or infinite, too large to allocate or to
fit 64 bits, in any flag of any command or any config key, ends with exactly one line on stderr
naming the flag or key, exit code 2, no traceback and nothing written. Then the checks behind the
table, one by one: the shared argument types, the typed loader's range rules, and the values that
reach the evaluation and checkpoint code (reference statistics, in-domain images, optimizer files,
metrics logs)."""
from __future__ import annotations

import argparse
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import load_kill_harness
from selfalign.cli import build_parser, main
from selfalign.errors import CheckpointError, ConfigError, DataError

pytestmark = pytest.mark.usefixtures("single_thread")
HAS_CUDA = torch.cuda.is_available()
TRAIN = ["train", "fmnist-cpu-tiny-sra", "--run-dir", "{run}", "--set", "train.device=cpu"]
HUGE = "99999999999999999999999999"


def S(*pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


# (id, argv, fragments the one line must hold)
ROWS = [
    # config keys: sizes, 64 bits, finiteness
    ("batch-size-beyond-64-bits", [*TRAIN, *S(f"train.batch_size={HUGE}")], ["train.batch_size", "64 bits"]),
    ("seed-beyond-64-bits", [*TRAIN, *S(f"train.seed={HUGE}")], ["train.seed", "64 bits"]),
    ("lr-nan", [*TRAIN, *S("train.lr=.nan")], ["train.lr: expected a finite number"]),
    ("lr-overflows-to-inf", [*TRAIN, *S("train.lr=1e999")], ["train.lr: expected a finite number"]),
    ("total-kimg-inf", [*TRAIN, *S("train.total_kimg=.inf")], ["train.total_kimg: expected a finite number"]),
    ("total-kimg-huge-integer", [*TRAIN, *S("train.total_kimg=1" + "0" * 400)], ["train.total_kimg"]),
    ("beta-nan", [*TRAIN, *S("train.betas=[.nan, 0.999]")], ["train.betas[0]: expected a finite number"]),
    ("sampler-cfg-nan", [*TRAIN, *S("sampler.cfg_scale=.nan")], ["sampler.cfg_scale: expected a finite number"]),
    ("regularizer-weight-inf", [*TRAIN, *S("regularizers.sra.weight=-.inf")],
     ["regularizers.sra.weight: expected a finite number"]),
    ("objective-lognormal-nan", [*TRAIN, *S("objective.lognormal_mean=.nan")], ["objective.lognormal_mean"]),
    ("batch-size-above-limit", [*TRAIN, *S("train.batch_size=2000000")],
     ["train.batch_size must be at most 1048576", "train.micro_batch"]),
    ("micro-batch-above-limit", [*TRAIN, *S("train.micro_batch=2000000")], ["train.micro_batch must be at most"]),
    ("eval-samples-above-limit", [*TRAIN, *S("train.eval_samples=100000000")], ["train.eval_samples"]),
    ("resolution-above-limit", [*TRAIN, *S("data.resolution=100000")], ["data.resolution must be in 1..8192"]),
    ("workers-above-limit", [*TRAIN, *S("data.num_workers=100000")], ["data.num_workers must be in 0..1024"]),
    ("classes-above-limit", [*TRAIN, *S("model.num_classes=100000000")], ["model.num_classes must be in 1..1048576"]),
    ("channels-above-limit", [*TRAIN, *S("model.in_channels=5000")], ["model.in_channels must be in 1..1024"]),
    ("sampler-eta-above-1", [*TRAIN, *S("sampler.eta=2")], ["sampler.eta must be in [0, 1]"]),
    ("sampler-steps-above-limit", [*TRAIN, *S("sampler.steps=1000000000")], ["sampler.steps must be in 1..100000"]),
    ("ddpm-timesteps-above-limit", [*TRAIN, *S("objective.kind=ddpm", "objective.num_timesteps=1000000000")],
     ["objective.num_timesteps must be in 2..100000"]),
    ("ddpm-respacing-typo", ["train", "dit-b2-256-sra", "--run-dir", "{run}",
                             *S("data.path={tmp}", "sampler.name=ddim", "sampler.respacing=ddim5O")],
     ["sampler.respacing 'ddim5O'"]),
    ("unused-objective-half-out-of-range", ["train", "dit-b2-256-sra", "--run-dir", "{run}",
                                            *S("data.path={tmp}", "objective.lognormal_std=-1")],
     ["objective.lognormal_std must be > 0"]),
    ("repa-projector-above-limit", ["train", "fmnist-cpu-tiny-repa", "--run-dir", "{run}",
                                    *S("regularizers.repa.projector_dim=10000000")],
     ["regularizers.repa.projector_dim must be in [1, 65536]"]),
    ("sra2-head-above-limit", ["train", "fmnist-cpu-tiny-sra2", "--run-dir", "{run}",
                               *S("regularizers.sra2.hidden_dim=10000000")], ["regularizers.sra2.hidden_dim"]),
    ("sra-decay-start-negative", [*TRAIN, *S("regularizers.sra.decay_start_epoch=-1")],
     ["regularizers.sra.decay_start_epoch must be >= 0"]),
    ("batch-larger-than-the-dataset", [*TRAIN, *S("data.path={fm}", "train.batch_size=128")],
     ["train.batch_size=128 is larger than the dataset (64 examples)", "at most 64"]),
    # user configs: what they must say
    ("empty-config", ["train", "{files}/empty.yaml", "--run-dir", "{out}"],
     ["empty.yaml' is empty", "model.preset", "data.kind", "base:"]),
    ("config-without-data", ["train", "{files}/model-only.yaml", "--run-dir", "{out}"],
     ["does not set data.kind", "fashion_mnist, imagefolder, latents"]),
    ("config-with-empty-sections", ["train", "{files}/empty-sections.yaml", "--run-dir", "{out}"],
     ["does not set model.preset or data.kind"]),
    # sample
    ("sample-cfg-nan", ["sample", "{run}", "--out", "{out}", "--cfg-scale", "nan"], ["--cfg-scale", "finite"]),
    ("sample-cfg-inf", ["sample", "{run}", "--out", "{out}", "--cfg-scale", "inf"], ["--cfg-scale", "finite"]),
    ("sample-cfg-negative", ["sample", "{run}", "--out", "{out}", "--cfg-scale", "-1"], ["--cfg-scale", ">= 0"]),
    ("sample-seed-beyond-64-bits", ["sample", "{run}", "--out", "{out}", "--seed", HUGE], ["--seed"]),
    ("sample-seed-negative", ["sample", "{run}", "--out", "{out}", "--seed", "-1"], ["--seed"]),
    ("sample-batch-zero", ["sample", "{run}", "--out", "{out}", "--batch-size", "0"], ["--batch-size"]),
    ("sample-batch-huge", ["sample", "{run}", "--out", "{out}", "--batch-size", HUGE], ["--batch-size"]),
    ("sample-count-huge", ["sample", "{run}", "--out", "{out}", "-n", HUGE], ["--num-samples"]),
    ("sample-steps-zero", ["sample", "{run}", "--out", "{out}", "--steps", "0"], ["--steps"]),
    ("sample-shard-size-zero", ["sample", "{run}", "--out", "{out}", "--shard-size", "0"], ["--shard-size"]),
    ("sample-guidance-above-1", ["sample", "{run}", "--out", "{out}", "--guidance-interval", "0", "1.5"],
     ["--guidance-interval", "[0, 1]"]),
    ("sample-rank-negative", ["sample", "{run}", "--out", "{out}", "--rank", "-1"], ["--rank"]),
    ("sample-steps-not-a-number", ["sample", "{run}", "--out", "{out}", "--steps", "ten"],
     ["--steps", "expected a whole number"]),
    ("sample-missing-out", ["sample", "{run}"], ["--out", "required"]),
    ("sample-missing-checkpoint", ["sample", "{tmp}/nowhere", "--out", "{out}"], ["checkpoint", "does not exist"]),
    # eval
    ("fid-batch-zero", ["eval", "fid", "{npz}", "--ref", "{npz}", "--batch-size", "0"], ["--batch-size"]),
    ("fid-limit-zero", ["eval", "fid", "{npz}", "--ref", "{npz}", "--limit", "0"], ["--limit", "two images"]),
    ("fid-limit-one", ["eval", "fid", "{npz}", "--ref", "{npz}", "--limit", "1"], ["--limit"]),
    ("fid-ref-limit-zero", ["eval", "fid", "{npz}", "--ref", "{npz}", "--ref-limit", "0"], ["--ref-limit"]),
    ("fid-missing-inception", ["eval", "fid", "{npz}", "--ref", "{npz}", "--inception", "{tmp}/no.pt"],
     ["--inception", "does not exist"]),
    ("fid-resolution-huge", ["eval", "fid", "{npz}", "--ref", "{npz}", "--resolution", HUGE], ["--resolution"]),
    ("fid-nan-reference", ["eval", "fid", "{npz}", "--ref", "{files}/nan-ref.npz", "--inception", "{net}",
                           "--device", "cpu", "--no-progress"], ["nan-ref.npz", "NaN", "eval ref"]),
    ("fid-four-channel-images", ["eval", "fid", "{files}/cmyk.npz", "--ref", "{npz}", "--inception", "{net}",
                                 "--device", "cpu", "--no-progress"], ["cmyk.npz", "4 channels"]),
    ("ref-pr-count-zero", ["eval", "ref", "{npz}", "--out", "{tmp}/r.npz", "--pr-count", "0"], ["--pr-count"]),
    ("ref-pr-count-below-neighbours", ["eval", "ref", "{npz}", "--out", "{tmp}/r.npz", "--pr-count", "3"],
     ["--pr-count 3", "at least 4"]),
    ("ref-limit-below-neighbours", ["eval", "ref", "{npz}", "--out", "{tmp}/r.npz", "--limit", "3"],
     ["--limit 3", "at least 4"]),
    ("indomain-limit-one", ["eval", "indomain", "{npz}", "--limit", "1"], ["--limit"]),
    ("indomain-missing-classifier", ["eval", "indomain", "{npz}", "--classifier", "{tmp}/no.safetensors"],
     ["--classifier", "does not exist"]),
    ("indomain-colour-images", ["eval", "indomain", "{files}/colour.npz", "--device", "cpu"], ["colour", "eval fid"]),
    ("indomain-wrong-size", ["eval", "indomain", "{files}/small.npz", "--device", "cpu"], ["8x8x1", "eval fid"]),
    ("indomain-labels-out-of-range", ["eval", "indomain", "{files}/bad-labels.npz", "--device", "cpu"],
     ["arr_1", "0..9"]),
    ("probe-epochs-negative", ["eval", "probe", "{run}", "--epochs", "-1"], ["--epochs", ">= 1"]),
    ("probe-t-above-1", ["eval", "probe", "{run}", "--t", "1.5"], ["--t", "noise level"]),
    ("probe-train-count-zero", ["eval", "probe", "{run}", "--train-count", "0"], ["--train-count"]),
    ("probe-seed-beyond-64-bits", ["eval", "probe", "{run}", "--seed", HUGE], ["--seed"]),
    ("pca-count-zero", ["eval", "pca", "{run}", "--count", "0"], ["--count"]),
    ("pca-t-nan", ["eval", "pca", "{run}", "--t", "0.1", "nan"], ["--t", "finite"]),
    ("cknna-topk-one", ["eval", "cknna", "{run}", "--topk", "1"], ["--topk"]),
    ("cknna-topk-not-below-count", ["eval", "cknna", "{run}", "--topk", "10", "--count", "11"],
     ["--topk 10", "--count - 1 (10)"]),
    ("cknna-target-t-negative", ["eval", "cknna", "{run}", "--target-t", "-0.1"], ["--target-t"]),
    # models, prepare, convert, demo
    ("models-input-size-zero", ["models", "--input-size", "0"], ["--input-size"]),
    ("models-classes-huge", ["models", "--num-classes", HUGE], ["--num-classes"]),
    ("prepare-batch-zero", ["prepare", "{tmp}", "{out}", "--batch-size", "0"], ["--batch-size"]),
    ("prepare-scale-nan", ["prepare", "{tmp}", "{out}", "--scale", "nan"], ["--scale", "finite"]),
    ("prepare-scale-zero", ["prepare", "{tmp}", "{out}", "--scale", "0"], ["--scale", "> 0"]),
    ("prepare-workers-negative", ["prepare", "{tmp}", "{out}", "--workers", "-1"], ["--workers"]),
    ("prepare-world-size-zero", ["prepare", "{tmp}", "{out}", "--world-size", "0"], ["--world-size"]),
    ("prepare-device-typo", ["prepare", "{tmp}", "{out}", "--device", "gpu"], ["--device", "auto, cpu, cuda"]),
    ("convert-input-size-zero", ["convert", "import", "{npz}", "{out}", "--from", "sit", "--input-size", "0"],
     ["--input-size"]),
    ("convert-missing-source", ["convert", "import", "{tmp}/no.pt", "{out}", "--from", "sit"],
     ["source", "does not exist"]),
    ("demo-device-typo", ["demo", "--smoke", "--out", "{out}", "--device", "tpu"], ["--device"]),
]
if not HAS_CUDA:     # the flag is named, not the config key train.device
    ROWS += [(f"{name}-cuda-without-cuda", argv, ["--device", "no CUDA device"]) for name, argv in [
        ("sample", ["sample", "{run}", "--out", "{out}", "--device", "cuda"]),
        ("eval-fid", ["eval", "fid", "{npz}", "--ref", "{npz}", "--device", "cuda"]),
        ("eval-probe", ["eval", "probe", "{run}", "--device", "cuda:1"]),
        ("demo", ["demo", "--smoke", "--out", "{out}", "--device", "cuda"]),
        ("prepare", ["prepare", "{tmp}", "{out}", "--device", "cuda"]),
    ]]


def small_network(path):
    """A TorchScript stand-in for Inception: 3-d pooled features, no logits (cheap statistics)."""
    class Pooled(torch.nn.Module):
        def forward(self, x: torch.Tensor):
            return x.mean(dim=(2, 3))

    torch.jit.save(torch.jit.script(Pooled()), str(path))
    return path


def gray_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("values")
    np.savez(base / "samples.npz", arr_0=gray_images(8), arr_1=np.arange(8) % 10)
    np.savez(base / "colour.npz", arr_0=np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    np.savez(base / "small.npz", arr_0=gray_images(8, size=8))
    np.savez(base / "bad-labels.npz", arr_0=gray_images(8), arr_1=np.arange(8) + 10)
    np.savez(base / "nan-ref.npz", mu=np.array([0.0, np.nan, 0.0]), sigma=np.eye(3))
    np.savez(base / "cmyk.npz", arr_0=np.zeros((8, 32, 32, 4), dtype=np.uint8))
    (base / "empty.yaml").write_text("")
    (base / "model-only.yaml").write_text("model:\n  preset: SiT-T/4\n")
    (base / "empty-sections.yaml").write_text("model:\ndata:\ntrain:\n  lr: 0.001\n")
    load_kill_harness().make_data(base / "fmnist", count=64)
    small_network(base / "net.pt")
    (base / "run").mkdir()
    return base


def paths_for(files, tmp_path):
    return {"files": str(files), "npz": str(files / "samples.npz"), "net": str(files / "net.pt"), "fm": str(files / "fmnist"),
            "run": str(files / "run"), "tmp": str(tmp_path), "out": str(tmp_path / "out")}


def snapshot(*roots):
    return {str(p): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv, fragments", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_a_bad_value_is_one_line_naming_it_exit_2_and_writes_nothing(tmp_path, capsys, files, argv, fragments):
    paths = paths_for(files, tmp_path)
    before = snapshot(tmp_path, files)
    code = main([arg.format(**paths) for arg in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("selfalign ") and ": error: " in err, err
    for fragment in fragments:
        assert fragment.format(**paths) in err, err
    assert snapshot(tmp_path, files) == before


def test_the_real_command_prints_one_line_for_a_flag_out_of_range(tmp_path, files):
    """Through the interpreter's entry point: argparse's own errors are one line too (no usage
    block), with exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "selfalign.cli", "eval", "fid", str(files / "samples.npz"),
                           "--ref", str(files / "samples.npz"), "--batch-size", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "argument --batch-size" in proc.stderr and "usage:" not in proc.stderr


def _every_action():
    def walk(parser, prog):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, f"{prog} {name}")
            else:
                yield prog, action
    yield from walk(build_parser(), "selfalign")


def test_no_flag_takes_a_bare_int_or_float():
    """Every number a command reads goes through a range-checked type (commands/argtypes.py)."""
    bare = [f"{prog} {action.option_strings or action.dest}" for prog, action in _every_action()
            if action.type in (int, float)]
    assert not bare
    numeric = [action for _, action in _every_action() if getattr(action.type, "__name__", "") in ("integer", "number")]
    assert len(numeric) >= 40


def test_help_of_every_command_still_builds(capsys):
    assert main(["--help"]) == 0
    for prog, action in _every_action():
        if isinstance(action, argparse._HelpAction) and prog != "selfalign":
            assert main([*prog.split()[1:], "--help"]) == 0, prog
    assert "usage: selfalign" in capsys.readouterr().out


# -- the shared argument types -------------------------------------------------------------------
def test_integer_types_hold_their_bounds():
    from selfalign.commands import argtypes

    assert argtypes.positive_int("1") == 1 and argtypes.non_negative_int("0") == 0
    assert argtypes.seed(str(2 ** 63 - 1)) == 2 ** 63 - 1 and argtypes.batch_size("1048576") == 2 ** 20
    for parse, text in [(argtypes.positive_int, "0"), (argtypes.non_negative_int, "-1"),
                        (argtypes.seed, str(2 ** 63)), (argtypes.seed, "-1"), (argtypes.batch_size, "1048577"),
                        (argtypes.positive_int, "1.5"), (argtypes.positive_int, "1e3"), (argtypes.positive_int, "")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert "in 3..5" in str(pytest.raises(argparse.ArgumentTypeError, argtypes.int_range(3, 5), "6").value)


def test_float_types_refuse_nan_and_infinities_and_hold_their_bounds():
    from selfalign.commands import argtypes

    for text in ("nan", "NaN", "inf", "-inf", "1e999"):
        for parse in (argtypes.finite_float, argtypes.non_negative_float, argtypes.noise_level):
            with pytest.raises(argparse.ArgumentTypeError, match="finite"):
                parse(text)
    assert argtypes.noise_level("0") == 0.0 and argtypes.noise_level("1") == 1.0
    assert argtypes.positive_float("1e-12") == 1e-12 and argtypes.finite_float("-3") == -3.0
    for parse, text in [(argtypes.noise_level, "1.0001"), (argtypes.noise_level, "-0.0001"),
                        (argtypes.positive_float, "0"), (argtypes.non_negative_float, "-1e-9"),
                        (argtypes.finite_float, "one")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_device_names_and_paths(tmp_path):
    from selfalign.commands import argtypes

    assert argtypes.device_name("auto") == "auto" and argtypes.device_name("cpu") == "cpu"
    for text in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="not a device"):
            argtypes.device_name(text)
    count = torch.cuda.device_count() if HAS_CUDA else 0
    with pytest.raises(argparse.ArgumentTypeError, match="CUDA device"):
        argtypes.device_name(f"cuda:{count}")
    (tmp_path / "f").write_text("x")
    assert argtypes.existing_file(str(tmp_path / "f")) and argtypes.existing_path(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        argtypes.existing_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        argtypes.existing_path(str(tmp_path / "missing"))


# -- the typed loader's range rules --------------------------------------------------------------
def test_loader_refuses_nonfinite_floats_unless_a_field_allows_them():
    from dataclasses import dataclass, field

    from selfalign.config.loader import ALLOW_NONFINITE, MAX_INT64, from_dict

    @dataclass
    class Section:
        rate: float = 1.0
        pair: tuple[float, float] = (0.0, 1.0)
        maybe: float | None = None
        bound: float = field(default=math.inf, metadata={ALLOW_NONFINITE: True})
        count: int = 0

    for key, value in [("rate", math.nan), ("rate", math.inf), ("pair", [0.0, -math.inf]), ("maybe", math.nan),
                       ("rate", 10 ** 400)]:
        with pytest.raises(ConfigError, match=f"s.{key}.*finite"):
            from_dict(Section, {key: value}, "s")
    assert from_dict(Section, {"bound": -math.inf}, "s").bound == -math.inf
    assert math.isnan(from_dict(Section, {"bound": math.nan}, "s").bound)
    assert from_dict(Section, {"count": MAX_INT64}, "s").count == MAX_INT64
    assert from_dict(Section, {"count": -MAX_INT64}, "s").count == -MAX_INT64
    for value in (MAX_INT64 + 1, -MAX_INT64 - 2, 10 ** 30):
        with pytest.raises(ConfigError, match="s.count: .* does not fit in 64 bits"):
            from_dict(Section, {"count": value}, "s")


def test_every_seed_the_config_accepts_reaches_torch(tmp_path, files):
    """A seed is checked against what torch's generators take, and every seed derived from it
    stays within that, so a valid config never fails later with "Overflow when unpacking long long"."""
    from selfalign.config.experiment import load_config
    from selfalign.training.samples import grid_inputs
    from selfalign.training.trainer import train

    largest = 2 ** 63 - 1
    with pytest.raises(ConfigError, match="train.seed"):
        load_config("fmnist-cpu-tiny-sra", [f"train.seed={largest + 1}"])
    grid_inputs(4, 1, 8, 10, largest, torch.device("cpu"))
    config = load_config("fmnist-cpu-tiny-sra", [
        f"train.seed={largest}", "train.device=cpu", f"data.path={files / 'fmnist'}", "model.preset=SiT-T/8",
        "train.batch_size=8", "train.total_kimg=0.008", "train.ckpt_every_kimg=0.008",
        "train.sample_every_kimg=0.008", "train.sample_count=4", "train.eval_every_kimg=0",
        "logging.tensorboard=false", "logging.progress_bar=false"])
    result = train(config, tmp_path / "run", log=lambda _m: None)
    assert result.step == 1 and (tmp_path / "run" / "samples").is_dir()


def test_a_resume_mismatch_names_what_the_checkpoint_has():
    """Resuming an SRA run with the vanilla preset said the checkpoint had ``regularizers '<unset>'``."""
    from selfalign.config.experiment import load_config, resume_mismatch

    sra, vanilla, repa = (load_config(f"fmnist-cpu-tiny-{name}") for name in ("sra", "vanilla", "repa"))
    assert resume_mismatch(sra.to_dict(), vanilla) == "regularizers: the checkpoint has sra but this config has none"
    assert resume_mismatch(vanilla.to_dict(), sra) == "regularizers: the checkpoint has none but this config has sra"
    assert resume_mismatch(sra.to_dict(), repa) == "regularizers: the checkpoint has sra but this config has repa"
    changed = load_config("fmnist-cpu-tiny-sra", ["regularizers.sra.k_max=0.5"])
    assert resume_mismatch(sra.to_dict(), changed) == "regularizers.sra.k_max is 0.2 in the checkpoint but 0.5 now"
    allowed = load_config("fmnist-cpu-tiny-sra", ["train.total_kimg=9", "sampler.steps=7", "logging.wandb=true"])
    assert resume_mismatch(sra.to_dict(), allowed) is None
    without_sampler = {key: value for key, value in sra.to_dict().items() if key != "sampler"}
    assert resume_mismatch({**without_sampler, "sampler": None}, sra) is None      # sampler.* may change


def test_every_preset_and_a_based_file_satisfy_the_required_keys(tmp_path):
    from selfalign.config.experiment import REQUIRED_KEYS, load_config, preset_names

    for name in preset_names():
        load_config(name, required=REQUIRED_KEYS)
    (tmp_path / "mine.yaml").write_text("base: fmnist-cpu-tiny-sra\ntrain:\n  lr: 0.001\n")
    assert load_config(tmp_path / "mine.yaml", required=REQUIRED_KEYS).model.preset == "SiT-T/4"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    config = load_config(empty, ["model.preset=SiT-T/4", "data.kind=fashion_mnist"], required=REQUIRED_KEYS)
    assert config.model.preset == "SiT-T/4"
    assert load_config(empty).model.preset == "SiT-XL/2"      # the Python API keeps its defaults


# -- values that reach the evaluation code --------------------------------------------------------
def test_a_reference_batch_with_nan_or_misshapen_statistics_is_refused(tmp_path):
    from selfalign.evaluation.fid import load_reference_batch, save_reference_batch

    good = tmp_path / "good.npz"
    save_reference_batch(good, np.random.default_rng(0).normal(size=(20, 3)), None, None)
    assert np.isfinite(load_reference_batch(good).pool.sigma).all()
    bad = {"nan-mu.npz": {"mu": [0.0, np.nan, 0.0], "sigma": np.eye(3)},
           "inf-sigma.npz": {"mu": np.zeros(3), "sigma": np.diag([1.0, np.inf, 1.0])},
           "nan-spatial.npz": {"mu": np.zeros(3), "sigma": np.eye(3), "mu_s": [np.nan], "sigma_s": [[1.0]]},
           "nan-features.npz": {"mu": np.zeros(3), "sigma": np.eye(3), "pool_features": np.full((5, 3), np.nan)},
           "misshapen.npz": {"mu": np.zeros(3), "sigma": np.eye(4)}}
    for name, arrays in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(DataError, match=name.replace(".", r"\.") + ".*(NaN|not a mean)"):
            load_reference_batch(tmp_path / name)


def test_precision_recall_are_skipped_aloud_when_too_few_images_are_kept():
    from selfalign.evaluation.fid import FeatureStatistics, ReferenceBatch
    from selfalign.evaluation.images import ArraySource
    from selfalign.evaluation.inception import InceptionOutputs
    from selfalign.evaluation.metrics import evaluate_source

    def network(images):
        return InceptionOutputs(images.reshape(len(images), -1)[:, :3].astype(np.float32), None, None)

    features = np.random.default_rng(0).normal(size=(10, 3))
    for kept in (features[:3], features[:0]):
        messages = []
        reference = ReferenceBatch(FeatureStatistics.of(features), None, kept)
        results = evaluate_source(ArraySource(gray_images(8, 4)), reference, network, progress=False,
                                  log=messages.append)
        assert math.isfinite(results["fid"]) and "precision" not in results
        assert any(f"the reference keeps {len(kept)}" in m for m in messages), messages


def test_indomain_metrics_accept_only_fashion_mnist_like_images():
    from selfalign.evaluation.indomain import check_fashion_mnist_shaped

    gray = torch.rand(4, 1, 32, 32) * 2 - 1
    for ok in (gray, gray[..., 2:30, 2:30], gray.repeat(1, 3, 1, 1), torch.zeros(4, 1, 64, 64)):
        check_fashion_mnist_shaped(ok)
    for bad, why in [(torch.rand(4, 3, 32, 32), "colour"), (torch.rand(4, 1, 16, 16), "16x16x1"),
                     (torch.rand(4, 1, 31, 31), "31x31x1"), (torch.rand(4, 1, 32, 28), "32x28x1"),
                     (torch.rand(4, 2, 32, 32), "colour")]:
        with pytest.raises(DataError, match=why):
            check_fashion_mnist_shaped(bad)


def test_sampling_that_yields_nan_or_inf_is_refused_instead_of_black_images():
    from conftest import randomize_zero_init
    from selfalign.evaluation.generate import make_draw
    from selfalign.models import build_model
    from selfalign.objectives import build_objective
    from selfalign.sampling import SamplerConfig

    torch.manual_seed(0)
    model = randomize_zero_init(build_model("SiT-T/8", input_size=16, in_channels=1, num_classes=10)).eval()
    noise, labels = torch.randn(2, 1, 16, 16), np.array([1, 2])
    fine = make_draw(model, build_objective(), SamplerConfig(name="euler", steps=3, cfg_scale=4.0), "cpu")
    assert fine(noise, labels, [1, 2]).dtype == np.uint8
    huge = make_draw(model, build_objective(), SamplerConfig(name="euler", steps=3, cfg_scale=1e30), "cpu")
    with pytest.raises(ConfigError, match="sampling produced NaN or infinite values.*cfg_scale 1e\\+30"):
        huge(noise, labels, [1, 2])


def test_cknna_on_too_few_examples_for_its_neighbours_is_one_line():
    from conftest import randomize_zero_init
    from selfalign.config.experiment import load_config
    from selfalign.evaluation.analysis import cknna_checkpoint
    from selfalign.models.backbone import DiffusionTransformer
    from selfalign.objectives import build_objective

    config = load_config({"model": {"preset": "SiT-T/8"}, "data": {"kind": "fashion_mnist", "resolution": 32}})
    model = randomize_zero_init(DiffusionTransformer(config.backbone_config())).eval()
    with pytest.raises(DataError, match="gives 3 examples, too few for CKNNA with topk=2.*--topk"):
        cknna_checkpoint(model, build_objective(), config, [1], 0.1, None, count=3, topk=2)


# -- values that reach the checkpoint and metrics files -------------------------------------------
class _RunsCode:
    def __reduce__(self):
        return (print, ("never printed",))


@pytest.mark.parametrize("content", ["random", "text", "empty", "code"])
def test_a_damaged_optimizer_file_is_refused_without_advice_to_load_it_unsafely(tmp_path, content):
    from selfalign.formats.checkpoint import OPTIMIZER_FILE, load_optimizer_state

    path = tmp_path / OPTIMIZER_FILE
    if content == "code":
        torch.save({"state": _RunsCode()}, path)
    else:
        path.write_bytes({"random": np.random.default_rng(0).bytes(4000), "text": b"hello world",
                          "empty": b""}[content])
    with pytest.raises(CheckpointError) as caught:
        load_optimizer_state(tmp_path)
    message = str(caught.value)
    assert str(path) in message and "damaged" in message and "\n" not in message
    for advice in ("weights_only", "safe_globals", "trust", "Re-running"):
        assert advice not in message, message


def test_a_metrics_log_that_is_not_text_is_named(tmp_path):
    from selfalign.training.metrics import METRICS_FILE, read_metrics

    (tmp_path / METRICS_FILE).write_bytes(b'{"step": 1}\n' + bytes(range(128, 256)))
    with pytest.raises(DataError, match=f"{METRICS_FILE} is not a metrics log.*move it aside"):
        read_metrics(tmp_path)
