"""Config presets and ExperimentConfig: every preset loads, bad values are one-line errors."""
from __future__ import annotations

import pytest

from selfalign.config.experiment import (ExperimentConfig, load_config, preset_names, resume_mismatch, save_config)
from selfalign.config.loader import ConfigError

PAPER_LAYERS = {"SiT-B/2": (3, 8), "SiT-L/2": (6, 16), "SiT-XL/2": (8, 20),
                "DiT-B/2": (3, 7), "DiT-L/2": (6, 14), "DiT-XL/2": (8, 16)}


def test_every_paper_row_has_vanilla_and_sra_presets():
    names = set(preset_names())
    for model in ("sit-b2", "sit-l2", "sit-xl2", "dit-b2", "dit-l2", "dit-xl2"):
        assert {f"{model}-256-vanilla", f"{model}-256-sra"} <= names
    assert {"sit-xl2-512-vanilla", "sit-xl2-512-sra", "sit-xl2-512-sra-code"} <= names
    assert {"fmnist-cpu-tiny-vanilla", "fmnist-cpu-tiny-sra", "fmnist-gpu-small-vanilla",
            "fmnist-gpu-small-sra"} <= names


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads_with_the_papers_hyperparameters(name, tmp_path):
    config = load_config(name)
    assert isinstance(config, ExperimentConfig) and config.name == name
    t = config.train
    if config.data.kind == "latents":
        assert (t.batch_size, t.lr, t.betas, t.weight_decay, t.grad_clip, t.ema_decay) == \
            (256, 1e-4, (0.9, 0.999), 0.0, 1.0, 0.9999)
        assert config.model.input_size == config.data.resolution // 8 and config.model.in_channels == 4
        family = config.model.preset.split("-")[0]
        assert config.objective.kind == ("flow" if family == "SiT" else "ddpm")
        assert config.model.learn_sigma == (family == "DiT")
        if "sra" in config.regularizers:
            sra = config.regularizers["sra"]
            assert (sra.student_layer, sra.teacher_layer) == PAPER_LAYERS[config.model.preset]
            assert sra.k_max == 0.2 and sra.head_init == "xavier"
            released = "-sra-code" in name
            assert (sra.teacher_truncate, sra.teacher_precision, t.precision) == (
                (False, "fp32", "fp16") if released else (True, "autocast", "bf16"))
            if released and family == "SiT" and not name.endswith("-legacy"):   # train.py's default
                assert (sra.distance, sra.weight, sra.weight_schedule) == ("channel_cosine", 0.5, "constant")
            elif released:      # the released smooth-L1 loop: base weight, decaying with the epoch
                start, period = (149, 1000.0) if config.data.resolution == 256 else (99, 800.0)
                assert (sra.distance, sra.weight_schedule, sra.decay_start_epoch, sra.decay_period) == (
                    "smooth_l1", "official_decay", start, period)
                assert sra.weight == (0.04 if family == "DiT" else 0.2)
            else:
                assert (sra.distance, sra.weight, sra.weight_schedule) == ("smooth_l1", 0.2, "constant")
    if name.endswith("-vanilla"):
        assert config.regularizers == {}
    if name.endswith(("-sra", "-sra-code", "-sra-code-legacy")):
        assert set(config.regularizers) == {"sra"}
    # A saved config loads back to the same run.
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.hash() == config.hash() and resume_mismatch(config.to_dict(), again) is None


# The released sampling of each released-code preset: (sampler, steps, CFG scale, guidance interval).
RELEASED_SAMPLING = {
    "sit-xl2-256-sra-code": ("euler_maruyama", 250, 1.8, (0.0, 0.7)),          # SiT-SRA/gen.sh
    "sit-xl2-256-sra-code-legacy": ("euler_maruyama", 250, 1.8, (0.0, 0.7)),
    "sit-xl2-512-sra-code": ("euler_maruyama", 250, 2.5, (0.0, 0.7)),          # README: CFG 2.5 + an interval
    "sit-xl2-512-sra-code-legacy": ("euler_maruyama", 250, 2.5, (0.0, 0.7)),
    "dit-xl2-256-sra-code": ("ddpm", 250, 1.0, (0.0, 1.0)),                    # DiT-SRA/gen.sh
    "dit-xl2-512-sra-code": ("ddpm", 250, 1.0, (0.0, 1.0)),
}


def test_every_released_code_preset_records_its_sampling():
    assert {n for n in preset_names() if "-sra-code" in n} == set(RELEASED_SAMPLING)


@pytest.mark.parametrize("name", sorted(RELEASED_SAMPLING))
def test_released_code_presets_sample_as_released_by_default(name, tmp_path):
    from selfalign.cli import build_parser
    from selfalign.commands.sample import sampler_config

    config = load_config(name)
    run = tmp_path / "run"          # the checkpoint argument must exist when the flags are parsed
    run.mkdir()
    args = build_parser().parse_args(["sample", str(run), "--out", "out"])
    s = sampler_config(args, config.objective.kind, config.sampler)
    assert (s.name, s.steps, s.cfg_scale, (s.guidance_low, s.guidance_high)) == RELEASED_SAMPLING[name]
    assert (s.diffusion, s.last_step, s.legacy_cfg_channels) == ("2t", 0.04, None)   # the released SDE, all channels
    args = build_parser().parse_args(["sample", str(run), "--out", "out", "--cfg-scale", "1", "--steps", "50"])
    s = sampler_config(args, config.objective.kind, config.sampler)
    assert (s.name, s.steps, s.cfg_scale) == (RELEASED_SAMPLING[name][0], 50, 1.0)


