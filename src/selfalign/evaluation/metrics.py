"""FID, sFID, Inception Score, precision and recall of an image source, as the ADM suite computes them.

    network = InceptionV3()
    reference = resolve_reference("VIRTUAL_imagenet256_labeled.npz", network)
    scores = evaluate_source(open_source("samples.npz"), reference, network)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import DataError

from .fid import FeatureStatistics, ReferenceBatch, frechet_distance, inception_score, is_reference_batch, load_reference_batch
from .images import ArraySource, ImageSource, open_source
from .inception import InceptionOutputs, InceptionV3
from .precision_recall import NEIGHBORHOOD, precision_recall
from .reference import REFERENCE_LIMIT, cached_reference

PR_REFERENCE_COUNT = 10000   # ADM's reference batches keep 10K images for precision/recall


def inception_activations(network: InceptionV3, source: ImageSource, batch_size: int = 50,
                          limit: int | None = None, progress: bool = True) -> InceptionOutputs:
    """Inception outputs of every image of ``source`` (or its first ``limit``)."""
    total = len(source) if limit is None else min(limit, len(source))
    pools, spatials, logits = [], [], []
    with tqdm(total=total, unit="img", desc=f"inception {source.name}", disable=not progress) as bar:
        for batch in source.batches(batch_size, limit):
            out = network(batch)
            pools.append(out.pool)
            if out.spatial is not None:
                spatials.append(out.spatial)
            if out.logits is not None:
                logits.append(out.logits)
            bar.update(len(batch))
    if not pools:
        raise DataError(f"{source.name} holds no images")
    return InceptionOutputs(np.concatenate(pools), np.concatenate(spatials) if spatials else None,
                            np.concatenate(logits) if logits else None)


def reference_from_source(network: InceptionV3, source: ImageSource, batch_size: int = 50,
                          limit: int | None = None, progress: bool = True) -> tuple[ReferenceBatch, InceptionOutputs]:
    acts = inception_activations(network, source, batch_size, limit, progress)
    spatial = FeatureStatistics.of(acts.spatial) if acts.spatial is not None else None
    return ReferenceBatch(FeatureStatistics.of(acts.pool), spatial, acts.pool, count=len(acts.pool)), acts


def resolve_reference(spec: str, network: InceptionV3, resolution: int | None = None, batch_size: int = 50,
                      limit: int | None = None, progress: bool = True, log=print) -> ReferenceBatch:
    """A reference batch .npz (ours or ADM's), the cached statistics of a folder of real images at
    ``resolution`` (:mod:`.reference`, computed and cached on first use), or statistics computed
    from any other image source."""
    if resolution and Path(spec).is_dir():
        return cached_reference(spec, resolution, network, limit or REFERENCE_LIMIT, batch_size, progress, log)[0]
    if is_reference_batch(spec):
        reference = load_reference_batch(spec)
        if reference.pool_features is None and reference.images is not None:
            # ADM's published batches carry images, not features: one Inception pass over arr_0.
            images = ArraySource(reference.images, f"{spec}:arr_0")
            reference.pool_features = inception_activations(network, images, batch_size, None, progress).pool
            reference.images = None
        return reference
    return reference_from_source(network, open_source(spec, resolution), batch_size, limit, progress)[0]


def evaluate_source(source: ImageSource, reference: ReferenceBatch, network: InceptionV3, batch_size: int = 50,
                    limit: int | None = None, progress: bool = True, log=print) -> dict[str, float]:
    """FID, sFID, IS (networks with logits), precision and recall of ``source`` against ``reference``."""
    acts = inception_activations(network, source, batch_size, limit, progress)
    results = {"num_samples": float(len(acts.pool)),
               "fid": frechet_distance(FeatureStatistics.of(acts.pool), reference.pool)}
    if acts.spatial is not None and reference.spatial is not None:
        results["sfid"] = frechet_distance(FeatureStatistics.of(acts.spatial), reference.spatial)
    else:
        log("sFID skipped: " + ("the reference has no mu_s/sigma_s" if acts.spatial is not None
                                else "this network has no mixed_6/conv layer"))
    if acts.logits is not None:
        results["inception_score"] = inception_score(acts.logits)
    else:
        log("Inception Score skipped: the network returns pool features only (no logits); "
            "pass --inception with a TorchScript network returning (features, logits) to get it")
    kept = None if reference.pool_features is None else len(reference.pool_features)
    if kept is None:
        log("precision/recall skipped: the reference batch holds neither images (arr_0) nor pool features")
    elif kept <= NEIGHBORHOOD or len(acts.pool) <= NEIGHBORHOOD:
        log(f"precision/recall skipped: they need more than {NEIGHBORHOOD} images on each side (the reference "
            f"keeps {kept}, there are {len(acts.pool)} samples)")
    else:
        results["precision"], results["recall"] = precision_recall(reference.pool_features, acts.pool)
    return results
