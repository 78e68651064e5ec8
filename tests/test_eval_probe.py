"""Representation analysis: linear probe, CKNNA, PCA maps, block features, and their CLI commands."""
from __future__ import annotations

import json

import pytest
import torch

from selfalign.evaluation.probe import cknna, linear_probe


def test_probe_on_linearly_separable_features_is_perfect_and_on_noise_is_chance():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=g)
    centers = torch.randn(4, 16, generator=g) * 3
    separable = centers[labels] + 0.3 * torch.randn(600, 16, generator=g)
    assert linear_probe(separable[:400], labels[:400], separable[400:], labels[400:], epochs=20) == 1.0
    noise = torch.randn(600, 16, generator=g)
    assert linear_probe(noise[:400], labels[:400], noise[400:], labels[400:], epochs=20) < 0.4


def test_cknna_of_a_set_with_itself_is_one_and_with_random_features_near_zero():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 32, generator=g)
    assert cknna(a, a) == pytest.approx(1.0, abs=1e-2)
    # invariant to rotations and isotropic scaling of either side
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    assert cknna(a, 3.0 * a @ q) == pytest.approx(1.0, abs=1e-2)
    assert abs(cknna(a, torch.randn(400, 16, generator=g))) < 0.1
    noisy = cknna(a, a + 0.7 * torch.randn(400, 32, generator=g))
    assert 0.1 < noisy < 0.95
    with pytest.raises(ValueError, match="same examples"):
        cknna(a, a[:10])


def test_pca_rgb_maps_tokens_to_colours():
    from selfalign.evaluation.pca import pca_rgb

    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 16, 8, generator=g)
    rgb = pca_rgb(tokens)
    assert rgb.shape == (3, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    # tokens that differ only along one direction get colours that differ in the first component
    line = torch.linspace(-1, 1, 16)[None, :, None] * torch.ones(1, 1, 8)
    assert pca_rgb(line)[0, ..., 0].flatten().diff().abs().sum() > 0
    with pytest.raises(ValueError, match="square"):
        pca_rgb(torch.randn(1, 15, 8))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import randomize_zero_init
    from selfalign.config.experiment import load_config
    from selfalign.models.backbone import DiffusionTransformer
    from selfalign.formats.checkpoint import save_checkpoint

    config = load_config({"name": "tiny", "model": {"preset": "SiT-T/8"},
                          "data": {"kind": "fashion_mnist", "resolution": 32}})
    torch.manual_seed(0)
    weights = randomize_zero_init(DiffusionTransformer(config.backbone_config())).state_dict()
    run = tmp_path_factory.mktemp("probe") / "run"
    save_checkpoint(run, 1, {"model": weights, "ema": weights, "regularizers": {}},
                    {"optimizer": {"state": {}, "param_groups": []}},
                    {"config": json.loads(json.dumps(config.to_dict(), default=list))})
    return run


def test_block_features_are_deterministic_and_use_the_null_label(run_dir):
    from selfalign.evaluation.features import block_features
    from selfalign.runs import load_for_inference

    model, objective, _ = load_for_inference(run_dir)
    x0 = torch.rand(5, 1, 32, 32) * 2 - 1
    first = block_features(model, objective, x0, [2, 4], 0.3, torch.Generator().manual_seed(0), batch_size=2)
    again = block_features(model, objective, x0, [4, 2], 0.3, torch.Generator().manual_seed(0), batch_size=2)
    assert first[2].shape == (5, 128) and torch.equal(first[4], again[4])
    tokens = block_features(model, objective, x0, [2], 0.3, torch.Generator().manual_seed(0), pooled=False)
    assert tokens[2].shape == (5, 16, 128)
    null = torch.full((5,), model.config.num_classes)
    explicit = block_features(model, objective, x0, [2], 0.3, torch.Generator().manual_seed(0), labels=null)
    assert torch.allclose(explicit[2], tokens[2].mean(1), atol=1e-6)


def test_cli_probe_cknna_pca(run_dir, tmp_path, capsys):
    from selfalign.cli import main

    out = tmp_path / "probe"
    assert main(["eval", "probe", str(run_dir), str(run_dir), "--layers", "1,3", "--train-count", "200",
                 "--test-count", "100", "--epochs", "3", "--device", "cpu", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "linear probe accuracy" in table and out.with_suffix(".png").stat().st_size > 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert len(result["accuracy"]) == 2 and set(next(iter(result["accuracy"].values()))) == {"1", "3"}

    assert main(["eval", "cknna", str(run_dir), "--layers", "2", "--target", "block:6", "--target-t", "0.1",
                 "--count", "40", "--device", "cpu", "--json", str(tmp_path / "c.json")]) == 0
    scores = json.loads((tmp_path / "c.json").read_text())["cknna"]
    assert -1.0 <= scores["2"] <= 1.0
    assert main(["eval", "cknna", str(run_dir), "--layers", "3", "--target", "block:3", "--count", "40",
                 "--device", "cpu", "--json", str(tmp_path / "same.json")]) == 0
    assert json.loads((tmp_path / "same.json").read_text())["cknna"]["3"] == pytest.approx(1.0, abs=1e-2)

    assert main(["eval", "pca", str(run_dir), "--t", "0.2", "0.8", "--count", "2", "--device", "cpu",
                 "--out", str(tmp_path / "pca.png")]) == 0
    assert (tmp_path / "pca.png").stat().st_size > 0

    capsys.readouterr()
    assert main(["eval", "probe", str(run_dir), "--layers", "9", "--device", "cpu"]) == 2
    assert "1..6" in capsys.readouterr().err
    assert main(["eval", "cknna", str(run_dir), "--target", "teacher", "--device", "cpu"]) == 2
    assert "classifier, block:N or CHECKPOINT:N" in capsys.readouterr().err