def test_dts_code_preset_holds_the_released_scripts_settings():
    # SiT-SRA_DTS_AS/scripts/train.sh: SiT-B/2 3 -> 8, --mask-ratio 0.25, --dual-time-scheduling,
    # --attention-separation, --teacher-mask, --teacher-t sra, --loss-type cos, --align-weight 0.5, fp16
    config = load_config("sit-b2-256-dts-code")
    dts = config.regularizers["dts"]
    assert (config.model.preset, dts.student_layer, dts.teacher_layer) == ("SiT-B/2", 3, 8)
    assert (dts.fraction, dts.dual_timestep, dts.attention_separation) == (0.25, True, True)
    assert (dts.teacher_time, dts.teacher_k_max, dts.teacher_attention_separation) == ("per_group", 0.2, True)
    assert (dts.teacher_labels, dts.teacher_truncate, dts.head_init) == ("raw", False, "xavier")
    assert (dts.distance, dts.weight, config.train.precision) == ("channel_cosine", 0.5, "fp16")
    assert load_config("sit-b2-256-dts").regularizers["dts"].teacher_labels == "dropped"


def test_sra_layers_default_from_the_model_preset():
    config = load_config({"model": {"preset": "SiT-L/2"}, "regularizers": {"sra": {"weight": 0.5}},
                          "data": {"kind": "latents", "path": "x", "resolution": 256}})
    sra = config.regularizers["sra"]
    assert (sra.student_layer, sra.teacher_layer, sra.weight) == (6, 16, 0.5)


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "train.lrr: unknown key"),
    (["train.lr=-1e-4"], "train.lr must be > 0"),
    (["train.lr=abc"], "train.lr: expected a number"),
    (["train.precision=fp8"], "train.precision: expected one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
    (["train.nonfinite=ignore"], "train.nonfinite: expected one of 'skip', 'stop', got 'ignore'"),
    (["model.preset=SiT-Q/2"], "model.preset: unknown model preset"),
    (["regularizers.sra.teacher_layer=7"], "regularizers.sra.teacher_layer=7 is beyond the model depth 6"),
    (["regularizers.sra.student_layer=5", "regularizers.sra.teacher_layer=3"], "deeper than"),
    (["regularizers.sra.k_max=1.5"], "regularizers.sra.k_max must be in [0, 1]"),
    (["regularizers.sra.distanse=l1"], "regularizers.sra.distanse: unknown key"),
    (["regularizers.nope={}"], "regularizers.nope: unknown regularizer"),
    (["data.resolution=30"], "data.resolution=30 is not divisible by the patch size 4"),
    (["data.kind=latents", "data.path=x", "data.resolution=40"], "VAE factor 8 x patch 4 = 32"),
    (["data.kind=imagefolder"], "data.path is required"),
    (["model.input_size=16"], "model.input_size=16 does not match data.resolution=32"),
    (["sampler.name=eulr"], "sampler.name: expected one of 'euler', 'heun', 'euler_maruyama', 'ddpm', 'ddim', got 'eulr'"),
    (["sampler.name=ddim"], "cannot sample a flow objective"),
    (["sampler.guidance_low=0.9", "sampler.guidance_high=0.1"], "reversed"),
    (["objective.kind=ddpm", "model.learn_sigma=false"], "model.learn_sigma=False does not fit"),
    (["train.betas=[0.9]"], "train.betas"),
])
def test_bad_values_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("fmnist-cpu-tiny-sra", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_batch_must_split_over_processes():
    with pytest.raises(ConfigError, match=r"train.batch_size=64 is not divisible by the number of processes \(3\)"):
        load_config("fmnist-cpu-tiny-vanilla", world_size=3)


def test_resume_mismatch_allows_schedule_changes_only():
    base = load_config("fmnist-cpu-tiny-sra")
    longer = load_config("fmnist-cpu-tiny-sra", ["train.total_kimg=40", "logging.tensorboard=true"])
    assert resume_mismatch(base.to_dict(), longer) is None
    other = load_config("fmnist-cpu-tiny-sra", ["regularizers.sra.weight=0.5"])
    assert "regularizers.sra.weight is 0.2 in the checkpoint but 0.5 now" == resume_mismatch(base.to_dict(), other)


def test_resume_accepts_a_setting_added_since_the_checkpoint_at_its_default():
    current = load_config("fmnist-cpu-tiny-sra")
    older = current.to_dict()
    del older["regularizers"]["sra"]["head_init"]
    assert resume_mismatch(older, current) is None
    changed = load_config("fmnist-cpu-tiny-sra", ["regularizers.sra.head_init=torch_default"])
    assert resume_mismatch(older, changed) == ("regularizers.sra.head_init is '<unset>' in the checkpoint "
                                               "but 'torch_default' now")
