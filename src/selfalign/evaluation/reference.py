"""Reference statistics of a training image folder: computed once, cached beside the data.

    reference = cached_reference(root, resolution, network)      # a ReferenceBatch

The images are the folder's (or zip's) listing (:func:`selfalign.data.sources.list_images`:
class folders, sorted), ADM center-cropped to the training resolution exactly as the training
data is. The cache file is an ADM-layout reference batch (``mu``, ``sigma``, ``mu_s``,
``sigma_s``, ``pool_features``; ``selfalign eval fid --ref FILE`` reads it) named after

* a checksum of the file list (relative paths, labels and sizes: adding, removing, renaming or
  rewriting an image gives a new file),
* the resolution, the image limit and the feature network's checksum,

and written to ``ROOT/.selfalign/`` (a hidden folder, so never a class), or, when the data
folder cannot be written (read-only, a zip), to ``$XDG_CACHE_HOME/selfalign/references/``.
Above :data:`REFERENCE_LIMIT` images a fixed, evenly spaced subset is used.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.sources import SourceListing, list_images, ImageReader
from ..errors import DataError
from .fid import ReferenceBatch, load_reference_batch, save_reference_batch
from .inception import InceptionOutputs, InceptionV3

REFERENCE_LIMIT = 10_000        # images in the statistics (ADM keeps 10K for precision/recall)
CACHE_FOLDER = ".selfalign"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/selfalign`` (default ``~/.cache/selfalign``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfalign"


def _is_zip(listing: SourceListing) -> bool:
    return Path(listing.root).is_file()         # a folder, or a zip archive of one


def listing_checksum(listing: SourceListing) -> str:
    """sha256 of the sorted relative paths, labels and file sizes of a listing."""
    digest = hashlib.sha256()
    root = Path(listing.root)
    if _is_zip(listing):
        digest.update(f"zip {root.stat().st_size}\n".encode())
    for rel, label in zip(listing.paths, listing.labels):
        size = 0 if _is_zip(listing) else (root / listing.prefix / rel).stat().st_size
        digest.update(f"{rel}\t{label}\t{size}\n".encode())
    return digest.hexdigest()


def chosen_indices(count: int, limit: int) -> np.ndarray:
    """All images, or ``limit`` evenly spaced ones (deterministic: it depends only on the counts)."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def _read_batch(reader: ImageReader, listing: SourceListing, indices, resolution: int) -> np.ndarray:
    try:
        return np.stack([reader.read_cropped(listing.paths[i], resolution) for i in indices])
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"an image of {listing.root} cannot be read ({err}); fix or remove it") from None


def folder_features(network: InceptionV3, root: str | os.PathLike, resolution: int,
                    limit: int = REFERENCE_LIMIT, batch_size: int = 50, progress: bool = True,
                    listing: SourceListing | None = None) -> InceptionOutputs:
    """Inception outputs of (up to ``limit``) images of a folder, center-cropped to ``resolution``.

    The next batch is decoded in a background thread while the network runs on this one."""
    listing = listing or list_images(root)
    reader = ImageReader.of(listing)
    indices = chosen_indices(len(listing), limit)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    pools, spatials = [], []
    with ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=len(indices), unit="img", desc=f"inception {Path(listing.root).name}",
                 disable=not progress) as bar:
        pending = pool.submit(_read_batch, reader, listing, batches[0], resolution)
        for k in range(len(batches)):
            images = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(_read_batch, reader, listing, batches[k + 1], resolution)
            out = network(images)
            pools.append(out.pool)
            if out.spatial is not None:
                spatials.append(out.spatial)
            bar.update(len(images))
    return InceptionOutputs(np.concatenate(pools), np.concatenate(spatials) if spatials else None, None)


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def cache_candidates(listing: SourceListing, name: str) -> list[Path]:
    """Where the reference may live: beside the data first, then the user's cache."""
    root = Path(listing.root)
    places = []
    if not _is_zip(listing) and _writable(root):
        places.append(root / CACHE_FOLDER / name)
    tag = hashlib.sha256(f"{listing.root}/{listing.prefix}".encode()).hexdigest()[:12]
    places.append(user_cache_dir() / "references" / f"{root.name}-{tag}-{name}")
    return places


def cached_reference(root: str | os.PathLike, resolution: int, network: InceptionV3,
                     limit: int = REFERENCE_LIMIT, batch_size: int = 50, progress: bool = True,
                     log=print) -> tuple[ReferenceBatch, Path]:
    """``(reference, file)`` of a folder's images at ``resolution``: read from the cache when this
    file list, resolution, limit and network were seen before, else computed and cached."""
    listing = list_images(root)
    name = (f"reference-{resolution}px-{listing_checksum(listing)[:16]}-n{min(limit, len(listing))}"
            f"-{network.digest}.npz")
    candidates = cache_candidates(listing, name)
    for path in candidates:
        if path.is_file():
            try:
                reference = load_reference_batch(path)
            except (DataError, ValueError, OSError):
                continue            # a damaged cache file is computed again
            log(f"reference: statistics of {reference.count} images of {listing.root} at {resolution} px "
                f"from the cache ({path})")
            return reference, path
    count = min(limit, len(listing))
    log(f"reference: Inception statistics of {count} images of {listing.root} at {resolution} px "
        f"(computed once, then cached)")
    acts = folder_features(network, root, resolution, limit, batch_size, progress, listing)
    for path in candidates:
        try:
            save_reference_batch(path, acts.pool, acts.spatial, None, extra={"count": len(acts.pool)})
        except OSError:
            continue                # a read-only data folder: the user's cache is next
        return load_reference_batch(path), path
    raise DataError(f"cannot write the reference statistics to {candidates[0]} nor {candidates[-1]}; "
                    f"make one of them writable or set XDG_CACHE_HOME")
