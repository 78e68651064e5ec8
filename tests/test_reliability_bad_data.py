"""Bad data: corrupt or truncated images, damaged Fashion-MNIST files, truncated, checksum-failing,
misshapen or mislabelled latent shards. Each ends in one line naming the file (and the example's
index where there is one), exit code 2 from the CLI, never a bare traceback from a DataLoader
worker. (Skip-and-report of unreadable images is `selfalign prepare`'s: tests/test_prepare.py.)"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfalign.cli import main
from selfalign.data import DataOrder, step_batches
from selfalign.data.latents import LatentDataset
from selfalign.errors import DataError
from selfalign.formats import shards as fmt
from conftest import load_kill_harness

pytestmark = pytest.mark.usefixtures("single_thread")
QUIET = ["--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false",
         "--set", "train.sample_every_kimg=0", "--set", "train.eval_every_kimg=0", "--set", "train.device=cpu"]


def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code, err, *fragments):
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err and "DataLoader worker" not in err, err
    for fragment in fragments:
        assert fragment in err, err


# -- ImageFolder -------------------------------------------------------------------------------
def make_image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def damage_image(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"this is not an image at all")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("how, workers", [("garbage", 0), ("truncated", 0), ("empty", 1), ("truncated", 1)])
def test_a_corrupt_image_is_named_with_its_index(tmp_path, capsys, how, workers):
    folder = make_image_folder(tmp_path / "images")
    damage_image(folder / "bee" / "2.png", how)            # sorted order: ant/0..3, bee/0..3 -> index 6
    run_dir = tmp_path / "run"
    code, err = run_cli(["train", "fmnist-cpu-tiny-vanilla", "--run-dir", str(run_dir), *QUIET,
                         "--set", "data.kind=imagefolder", "--set", f"data.path={folder}",
                         "--set", "data.resolution=16", "--set", "model.preset=SiT-T/8",
                         "--set", "train.batch_size=8", "--set", f"data.num_workers={workers}"], capsys)
    assert_one_line(code, err, "image 6", str(folder / "bee" / "2.png"), "fix or remove the file")
    assert not (run_dir / "checkpoints").exists()


# -- Fashion-MNIST files -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    harness = load_kill_harness()
    return harness.make_data(tmp_path_factory.mktemp("fmnist"), count=64)


def copy_fmnist(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_idx(path: Path, edit) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    with gzip.open(path, "wb") as f:
        f.write(bytes(edit(raw)))


@pytest.mark.parametrize("damage, fragments", [
    ("cut_gzip", ["train-images-idx3-ubyte.gz", "unreadable"]),
    ("short_images", ["train-images-idx3-ubyte.gz", "is truncated"]),
    ("label_range", ["train-labels-idx1-ubyte.gz", "label 12 at index 5"]),
    ("label_count", ["train-labels-idx1-ubyte.gz", "60 labels for 64 images"]),
])
def test_damaged_fashion_mnist_files_are_named(tmp_path, capsys, fmnist, damage, fragments):
    data = copy_fmnist(fmnist, tmp_path / "data")
    images, labels = data / "train-images-idx3-ubyte.gz", data / "train-labels-idx1-ubyte.gz"
    if damage == "cut_gzip":
        images.write_bytes(images.read_bytes()[:1000])
    elif damage == "short_images":
        rewrite_idx(images, lambda raw: raw[:-100])
    elif damage == "label_range":
        rewrite_idx(labels, lambda raw: raw[:8 + 5] + bytes([12]) + raw[8 + 6:])
    else:
        rewrite_idx(labels, lambda raw: raw[:3] + bytes([1]) + (60).to_bytes(4, "big") + raw[8:68])
    run_dir = tmp_path / "run"
    code, err = run_cli(["train", "fmnist-cpu-tiny-vanilla", "--run-dir", str(run_dir), *QUIET,
                         "--set", f"data.path={data}"], capsys)
    assert_one_line(code, err, *fragments)
    assert not run_dir.exists()


# -- latent shards -------------------------------------------------------------------------------
LATENT = (4, 2, 2)      # 16 px images through an 8x VAE


def write_shard(root: Path, number: int, mean: torch.Tensor, labels: list[int]) -> dict:
    data = fmt.encode_shard({"mean": mean, "std": mean.abs() + 0.1}, torch.tensor(labels), "safetensors")
    path = root / fmt.shard_file(number, "safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"file": fmt.shard_file(number, "safetensors"), "count": len(labels), "labels": labels,
            "bytes": len(data), "sha256": fmt.sha256_file(path), "sources": [f"x/{i}.png" for i in labels]}


def make_latents(root: Path, shape=LATENT, labels=((0, 1, 0, 1), (1, 0, 1, 0))) -> Path:
    """A prepared dataset as `selfalign prepare` lays it out (index.json + checksummed shards)."""
    gen = torch.Generator().manual_seed(0)
    shards = []
    for number, shard_labels in enumerate(labels):
        current = shape(number) if callable(shape) else shape
        shards.append(write_shard(root, number, torch.randn(len(shard_labels), *current, generator=gen),
                                  list(shard_labels)))
    index = {"kind": fmt.INDEX_KIND, "version": fmt.INDEX_VERSION, "file_format": "safetensors",
             "dtype": "float32", "flipped": False, "image_size": 16, "latent_shape": list(LATENT),
             "num_classes": 2, "class_names": ["ant", "bee"], "count": sum(s["count"] for s in shards),
             "scale": 0.18215, "vae": "none", "source": {"root": str(root), "prefix": ""}, "skipped": 0,
             "shards": shards}
    (root / fmt.INDEX_NAME).write_text(json.dumps(index))
    return root


def latent_train(root: Path, run_dir: Path) -> list[str]:
    return ["train", "fmnist-cpu-tiny-vanilla", "--run-dir", str(run_dir), *QUIET,
            "--set", "data.kind=latents", "--set", f"data.path={root}", "--set", "data.resolution=16",
            "--set", "model.preset=SiT-T/2", "--set", "model.num_classes=2", "--set", "train.batch_size=4"]


def test_intact_latents_load(tmp_path):
    ds = LatentDataset(make_latents(tmp_path / "latents"))
    moments, labels = ds.__getitems__([0, 5, 7])
    assert moments.shape == (3, 8, 2, 2) and labels.tolist() == [0, 0, 0]


@pytest.mark.parametrize("damage, fragments", [
    ("truncated", ["shard-000001.safetensors", "truncated"]),
    ("bitflip", ["shard-000001.safetensors", "sha256"]),
    ("missing", ["shard-000001.safetensors", "missing"]),
    ("index", ["index.json", "not valid JSON"]),
])
def test_damaged_latent_shards_stop_the_cli_with_the_file_named(tmp_path, capsys, damage, fragments):
    root = make_latents(tmp_path / "latents")
    shard = root / "shards" / "shard-000001.safetensors"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-7])
    elif damage == "bitflip":
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x10
        shard.write_bytes(bytes(data))
    elif damage == "missing":
        shard.unlink()
    else:
        (root / "index.json").write_text('{"kind": "selfalign-latents", "shards": [')
    run_dir = tmp_path / "run"
    code, err = run_cli(latent_train(root, run_dir), capsys)
    assert_one_line(code, err, *fragments)
    assert not run_dir.exists()


def test_wrong_shard_shape_is_named(tmp_path):
    root = make_latents(tmp_path / "latents", shape=lambda n: (4, 3, 3) if n == 1 else LATENT)
    with pytest.raises(DataError, match=r"shard-000001.safetensors.*mean has shape \(4, 4, 3, 3\).*\(4, 4, 2, 2\)"):
        ds = LatentDataset(root)
        ds.__getitems__(range(8))


def test_label_outside_the_classes_is_named_with_its_index(tmp_path, capsys):
    root = make_latents(tmp_path / "latents", labels=((0, 1, 0, 1), (1, 0, 7, 0)))
    run_dir = tmp_path / "run"
    code, err = run_cli(latent_train(root, run_dir), capsys)
    assert_one_line(code, err, "shard-000001.safetensors", "label 7", "index 6", "0..1")
    assert not run_dir.exists()


def test_a_shard_failing_its_checksum_inside_a_dataloader_worker_is_one_line(tmp_path):
    """Lazy verification runs where the shard is first read: in a worker process."""
    root = make_latents(tmp_path / "latents")
    shard = root / "shards" / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    ds = LatentDataset(root, verify="lazy")
    batches = step_batches(ds, DataOrder(len(ds), 0, shuffle=False), 8, 0, 1, 0, num_workers=1)
    with pytest.raises(DataError) as info:
        next(batches)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert "shard-000001.safetensors" in message and "sha256" in message
