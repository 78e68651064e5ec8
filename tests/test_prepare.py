"""selfalign prepare: listing rules, corrupt images reported and skipped, latents equal to a direct
VAE encode, 2 processes write the same shards as 1, an interrupted prepare resumes, bad input exits 2."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from selfalign.cli import main
from selfalign.pipeline.prepare import PrepareConfig, prepare
from selfalign.data.sources import ImageReader, list_images
from selfalign.data.vae import LatentVAE, tiny_vae_config
from selfalign.errors import UsageError

SIZE = 16


def write_images(folder, count, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = SIZE + int(rng.integers(0, 20)), SIZE + int(rng.integers(0, 20))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG", quality=95)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("prepare")
    root = base / "imagenet"
    for k, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
        write_images(root / "train" / wnid, 3, k)
    write_images(root / "val" / "n01440764", 1, 9)
    (root / "train" / "n01443537" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    torch.manual_seed(0)
    vae = LatentVAE.load(tiny_vae_config(downsample=2))
    vae.autoencoder.save_pretrained(base / "vae")
    return base, root, vae


def config(setup, out, **kw):
    base, root, _ = setup
    values = dict(source=str(root), out=str(out), image_size=SIZE, vae=str(base / "vae"), shard_size=3,
                  batch_size=2, workers=0, progress=False)
    return PrepareConfig(**{**values, **kw})


def shard_hashes(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = prepare(config(setup, out), vae=setup[2])
    assert result.complete
    return out, result


def test_listing_picks_train_split_and_sorted_classes(setup, tmp_path):
    _, root, _ = setup
    listing = list_images(root)
    assert listing.prefix == "train/" and listing.class_names == ("n01440764", "n01443537", "n01484850")
    assert len(listing) == 10 and list(listing.paths) == sorted(listing.paths)
    # The same tree inside a zip (with a wrapping folder) lists the same images and labels.
    archive = tmp_path / "imagenet.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(root.rglob("*.JPEG")):
            z.write(path, "wrap/" + path.relative_to(root).as_posix())
    zipped = list_images(archive)
    assert zipped.paths == listing.paths and zipped.labels == listing.labels
    reader, zip_reader = ImageReader.of(listing), ImageReader.of(zipped)
    assert np.array_equal(reader.read_cropped(listing.paths[0], SIZE), zip_reader.read_cropped(zipped.paths[0], SIZE))
    write_images(tmp_path / "flat", 2, 0)          # no class folders: one class
    flat = list_images(tmp_path / "flat")
    assert flat.class_names == ("flat",) and flat.labels == (0, 0)


def test_corrupt_image_is_reported_and_latents_match_a_direct_encode(setup, reference):
    _, root, vae = setup
    out, result = reference
    index = json.loads((out / "index.json").read_text())
    assert result.skipped_images == 1 and index["skipped"] == 1 and index["count"] == 9
    assert (out / "skipped.txt").read_text().startswith("n01443537/broken.JPEG\t")
    assert index["class_counts"] == [3, 3, 3] and index["latent_shape"] == [4, 8, 8]
    assert index["vae"] == str(setup[0] / "vae") and index["scale"] == pytest.approx(0.18215)
    for entry in index["shards"]:
        assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    from safetensors.torch import load_file
    listing = list_images(root)
    reader = ImageReader.of(listing)
    entry = index["shards"][1]            # the shard that lost its corrupt image
    assert entry["count"] == 2 and "n01443537/broken.JPEG" not in entry["sources"]
    crops = torch.from_numpy(np.stack([reader.read_cropped(p, SIZE) for p in entry["sources"]]))
    mean, std = vae.encode_uint8(crops)
    stored = load_file(str(out / entry["file"]))
    torch.testing.assert_close(stored["mean"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stored["std"], std, rtol=1e-5, atol=1e-6)
    assert stored["labels"].tolist() == entry["labels"] == [1, 1]


def test_two_processes_write_the_same_shards_as_one(setup, reference, tmp_path):
    base, root, _ = setup
    out = tmp_path / "two"
    args = [str(root), str(out), "--image-size", str(SIZE), "--vae", str(base / "vae"), "--shard-size", "3",
            "--batch-size", "2", "--workers", "0", "--world-size", "2", "--no-progress"]
    # Same intra-op thread count as this process: CPU convolutions round differently with another.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    procs = [subprocess.Popen([sys.executable, "-m", "selfalign.cli", "prepare", *args, "--rank", str(r)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert shard_hashes(out) == shard_hashes(reference[0]) and len(shard_hashes(out)) == 4
    assert json.loads((out / "index.json").read_text()) == json.loads((reference[0] / "index.json").read_text())


def test_interrupted_prepare_resumes_and_rebuilds_damaged_shards(setup, reference, tmp_path):
    out = tmp_path / "resume"
    first = prepare(config(setup, out, max_shards=2), vae=setup[2])   # "killed" after two shards
    assert first.shards_written == [0, 1] and not first.complete and not (out / "index.json").exists()
    (out / "shards" / "shard-000002.safetensors.tmp-999").write_bytes(b"half a shard")   # crash leftover
    damaged = out / "shards" / "shard-000001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    second = prepare(config(setup, out), vae=setup[2])
    assert second.shards_reused == [0] and second.shards_written == [1, 2, 3] and second.complete
    assert shard_hashes(out) == shard_hashes(reference[0])
    assert not list((out / "shards").glob("*.tmp-*"))
    third = prepare(config(setup, out), vae=setup[2])
    assert third.shards_written == [] and third.shards_reused == [0, 1, 2, 3] and third.complete
    with pytest.raises(UsageError, match="different settings \\(image_size"):
        prepare(config(setup, out, image_size=24), vae=setup[2])


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing", "{tmp}/o"], "does not exist"),
    (["{tmp}/empty", "{tmp}/o"], "holds no images"),
    (["{root}", "{tmp}/o", "--image-size", "100"], "multiple of 8"),
    (["{root}", "{tmp}/o", "--vae", "{tmp}/empty"], "no config.json"),
])
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, root=setup[1]) for a in argv]
    assert main(["prepare", *argv, "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
