"""Data: Fashion-MNIST from IDX files, ImageFolder with the ADM crop, the resumable data order."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from selfalign.data import DataOrder, FashionMNIST, ImageFolder, TrainingDataset, build_dataset, step_batches
from selfalign.data.imagefolder import describe_folder
from selfalign.data.fashion_mnist import ENV_VAR
from selfalign.data.transforms import center_crop_arr, model_to_uint8, uint8_to_model
from selfalign.errors import ConfigError, DataError


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(root, n=5, split="train"):
    prefix = "train" if split == "train" else "t10k"
    images = np.arange(n * 28 * 28).reshape(n, 28, 28) % 256
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return images


def test_fashion_mnist_splits_padding_and_range():
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert len(train) == 60000 and len(test) == 10000
    x, y = train.__getitems__([0, 1, 2])
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == [9, 0, 0]                      # the published first labels
    assert x.min() == -1 and x.max() == 1
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :2].flatten()])
    assert (border == -1).all()                         # padding is the background value
    single, label = train[0]
    assert torch.equal(single, x[0]) and label == 9
    assert set(test.labels.unique().tolist()) == set(range(10))


def test_fashion_mnist_env_var_and_idx_parser(tmp_path, monkeypatch):
    images = fake_fashion(tmp_path)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    data = FashionMNIST("train", resolution=28)
    assert len(data) == 5 and data.labels.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(data.images[:, 0], torch.from_numpy(images.astype(np.uint8)))


def test_fashion_mnist_missing_or_damaged_files_say_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST("train", path=tmp_path)
    fake_fashion(tmp_path)
    raw = gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz is truncated"):
        FashionMNIST("train", path=tmp_path)
    with pytest.raises(ConfigError, match="data.resolution=29 does not fit"):
        FashionMNIST("test", resolution=29)


def test_center_crop_is_the_adm_crop():
    # 200x120 with a vertical red stripe in the middle -> 32x32: box halving once (100x60),
    # bicubic to 53x32, center crop columns 10..42.
    array = np.zeros((120, 200, 3), dtype=np.uint8)
    array[:, 96:104, 0] = 255
    out = center_crop_arr(Image.fromarray(array), 32)
    assert out.size == (32, 32)
    by_hand = Image.fromarray(array).resize((100, 60), Image.BOX).resize((53, 32), Image.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(by_hand)[:, 10:42])
    assert np.asarray(out)[:, 16, 0].min() > 200 and np.asarray(out)[:, :8, 0].max() < 10
    same = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(center_crop_arr(Image.fromarray(same), 32)), same)
    pixels = torch.tensor([[0, 127, 255]], dtype=torch.uint8)
    assert torch.equal(model_to_uint8(uint8_to_model(pixels)), pixels)


def test_imagefolder_classes_crop_and_bad_files(tmp_path):
    for name, size in (("cats", (40, 30)), ("dogs", (64, 64))):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", size, (i * 100, 50, 200)).save(tmp_path / name / f"{i}.png")
    data = ImageFolder(tmp_path, 16)
    assert data.classes == ["cats", "dogs"] and len(data) == 4
    x, y = data.__getitems__([0, 3])
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]
    assert torch.allclose(x[1, :, 0, 0], uint8_to_model(torch.tensor([100, 50, 200], dtype=torch.uint8)))
    (tmp_path / "dogs" / "2.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"image 4 \(.*dogs/2.png\) cannot be read"):
        ImageFolder(tmp_path, 16)                 # the header scan finds it before training starts
    (tmp_path / "dogs" / "2.png").write_bytes((tmp_path / "dogs" / "1.png").read_bytes()[:60])
    data = ImageFolder(tmp_path, 16)              # a readable header, truncated pixels
    with pytest.raises(DataError, match=r"image 4 \(.*dogs/2.png\) cannot be read"):
        data.__getitems__([4])
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolder(tmp_path / "empty", 16)


def test_imagefolder_decides_classes_channels_and_checks_the_resolution(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / "gray" / name).mkdir(parents=True)
        Image.new("L", (24, 20), 40).save(tmp_path / "gray" / name / "0.png")
    summary = describe_folder(tmp_path / "gray")
    assert (summary.num_classes, summary.channels, summary.smallest, summary.count) == (3, 1, (24, 20), 3)
    data = ImageFolder(tmp_path / "gray", 16)
    x, y = data.__getitems__([0, 2])
    assert x.shape == (2, 1, 16, 16) and y.tolist() == [0, 2]
    assert torch.allclose(x, uint8_to_model(torch.full((2, 1, 16, 16), 40, dtype=torch.uint8)))
    Image.new("RGB", (30, 30), (1, 2, 3)).save(tmp_path / "gray" / "b" / "1.png")
    assert describe_folder(tmp_path / "gray").channels == 3        # one colour image: RGB
    with pytest.raises(DataError, match=r"data.resolution=21 but the smallest image .* is 24x20"):
        ImageFolder(tmp_path / "gray", 21)


def test_data_order_is_deterministic_per_epoch_and_split_over_ranks():
    order = DataOrder(10, seed=3)
    assert torch.equal(order.permutation(0), DataOrder(10, seed=3).permutation(0))
    assert not torch.equal(order.permutation(0), DataOrder(10, seed=4).permutation(0))
    assert not torch.equal(order.permutation(0), order.permutation(1))
    assert sorted(order.permutation(1).tolist()) == list(range(10))
    across = order.take(8, 4)                               # two from epoch 0, two from epoch 1
    assert torch.equal(across, torch.cat([order.permutation(0)[8:], order.permutation(1)[:2]]))
    # Step 2 of a global batch of 6 over 2 ranks: positions 12..17 = epoch 1, offsets 2..7.
    ranks = [order.rank_indices(2, 6, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(ranks), order.permutation(1)[2:8])


def test_step_batches_resume_mid_stream():
    data = FashionMNIST("test")
    order = DataOrder(len(data), seed=0)
    straight = step_batches(data, order, 4, 0, 1, start_step=0)
    batches = [next(straight) for _ in range(3)]
    resumed = next(step_batches(data, order, 4, 0, 1, start_step=2))
    assert torch.equal(resumed[0], batches[2][0]) and torch.equal(resumed[1], batches[2][1])


def test_build_dataset_from_config():
    from selfalign.config.experiment import load_config
    config = load_config({"model": {"preset": "SiT-T/4"}})
    data = build_dataset(config.data, "test")
    assert isinstance(data, FashionMNIST) and len(data) == 10000


def test_pixel_datasets_are_training_datasets_whose_batches_are_the_model_input(tmp_path):
    fake_fashion(tmp_path, n=4)
    (tmp_path / "images" / "only").mkdir(parents=True)
    Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "images" / "only" / "a.png")
    for data, channels, classes in ((FashionMNIST("train", path=tmp_path), 1, 10),
                                    (ImageFolder(tmp_path / "images", 16), 3, 1)):
        assert isinstance(data, TrainingDataset) and data.flippable
        assert (data.channels, data.num_classes) == (channels, classes)
        x, y = data.__getitems__([0])
        assert data.to_model(x, torch.Generator()) is x and data.decode(x) is x
        assert y.dtype == torch.long

