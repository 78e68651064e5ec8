"""Improved precision and recall (Kynkaanniemi et al. 2019) with ADM's k-NN manifold estimator.

As in ADM's ``ManifoldEstimator`` (k = 3): each feature vector gets the radius of its k-th nearest
neighbour within its own set (the set includes the point itself, so it is the 4th smallest
distance); distances are **squared** Euclidean. Precision = fraction of samples inside at least
one reference hypersphere; recall = fraction of reference points inside at least one sample
hypersphere. Computed in row x column blocks in float32 (ADM tries float16 first, then float32).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError

NEIGHBORHOOD = 3
_BLOCK = 10000


def _squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    norm_u = (u * u).sum(1, keepdim=True)
    norm_v = (v * v).sum(1)[None]
    return (norm_u - 2 * u @ v.T + norm_v).clamp_min_(0.0)


def manifold_radii(features: np.ndarray | torch.Tensor, k: int = NEIGHBORHOOD,
                   block: int = _BLOCK) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set, ``(N,)``."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if len(x) <= k:
        raise DataError(f"precision/recall with k={k} needs more than {k} feature vectors, got {len(x)}")
    radii = torch.empty(len(x))
    for start in range(0, len(x), block):
        rows = x[start:start + block]
        dist = torch.cat([_squared_distances(rows, x[c:c + block]) for c in range(0, len(x), block)], 1)
        radii[start:start + len(rows)] = dist.kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = NEIGHBORHOOD,
                     block: int = _BLOCK) -> tuple[float, float]:
    """``(precision, recall)`` of ``samples`` against ``reference`` feature vectors."""
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float32)
    gen = torch.as_tensor(np.asarray(samples), dtype=torch.float32)
    if ref.shape[1:] != gen.shape[1:]:
        raise DataError(f"reference features {tuple(ref.shape)} and sample features {tuple(gen.shape)} "
                        "have different dimensions")
    radii_ref, radii_gen = manifold_radii(ref, k, block), manifold_radii(gen, k, block)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool)   # recall: reference inside a sample ball
    gen_covered = torch.zeros(len(gen), dtype=torch.bool)   # precision: sample inside a reference ball
    for r in range(0, len(ref), block):
        for g in range(0, len(gen), block):
            dist = _squared_distances(ref[r:r + block], gen[g:g + block])
            gen_covered[g:g + block] |= (dist <= radii_ref[r:r + block, None]).any(0)
            ref_covered[r:r + block] |= (dist <= radii_gen[None, g:g + block]).any(1)
    return float(gen_covered.float().mean()), float(ref_covered.float().mean())
