"""The latent dataset: what prepare wrote comes back (values, labels, flips, raw images), damaged
shards are named, and x0 = scale * (mean + std * eps) is drawn from the given generator."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from selfalign.conventions import SD_VAE_SCALE
from selfalign.data import TrainingDataset
from selfalign.data.latents import LatentDataset, build_latent_dataset, draw_x0
from selfalign.pipeline.prepare import PrepareConfig, prepare
from selfalign.data.sources import ImageReader, list_images
from selfalign.data.vae import LatentScaling, LatentVAE, tiny_vae_config
from selfalign.errors import ConfigError, DataError

SIZE = 16


def make_folder(root, per_class=3, classes=("ant", "bee")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (SIZE + 5 * i, SIZE + 3, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("latents")
    src = make_folder(base / "images")
    torch.manual_seed(0)
    vae = LatentVAE.load(tiny_vae_config(downsample=2))
    vae.autoencoder.save_pretrained(base / "vae")
    out = {}
    for fmt in ("safetensors", "npy"):
        config = PrepareConfig(source=str(src), out=str(base / fmt), image_size=SIZE, vae=str(base / "vae"),
                               flip=True, shard_size=4, batch_size=2, workers=0, progress=False, file_format=fmt)
        assert prepare(config, vae=vae).complete
        out[fmt] = base / fmt
    return src, vae, out


def test_values_labels_flips_and_images_match_the_source(prepared):
    src, vae, out = prepared
    ds = LatentDataset(out["safetensors"], use_flips=True, with_images=True)
    listing = list_images(src)
    assert len(ds) == 12 and ds.count == 6 and ds.class_names == ["ant", "bee"]
    assert ds.labels.tolist() == list(listing.labels)
    reader = ImageReader.of(listing)
    crops = torch.from_numpy(np.stack([reader.read_cropped(p, SIZE) for p in listing.paths]))
    mean_ref, std_ref = vae.encode_uint8(crops)
    mean_flip_ref, _ = vae.encode_uint8(crops.flip(2))
    for i in range(6):
        mean, std, label, image = ds[i]
        torch.testing.assert_close(mean, mean_ref[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(std, std_ref[i], rtol=1e-5, atol=1e-5)
        assert label == listing.labels[i]
        assert torch.equal(image, crops[i].permute(2, 0, 1).float() / 127.5 - 1)
        mean_f, _, label_f, image_f = ds[i + 6]
        torch.testing.assert_close(mean_f, mean_flip_ref[i], rtol=1e-5, atol=1e-5)
        assert label_f == label and torch.equal(image_f, image.flip(-1))
    moments, labels, images = ds.__getitems__([4, 7, 0])
    assert moments.shape == (3, 8, 8, 8) and images.shape == (3, 3, SIZE, SIZE)
    assert torch.equal(moments[0, :4], ds[4][0]) and torch.equal(moments[1, 4:], ds[7][1])


def test_npy_shards_hold_the_same_latents(prepared):
    _, _, out = prepared
    a, b = LatentDataset(out["safetensors"], use_flips=True), LatentDataset(out["npy"], use_flips=True)
    for i in range(len(a)):
        for x, y in zip(a[i], b[i]):
            assert torch.equal(x, y)


def test_draw_x0_is_scale_times_a_sample_from_the_given_generator(prepared):
    _, _, out = prepared
    ds = LatentDataset(out["safetensors"])
    moments, _ = ds.__getitems__([0, 1, 2])
    x0 = ds.to_model(moments, torch.Generator().manual_seed(3))
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x0, SD_VAE_SCALE * (moments[:, :4] + moments[:, 4:] * eps))
    assert torch.equal(x0, ds.to_model(moments, torch.Generator().manual_seed(3)))
    # Per-channel statistics whiten the dataset's latents; from_model inverts to_model.
    stats = ds.index["channel_stats"]
    scaling = LatentScaling.from_channel_stats(stats["mean"], stats["std"])
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(scaling.from_model(scaling.to_model(z)), z)
    x = draw_x0(moments[:, :4], moments[:, 4:], torch.Generator().manual_seed(0), scaling)
    assert x.shape == (3, 4, 8, 8)
    assert LatentDataset(out["safetensors"], normalization="channel").scaling == scaling


def test_analysis_draws_latent_examples_like_the_trainer(prepared):
    """Probes, CKNNA and PCA read a latent dataset's examples as the model input, not its moments."""
    from selfalign.evaluation.features import dataset_batch
    _, _, out = prepared
    ds = LatentDataset(out["safetensors"])
    x0, labels = dataset_batch(ds, [5, 0], torch.Generator().manual_seed(4))
    moments, expected_labels = ds.__getitems__([5, 0])
    torch.testing.assert_close(x0, ds.to_model(moments, torch.Generator().manual_seed(4)))
    assert x0.shape == (2, 4, 8, 8) and torch.equal(labels, expected_labels)


def test_decode_uses_the_datasets_vae_and_inverts_the_scale(prepared):
    _, vae, out = prepared
    ds = LatentDataset(out["safetensors"])
    mean = ds[0][0][None]
    images = ds.decode(mean * SD_VAE_SCALE)
    torch.testing.assert_close(images, vae.autoencoder.decode(mean).sample, rtol=1e-5, atol=1e-5)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_truncated_or_corrupted_shards_are_named(prepared, tmp_path):
    _, _, out = prepared
    root = _copy(out["safetensors"], tmp_path / "copy")
    shard = root / "shards" / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF                                   # same size, different bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-000001.safetensors.*sha256"):
        LatentDataset(root, verify="full")
    lazy = LatentDataset(root, verify="lazy")          # opens; fails when that shard is read
    lazy[0]
    with pytest.raises(DataError, match="shard-000001.safetensors.*sha256"):
        lazy[5]
    shard.write_bytes(bytes(data[:-10]))               # truncated: caught at open by size
    with pytest.raises(DataError, match="shard-000001.safetensors.*truncated"):
        LatentDataset(root, verify="size")


def test_config_checks(prepared, tmp_path):
    from selfalign.config.experiment import DataConfig
    _, _, out = prepared
    ds = build_latent_dataset(DataConfig(kind="latents", path=str(out["safetensors"]), resolution=SIZE, hflip=True))
    assert len(ds) == 12
    with pytest.raises(ConfigError, match="prepared at 16 px"):
        build_latent_dataset(DataConfig(kind="latents", path=str(out["safetensors"]), resolution=32))
    with pytest.raises(DataError, match="selfalign prepare"):
        LatentDataset(tmp_path)


def test_a_latent_dataset_is_a_training_dataset_that_draws_its_model_input(prepared):
    _, _, out = prepared
    ds = LatentDataset(out["safetensors"])
    assert isinstance(ds, TrainingDataset) and not ds.flippable      # mirrored latents are stored examples
    moments, labels = ds.__getitems__([0, 1])
    assert ds.channels == ds.latent_shape[0] == moments.shape[1] // 2
    mean, std = moments.chunk(2, dim=1)
    x0 = ds.to_model(moments, torch.Generator().manual_seed(3))
    assert torch.equal(x0, draw_x0(mean, std, torch.Generator().manual_seed(3), ds.scaling))
    assert x0.shape == (2, *ds.latent_shape) and labels.tolist() == ds.labels[:2].tolist()

