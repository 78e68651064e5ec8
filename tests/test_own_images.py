"""Your own images, end to end, on a small generated folder (8 classes of coloured shapes):
train with in-loop evaluation, resume without a config, sample, reference statistics, FID,
probe, and the comparison report; plus the reference cache and the run names on their own.

The TF-FID Inception network runs at a few images/s on a CPU, too slow here: these tests put a
tiny stand-in feature network in its place through ``$SELFALIGN_INCEPTION`` (the documented
injection point of :mod:`selfalign.evaluation.inception`); the real network's speed and output
are checked by ``benchmarks/inception_throughput.py`` and ``tests/test_eval_fid.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw

from selfalign.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")    # tiny models: a second thread only waits

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "imagefolder.yaml"
SIZE = 16
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 200, 30)]


class StandIn(torch.nn.Module):
    """48 features: the mean colour of each cell of a 4x4 grid of the 299 px network input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.fixture
def standin(tmp_path, monkeypatch):
    path = tmp_path / "standin.pt"
    torch.jit.script(StandIn()).save(str(path))
    monkeypatch.setenv("SELFALIGN_INCEPTION", str(path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return path


def make_shapes(root: Path, per_class: int = 4, size: int = SIZE) -> Path:
    """8 classes: a disc or a square, in one of four colours, jittered, on a dark background."""
    rng = np.random.default_rng(0)
    for c in range(8):
        folder = root / f"{'disc' if c < 4 else 'square'}-{c % 4}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 40, 3)))
            draw = ImageDraw.Draw(image)
            x, y, r = (*rng.integers(5, size - 5, 2), int(rng.integers(3, 5)))
            box = (x - r, y - r, x + r, y + r)
            (draw.ellipse if c < 4 else draw.rectangle)(box, fill=COLOURS[c % 4])
            image.save(folder / f"{i}.png")
    return root


def tiny(data: Path, total_kimg: float = 0.032, extra=()) -> list[str]:
    """Overrides that make the example config a seconds-long CPU run (8-image steps)."""
    sets = [f"data.path={data}", f"data.resolution={SIZE}", "data.num_workers=0", "model.preset=SiT-T/8",
            "train.batch_size=8", f"train.total_kimg={total_kimg}", "train.log_every_kimg=0.008",
            "train.ckpt_every_kimg=0.016", "train.keep_last=5", "train.eval_every_kimg=0.016",
            "train.eval_samples=16", "train.sample_every_kimg=0.032", "train.sample_count=8",
            "train.device=cpu", "train.ema_decay=0.9", "sampler.steps=4", "logging.tensorboard=false",
            "logging.progress_bar=false", *extra]
    return [arg for s in sets for arg in ("--set", s)]


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_your_own_images_end_to_end(tmp_path, standin, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_shapes(tmp_path / "shapes")

    # train from the example config: the folder decides classes and channels; evaluation in the loop
    run = tmp_path / "vanilla"
    assert main(["train", str(EXAMPLE), "--run-dir", str(run), *tiny(data)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["num_classes"] == 8 and saved["model"]["in_channels"] == 3
    evals = records(run, "eval")
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:         # never an empty record: every one carries the metrics and their counts
        assert {"fid", "precision", "recall", "eval_samples", "reference_images"} <= set(e)
        assert e["eval_samples"] == 16 and e["reference_images"] == 32 and e["fid"] > 0
    cached = list((data / ".selfalign").glob("reference-16px-*.npz"))
    assert len(cached) == 1                         # computed once, beside the data
    out = capsys.readouterr().out
    assert out.count("(computed once, then cached)") == 1 and "from the cache" in out
    assert "evaluation every 0.016 kimg: 16 samples, FID" in out

    # resume with no config: the run's own; --set may only change what may change on resume
    assert main(["train", "--run-dir", str(run), "--resume", "auto", "--set", "train.total_kimg=0.048"]) == 0
    assert [e["step"] for e in records(run, "eval")] == [2, 4, 6]
    assert main(["train", "--run-dir", str(run), "--resume", "auto", "--set", "train.lr=1.0"]) == 2
    err = capsys.readouterr().err
    assert "train.lr cannot change when resuming" in err and len(err.strip().splitlines()) == 1

    # a second run from a Fashion-MNIST preset pointed at the folder: named after the data
    assert main(["train", "fmnist-cpu-tiny-sra", *tiny(data, extra=["data.kind=imagefolder"])]) == 0
    sra = tmp_path / "runs" / "shapes-sit-t8-sra"
    assert yaml.safe_load((sra / "config.yaml").read_text())["name"] == "shapes-sit-t8-sra"
    capsys.readouterr()

    # sample, then FID against the folder: the cached reference statistics are reused
    assert main(["sample", str(run), "--out", str(tmp_path / "samples"), "-n", "16", "--steps", "4",
                 "--class-balanced", "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["eval", "fid", str(tmp_path / "samples" / "samples.npz"), "--ref", str(data),
                 "--resolution", str(SIZE), "--no-progress", "--json", str(tmp_path / "fid.json")]) == 0
    out = capsys.readouterr().out
    assert "from the cache" in out and "Samples: 16" in out and "Reference images: 32" in out
    fid = json.loads((tmp_path / "fid.json").read_text())
    assert fid["fid"] > 0 and 0 <= fid["precision"] <= 1
    assert len(list((data / ".selfalign").glob("*.npz"))) == 1

    # probe: a held-out split of the folder, disjoint from the probe's training images, and said so
    assert main(["eval", "probe", str(run), "--layers", "1,2", "--epochs", "2", "--device", "cpu",
                 "--out", str(tmp_path / "probe")]) == 0
    out = capsys.readouterr().out
    assert "26 train / 6 test images: a held-out split of the training data" in out
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["data"]["my-images-vanilla"]["test_images"] == 6

    # the report of both runs
    report_dir = tmp_path / "report"
    assert main(["report", str(run), str(sra), "--out", str(report_dir), "--loss-images", "16",
                 "--grid-steps", "2", "--device", "cpu"]) == 0
    report = (report_dir / "report.md").read_text()
    assert "| my-images-vanilla |" in report and "| shapes-sit-t8-sra |" in report
    assert "FID (Inception, against the training images)" in report
    assert "denoising loss (16 training images)" in report and "standard error" in report
    for name in ("loss_curves.png", "metrics_vs_kimg.png", "samples_side_by_side.png"):
        with Image.open(report_dir / name) as image:
            assert image.width > 100


def test_reference_cache_is_keyed_by_the_file_list_and_falls_back_to_the_user_cache(tmp_path, standin, monkeypatch):
    from selfalign.evaluation import reference as ref
    from selfalign.evaluation.fid import FeatureStatistics, frechet_distance
    from selfalign.evaluation.inception import InceptionV3
    from selfalign.evaluation.metrics import inception_activations
    from selfalign.evaluation.images import FolderSource

    data = make_shapes(tmp_path / "shapes", per_class=2)
    network = InceptionV3()
    first, path = ref.cached_reference(data, SIZE, network, progress=False, log=lambda _m: None)
    assert path.parent == data / ".selfalign" and first.count == 16
    # the statistics are those of the images, center-cropped like the training data
    direct = inception_activations(network, FolderSource(data, SIZE), progress=False).pool
    assert frechet_distance(first.pool, FeatureStatistics.of(direct)) < 1e-8
    again, same = ref.cached_reference(data, SIZE, network, progress=False, log=lambda _m: None)
    assert same == path and np.array_equal(again.pool_features, first.pool_features)
    # one more image: another file list, another cache file
    Image.new("RGB", (SIZE, SIZE), (9, 9, 9)).save(data / "disc-0" / "extra.png")
    third, other = ref.cached_reference(data, SIZE, network, progress=False, log=lambda _m: None)
    assert other != path and third.count == 17
    # a data folder that cannot be written: the user's cache instead
    monkeypatch.setattr(ref, "_writable", lambda folder: False)
    fourth, elsewhere = ref.cached_reference(data, SIZE, network, progress=False, log=lambda _m: None)
    assert elsewhere.is_relative_to(tmp_path / "cache" / "selfalign" / "references") and fourth.count == 17


def test_the_data_decides_and_a_contradicting_config_is_refused(tmp_path):
    from selfalign.commands.train import run_name
    from selfalign.config.experiment import load_config
    from selfalign.errors import ConfigError, DataError

    data = make_shapes(tmp_path / "shapes", per_class=1)
    sets = [f"data.path={data}", "data.kind=imagefolder", f"data.resolution={SIZE}", "model.preset=SiT-T/8"]
    config = load_config("fmnist-cpu-tiny-vanilla", sets)
    assert (config.model.num_classes, config.model.in_channels) == (8, 3)
    assert run_name(config, "fmnist-cpu-tiny-vanilla", sets) == "shapes-sit-t8-vanilla"
    assert run_name(config, "fmnist-cpu-tiny-vanilla", [*sets, "name=mine"]) == config.name
    assert run_name(load_config("fmnist-cpu-tiny-sra"), "fmnist-cpu-tiny-sra", []) == "fmnist-cpu-tiny-sra"
    with pytest.raises(ConfigError, match=r"model.num_classes=1000 but the image folder .* has 8 classes; leave"):
        load_config("fmnist-cpu-tiny-vanilla", [*sets, "model.num_classes=1000"])
    with pytest.raises(ConfigError, match=r"model.in_channels=1 but the image folder .* has 3 channels"):
        load_config("fmnist-cpu-tiny-vanilla", [*sets, "model.in_channels=1"])
    with pytest.raises(DataError, match=r"data.resolution=32 but the smallest image .* is 16x16"):
        load_config("fmnist-cpu-tiny-vanilla", [*sets, "data.resolution=32"])
