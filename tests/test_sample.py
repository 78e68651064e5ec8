"""``selfalign sample``: ADM .npz output, index-split determinism, resumable shards, labels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfalign.cli import main
from selfalign.evaluation.generate import (SamplePlan, generate_shards, make_draw, merge_shards, sample_labels,
                                           sample_noise, shard_path)


def save_tiny_run(run, **sections):
    """A tiny Fashion-MNIST SiT (32 px, patch 8) saved as a selfalign checkpoint in ``run``."""
    from conftest import randomize_zero_init
    from selfalign.config.experiment import load_config
    from selfalign.models.backbone import DiffusionTransformer
    from selfalign.formats.checkpoint import save_checkpoint

    config = load_config({"model": {"preset": "SiT-T/8"}, "data": {"kind": "fashion_mnist", "resolution": 32},
                          **sections})
    torch.manual_seed(0)
    model = randomize_zero_init(DiffusionTransformer(config.backbone_config()))
    weights = model.state_dict()
    save_checkpoint(run, 1, {"model": weights, "ema": weights, "regularizers": {}},
                    {"optimizer": {"state": {}, "param_groups": []}},
                    {"config": json.loads(json.dumps(config.to_dict(), default=list))})
    return run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_run(tmp_path_factory.mktemp("ckpt") / "run")


SAMPLE_ARGS = ["-n", "10", "--sampler", "euler_maruyama", "--steps", "3", "--batch-size", "2",
               "--shard-size", "4", "--device", "cpu", "--no-progress"]


def read(path):
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


def test_one_and_two_processes_give_identical_samples(checkpoint, tmp_path, capsys):
    assert main(["sample", str(checkpoint), "--out", str(tmp_path / "one"), *SAMPLE_ARGS, "--png"]) == 0
    images, labels = read(tmp_path / "one" / "samples.npz")
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (10,)
    assert np.array_equal(images[..., 0], images[..., 2])            # grayscale repeated to RGB
    assert len(list((tmp_path / "one" / "png").glob("*.png"))) == 10

    two = tmp_path / "two"
    assert main(["sample", str(checkpoint), "--out", str(two), *SAMPLE_ARGS, "--rank", "0", "--world-size", "2"]) == 0
    assert "still missing" in capsys.readouterr().out and not (two / "samples.npz").exists()
    assert main(["sample", str(checkpoint), "--out", str(two), *SAMPLE_ARGS, "--rank", "1", "--world-size", "2"]) == 0
    images2, labels2 = read(two / "samples.npz")
    assert np.array_equal(images, images2) and np.array_equal(labels, labels2)


def test_stochastic_samples_do_not_depend_on_the_batch_size(checkpoint, tmp_path):
    """SDE samples drawn 2 or 4 at a time are the same images; another seed gives other images."""
    args = list(SAMPLE_ARGS)
    small = tmp_path / "b2"
    assert main(["sample", str(checkpoint), "--out", str(small), *args]) == 0
    large = [*args[:args.index("--batch-size")], "--batch-size", "4", *args[args.index("--batch-size") + 2:]]
    assert main(["sample", str(checkpoint), "--out", str(tmp_path / "b4"), *large]) == 0
    a, _ = read(small / "samples.npz")
    b, _ = read(tmp_path / "b4" / "samples.npz")
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-2          # floating point only: rounding to uint8
    assert main(["sample", str(checkpoint), "--out", str(tmp_path / "seed"), *args, "--seed", "7"]) == 0
    c, _ = read(tmp_path / "seed" / "samples.npz")
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1


def test_one_generator_per_sample_draws_each_row_alone():
    from selfalign.sampling.noise import standard_normal
    like = torch.empty(3, 2, 4, 4)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]   # noqa: E731
    batch = standard_normal(like, gens([5, 6, 7]))
    assert torch.equal(batch[1:], standard_normal(like[1:], gens([6, 7])))
    assert torch.equal(batch[0], torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        standard_normal(like, gens([1, 2]))


def test_resume_skips_finished_shards_and_redoes_broken_ones(checkpoint, tmp_path):
    from selfalign.sampling import SamplerConfig
    from selfalign.runs import load_for_inference

    model, objective, _ = load_for_inference(checkpoint)
    sampler = SamplerConfig(name="euler_maruyama", steps=3)
    plan = SamplePlan(checkpoint=str(checkpoint), num_samples=10, seed=1, batch_size=2, shard_size=4)
    draw = make_draw(model, objective, sampler, "cpu")
    shape = (1, 32, 32)
    first = generate_shards(plan, tmp_path, draw, shape, 10, progress=False)
    assert first == {"made": 3, "skipped": 0, "images": 10}
    before = read(merge_shards(plan, tmp_path, 10))
    shard_path(tmp_path, 0).unlink()                                  # interrupted before shard 0 was written
    shard_path(tmp_path, 2).write_bytes(shard_path(tmp_path, 2).read_bytes()[:100])   # truncated file
    again = generate_shards(plan, tmp_path, draw, shape, 10, progress=False)
    assert again == {"made": 2, "skipped": 1, "images": 6}
    after = read(merge_shards(plan, tmp_path, 10))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_a_different_plan_in_the_same_directory_is_refused(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["sample", str(checkpoint), "--out", out, *SAMPLE_ARGS]) == 0
    capsys.readouterr()
    assert main(["sample", str(checkpoint), "--out", out, *SAMPLE_ARGS, "--cfg-scale", "2.0"]) == 2
    err = capsys.readouterr().err
    assert "different plan" in err and "sampler" in err and len(err.strip().splitlines()) == 1
    assert main(["sample", str(checkpoint), "--out", out, *SAMPLE_ARGS, "--set", "nonsense=1"]) == 2
    assert "sampler.nonsense" in capsys.readouterr().err


def test_class_balanced_and_uniform_labels():
    balanced = sample_labels(25, 10, seed=0, balanced=True)
    counts = np.bincount(balanced, minlength=10)
    assert counts.sum() == 25 and set(counts) == {2, 3}
    assert np.array_equal(sample_labels(25, 10, 0, True, 5, 9), balanced[5:9])
    uniform = sample_labels(200, 10, seed=3, balanced=False)
    assert set(uniform) == set(range(10))
    # a sample's label depends only on (seed, index), not on the total count
    assert np.array_equal(sample_labels(50, 10, 3, False), uniform[:50])
    assert not np.array_equal(sample_labels(50, 10, 4, False), uniform[:50])


def test_noise_of_a_sample_depends_only_on_seed_and_index():
    full = sample_noise((1, 4, 4), 7, range(6))
    assert torch.equal(sample_noise((1, 4, 4), 7, [3, 4]), full[3:5])
    assert not torch.equal(sample_noise((1, 4, 4), 8, [3]), full[3:4])


def test_latent_samples_are_decoded_with_the_vae():
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL

    from selfalign.models import build_model
    from selfalign.objectives import build_objective
    from selfalign.data.vae import LatentVAE, tiny_vae_config
    from selfalign.sampling import SamplerConfig

    torch.manual_seed(0)
    vae = LatentVAE(AutoencoderKL(**tiny_vae_config(downsample=2)).eval())
    model = build_model("SiT-T/4", input_size=8, in_channels=4, num_classes=10).eval()
    draw = make_draw(model, build_objective(), SamplerConfig(name="euler", steps=2), "cpu",
                     decode=lambda x: vae.decode_uint8(x).numpy())
    images = draw(sample_noise((4, 8, 8), 0, range(3)), np.array([0, 1, 2]), [0, 1, 2])
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8


def test_default_batch_and_shard_sizes_work_together(checkpoint, tmp_path):
    """The defaults alone (no --batch-size/--shard-size) must not be refused as inconsistent."""
    args = ["-n", "3", "--sampler", "euler", "--steps", "2", "--device", "cpu", "--no-progress"]
    assert main(["sample", str(checkpoint), "--out", str(tmp_path / "defaults"), *args]) == 0
    assert read(tmp_path / "defaults" / "samples.npz")[0].shape == (3, 32, 32, 3)


def plan_sampler(out):
    return json.loads((out / "plan.json").read_text())["sampler"]


def test_the_runs_sampler_section_gives_the_defaults_and_flags_override_it(checkpoint, tmp_path):
    """A run whose config records a sampler (as the released-code presets do) samples with it."""
    recorded = {"name": "euler_maruyama", "steps": 2, "cfg_scale": 2.5, "guidance_low": 0.0, "guidance_high": 0.7}
    run = save_tiny_run(tmp_path / "run", sampler=recorded)
    common = ["-n", "2", "--batch-size", "2", "--device", "cpu", "--no-progress"]

    assert main(["sample", str(run), "--out", str(tmp_path / "recorded"), *common]) == 0
    assert {k: plan_sampler(tmp_path / "recorded")[k] for k in recorded} == recorded
    assert main(["sample", str(run), "--out", str(tmp_path / "flags"), *common, "--cfg-scale", "1.0",
                 "--guidance-interval", "0", "1", "--sampler", "euler"]) == 0
    assert {k: plan_sampler(tmp_path / "flags")[k] for k in recorded} == {
        **recorded, "name": "euler", "cfg_scale": 1.0, "guidance_high": 1.0}
    # a run without a sampler section: the SDE without guidance
    assert main(["sample", str(checkpoint), "--out", str(tmp_path / "bare"), *common, "--steps", "1"]) == 0
    bare = plan_sampler(tmp_path / "bare")
    assert (bare["name"], bare["cfg_scale"], bare["guidance_low"], bare["guidance_high"]) == \
        ("euler_maruyama", 1.0, 0.0, 1.0)
