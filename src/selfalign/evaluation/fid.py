"""Frechet distance, Inception Score and ADM-format reference batches.

The Frechet distance is computed in float64 with ``scipy.linalg.sqrtm`` and the same fallback as
ADM's evaluator and pytorch-fid: when the product of the covariances is singular (non-finite
square root), ``eps * I`` is added to both covariances. It works for any feature space (Inception
pool_3 -> FID, mixed_6/conv -> sFID, the Fashion-MNIST classifier -> in-domain FD).

Reference batch ``.npz`` (ADM's layout, readable by ADM's ``evaluator.py``): ``mu``, ``sigma``
(pool_3), ``mu_s``, ``sigma_s`` (spatial) and ``arr_0`` (uint8 images for precision/recall).
selfalign adds ``pool_features`` (N x 2048 float32 of the ``arr_0`` images) so precision/recall
need no second Inception pass; ADM's published batches lack it and get it computed from ``arr_0``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import linalg

from ..errors import DataError


@dataclass
class FeatureStatistics:
    """Mean and covariance of a feature set (float64)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStatistics":
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise DataError(f"need at least 2 feature vectors (N x D) for statistics, got {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics, eps: float = 1e-6) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` in float64."""
    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise DataError(f"feature statistics have different dimensions: {mu1.shape} vs {mu2.shape}; "
                        "were they computed with the same network?")
    diff = mu1 - mu2
    # plain sqrtm (recent SciPy releases dropped ``disp=False``) returns the matrix on every SciPy
    # version; a failed root shows up as non-finite entries below
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"Frechet distance: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DataError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} "
                            "in the covariance square root; use more samples than feature dimensions")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """IS as in ADM / improved-gan: ``exp(E_x KL(p(y|x) || p(y)))`` averaged over splits of 5000."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        kl = part * (np.log(part + 1e-30) - np.log(part.mean(axis=0, keepdims=True) + 1e-30))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


@dataclass
class ReferenceBatch:
    """What FID/sFID/precision/recall need from the reference side."""

    pool: FeatureStatistics
    spatial: FeatureStatistics | None
    pool_features: np.ndarray | None = None    # for precision/recall
    images: np.ndarray | None = None           # arr_0, when the features must still be computed
    count: int | None = None                   # images behind the statistics, when recorded


def save_reference_batch(path: str | Path, pool_features: np.ndarray, spatial_features: np.ndarray | None,
                         images: np.ndarray | None, pr_count: int | None = None, extra: dict | None = None) -> None:
    """Write an ADM-compatible reference batch; statistics use all features, ``arr_0`` the first
    ``pr_count``; ``extra`` arrays (e.g. ``count``) are stored beside them."""
    pool = FeatureStatistics.of(pool_features)
    arrays = {"mu": pool.mu, "sigma": pool.sigma, **(extra or {})}
    if spatial_features is not None:
        spatial = FeatureStatistics.of(spatial_features)
        arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    keep = len(pool_features) if pr_count is None else min(pr_count, len(pool_features))
    arrays["pool_features"] = np.asarray(pool_features[:keep], dtype=np.float32)
    if images is not None:
        arrays["arr_0"] = images[:keep]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")   # never leave half a file under the real name
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_reference_batch(path: str | Path) -> ReferenceBatch:
    """Read a reference batch written by ``selfalign eval ref`` or one of ADM's published ones."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference batch {path} not found")
    try:
        data = np.load(path)
        keys = set(data.files)
    except Exception as err:   # zipfile/pickle errors: not an npz at all
        raise DataError(f"{path} is not a readable .npz reference batch ({err})") from None
    if not {"mu", "sigma"} <= keys:
        raise DataError(f"{path} has no mu/sigma: not a reference batch (keys: {sorted(keys)}); "
                        "make one with `selfalign eval ref`")
    spatial = _statistics(path, data, "mu_s", "sigma_s") if {"mu_s", "sigma_s"} <= keys else None
    features = data["pool_features"] if "pool_features" in keys else None
    if features is not None and not np.isfinite(features).all():
        raise DataError(f"{path}: pool_features hold NaN or infinite values; the reference batch is damaged: "
                        f"make it again with `selfalign eval ref`")
    return ReferenceBatch(
        pool=_statistics(path, data, "mu", "sigma"),
        spatial=spatial,
        pool_features=features,
        images=data["arr_0"] if "arr_0" in keys and "pool_features" not in keys else None,
        count=int(data["count"]) if "count" in keys else None)


def _statistics(path: Path, data, mean_key: str, cov_key: str) -> FeatureStatistics:
    """A stored mean and covariance, refused unless they are a D vector and a finite D x D matrix
    (NaN statistics would make every score NaN)."""
    mu, sigma = np.asarray(data[mean_key]), np.asarray(data[cov_key])
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DataError(f"{path}: {mean_key} {mu.shape} and {cov_key} {sigma.shape} are not a mean and its "
                        f"covariance; make the reference batch again with `selfalign eval ref`")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DataError(f"{path}: {mean_key}/{cov_key} hold NaN or infinite values; the reference batch is "
                        f"damaged: make it again with `selfalign eval ref`")
    return FeatureStatistics(mu, sigma)


def is_reference_batch(path: str | Path) -> bool:
    """An .npz holding ``mu`` (a reference batch) rather than only samples."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        return "mu" in np.load(path).files
    except Exception:
        return False
