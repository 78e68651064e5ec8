"""In-domain metrics for Fashion-MNIST, in the feature space of the committed classifier.

* ``fd``: Frechet distance between the classifier's pooled 128-d features of the samples and of
  the 10,000 test images (float64, :func:`selfalign.evaluation.fid.frechet_distance`);
* ``accuracy``: how often the classifier assigns a class-conditional sample its label;
* ``precision`` / ``recall``: k-NN manifolds (k = 3, ADM's estimator) against as many test
  images as there are samples (a fixed random subset), since the estimator is biased when the two
  sets differ in size.

The test-set features are computed once per classifier file and cached in memory and on disk
(``$XDG_CACHE_HOME/selfalign``, default ``~/.cache/selfalign``), keyed by the weights' hash.

Only Fashion-MNIST-shaped images are scored (:func:`check_fashion_mnist_shaped`): grayscale
(one channel, or three equal ones) and square, 28 pixels or padded to at most twice that. Any
other image would still get numbers from the classifier, and they would mean nothing.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..data.fashion_mnist import NATIVE_SIZE, FashionMNIST
from ..data.transforms import uint8_to_model
from ..errors import DataError
from ..models.classifier import ASSET, FashionClassifier, classifier_weights, load_classifier
from .fid import FeatureStatistics, frechet_distance
from .precision_recall import precision_recall
from .reference import user_cache_dir

GRAY_TOLERANCE = 8 / 127.5          # channels within 8 uint8 levels of each other count as gray

_CLASSIFIERS: dict[tuple[str, str], FashionClassifier] = {}
_REFERENCES: dict[tuple[str, str], np.ndarray] = {}


def cached_classifier(device="cpu", path: str | Path | None = None) -> FashionClassifier:
    key = (str(path or ASSET), str(device))
    if key not in _CLASSIFIERS:
        _CLASSIFIERS[key] = load_classifier(path, device)
    return _CLASSIFIERS[key]


@torch.no_grad()
def classifier_outputs(classifier: FashionClassifier, images: torch.Tensor,
                       batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``(pooled features (N, 128), logits (N, 10))`` of model-space images ``(N, C, H, W)`` in [-1, 1]."""
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        f, l = classifier.features_and_logits(images[start:start + batch_size].to(device))
        feats.append(f.double().cpu())
        logits.append(l.float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def check_fashion_mnist_shaped(images: torch.Tensor, what: str = "the samples") -> None:
    """Refuse images (``N x C x H x W``, [-1, 1]) the Fashion-MNIST classifier cannot judge: it sees
    gray squares of 28 pixels, padded evenly as the training data is (``data.resolution``), so colour
    images, other sizes or odd paddings would be scored as if they were clothes."""
    _, channels, height, width = images.shape
    gray = channels == 1 or (channels == 3 and float((images - images[:, :1]).abs().max()) <= GRAY_TOLERANCE)
    padded_evenly = height == width and height >= NATIVE_SIZE and (height - NATIVE_SIZE) % 2 == 0
    if not gray or not padded_evenly:
        raise DataError(f"{what} are not Fashion-MNIST-shaped ({height}x{width}x{channels}"
                        f"{'' if gray else ', colour'}; expected gray squares of {NATIVE_SIZE} pixels, or padded "
                        f"evenly to an even size): the Fashion-MNIST classifier cannot judge them; use "
                        f"`selfalign eval fid` with a reference of your own images")

def reference_features(classifier_path: str | Path | None = None, device="cpu") -> np.ndarray:
    """Classifier features of the Fashion-MNIST test split (cached in memory and on disk)."""
    path = classifier_weights(classifier_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    key = (digest, str(device))
    if key in _REFERENCES:
        return _REFERENCES[key]
    cache = user_cache_dir() / f"fashion_mnist_test_features_{digest}.npy"
    if cache.is_file():
        try:
            feats = np.load(cache)
        except (OSError, ValueError):
            feats = None          # a damaged cache file is recomputed
        if feats is not None and feats.shape == (10000, FashionClassifier().feature_dim):
            _REFERENCES[key] = feats
            return feats
    test = FashionMNIST("test", resolution=NATIVE_SIZE)
    feats, _ = classifier_outputs(cached_classifier(device, classifier_path), uint8_to_model(test.images))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, feats)
        tmp.replace(cache)
    except OSError:
        pass                      # a read-only home only costs the recomputation
    _REFERENCES[key] = feats
    return feats


def indomain_metrics(images: torch.Tensor, labels: torch.Tensor | np.ndarray | None = None,
                     device="cpu", classifier_path: str | Path | None = None, seed: int = 0) -> dict[str, float]:
    """FD, accuracy (when labels are given), precision and recall of model-space images in [-1, 1]."""
    if len(images) < 4:
        raise DataError(f"in-domain metrics need at least 4 images, got {len(images)}")
    check_fashion_mnist_shaped(images)
    classifier = cached_classifier(device, classifier_path)
    if labels is not None:
        labels = np.asarray(labels)
        classes = classifier.head.out_features
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or not (
                (labels >= 0) & (labels < classes)).all():
            found = f" from {labels.min()} to {labels.max()}" if labels.size else ""
            raise DataError(f"the sample labels (arr_1) must be class numbers 0..{classes - 1}, one per image; "
                            f"got {len(labels)} of {labels.dtype}{found}")
    feats, logits = classifier_outputs(classifier, images)
    reference = reference_features(classifier_path, device)
    results = {"fd": frechet_distance(FeatureStatistics.of(feats), FeatureStatistics.of(reference))}
    if labels is not None:
        results["accuracy"] = float((logits.argmax(1) == labels).mean())
    subset = np.random.default_rng(seed).permutation(len(reference))[:min(len(feats), len(reference))]
    results["precision"], results["recall"] = precision_recall(reference[subset], feats)
    return results


def uint8_to_model_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 ``N x H x W x C`` (an ADM .npz) -> float ``(N, C, H, W)`` in [-1, 1]."""
    return uint8_to_model(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))
