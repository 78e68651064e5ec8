"""End to end on CPU: image folder (with a corrupt file) -> prepare -> train on latents with SRA ->
sample -> decode to images, with a tiny random AutoencoderKL (downsampling 8, as SD-VAE)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from selfalign.cli import main
from selfalign.config.experiment import load_config
from selfalign.data.vae import LatentVAE, tiny_vae_config
from selfalign.sampling import SamplerConfig, sample
from selfalign.runs import load_for_inference
from selfalign.training.trainer import train

SIZE = 64     # -> 8x8 latents with the factor-8 VAE


def test_prepare_train_sample_decode(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("circle", "square"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            image = rng.integers(0, 256, (SIZE + 8 * i, SIZE + 4, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "images" / name / f"{i}.png")
    (tmp_path / "images" / "square" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    torch.manual_seed(0)
    LatentVAE.load(tiny_vae_config(downsample=8, width=16)).autoencoder.save_pretrained(tmp_path / "vae")

    assert main(["prepare", str(tmp_path / "images"), str(tmp_path / "latents"), "--image-size", str(SIZE),
                 "--vae", str(tmp_path / "vae"), "--flip", "--shard-size", "4", "--workers", "0",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "8 images, 2 classes" in out and "1 unreadable images listed" in out
    index = json.loads((tmp_path / "latents" / "index.json").read_text())
    assert index["latent_shape"] == [4, 8, 8]

    config = load_config({
        "model": {"preset": "SiT-T/2", "num_classes": 2},
        "regularizers": {"sra": {"student_layer": 2, "teacher_layer": 4}},
        "data": {"kind": "latents", "path": str(tmp_path / "latents"), "resolution": SIZE, "hflip": True},
        "train": {"batch_size": 4, "total_kimg": 0.012, "device": "cpu", "log_every_kimg": 0.004,
                  "ckpt_every_kimg": 0.012, "sample_every_kimg": 0.012, "sample_count": 4},
        "logging": {"tensorboard": False, "progress_bar": False},
    })
    train(config, tmp_path / "run", log=lambda *_: None)
    assert (tmp_path / "run" / "samples").is_dir()      # the grid was decoded with the dataset's VAE
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(r["loss"]) for r in records if "loss" in r)

    model, objective, loaded = load_for_inference(tmp_path / "run")
    assert loaded.data.kind == "latents" and model.config.input_size == 8
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    x0 = sample(model, objective, noise, torch.tensor([0, 1, 1]), SamplerConfig(name="euler", steps=4), generator=gen)
    vae = LatentVAE.for_dataset(index)
    images = vae.decode_uint8(x0)
    assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == torch.uint8
    # decode undoes the 0.18215 scale: it equals the raw decoder on x0 / scale
    raw = vae.autoencoder.decode(x0 / index["scale"]).sample
    torch.testing.assert_close(vae.decode(x0), raw, rtol=1e-5, atol=1e-5)
