"""Latent caching: encode an image folder (or zip) once with the VAE into checksummed shards.

Shard ``i`` holds the images ``[i * shard_size, (i + 1) * shard_size)`` of the sorted listing
(minus unreadable ones), encoded in fixed batches inside the shard, so a shard's bytes depend only
on its index: any number of processes (``torchrun`` ranks, or ``--rank/--world-size`` by hand)
split the shards round-robin and produce the same files as one process. Each finished shard gets
a record with its sha256; a rerun verifies and skips those, so an interrupted prepare resumes.
Whichever process finds every shard finished writes ``index.json`` (see
:mod:`selfalign.formats.shards` for the layout). The encoder's mean and std are stored; the
trainer draws ``x0 = scale * (mean + std * eps)`` each step (:mod:`selfalign.data.latents`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..conventions import SD_VAE_SCALE
from ..data.sources import ImageReader, SourceListing, list_images
from ..data.transforms import uint8_to_model
from ..data.vae import DEFAULT_VAE, LatentVAE
from ..devices import pick_device
from ..errors import DataError, UsageError
from ..formats import shards as fmt

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrepareConfig:
    source: str
    out: str
    image_size: int = 256
    vae: str = DEFAULT_VAE
    scale: float = SD_VAE_SCALE
    flip: bool = False             # also store the horizontally flipped image's latent
    shard_size: int = 1000
    batch_size: int = 64
    file_format: str = "safetensors"
    dtype: str = "float32"         # storage dtype of mean/std
    precision: str = "fp32"        # VAE compute precision
    workers: int = 4               # image-decoding DataLoader workers per process
    device: str = ""               # default: cuda:$LOCAL_RANK when available, else cpu
    rank: int = 0
    world_size: int = 1
    max_shards: int = 0            # stop after this many new shards (time-limited jobs); 0 = all
    progress: bool = True

    def validate(self) -> None:
        if self.image_size < 8 or self.image_size % 8 or self.image_size > 4096:
            raise UsageError(f"image size {self.image_size} is invalid: use a multiple of 8 "
                             f"(the SD-VAE downsamples by 8), e.g. 256 or 512")
        if self.file_format not in fmt.FORMATS:
            raise UsageError(f"format {self.file_format!r} is not one of {fmt.FORMATS}")
        if self.dtype not in fmt.DTYPES:
            raise UsageError(f"dtype {self.dtype!r} is not one of {tuple(fmt.DTYPES)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r} is not one of {tuple(PRECISIONS)}")
        for key in ("shard_size", "batch_size", "world_size"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        if self.scale <= 0:
            raise UsageError(f"scale must be > 0, got {self.scale}")

    def identity(self, listing: SourceListing) -> dict:
        """What the shards' contents depend on; a resumed prepare must match it exactly."""
        listed = json.dumps([listing.paths, listing.labels, listing.class_names]).encode()
        return {"source": listing.root, "prefix": listing.prefix, "images": len(listing),
                "listing_sha256": hashlib.sha256(listed).hexdigest(), "image_size": self.image_size,
                "vae": self.vae, "flip": self.flip, "shard_size": self.shard_size,
                "batch_size": self.batch_size, "file_format": self.file_format, "dtype": self.dtype,
                "precision": self.precision}


@dataclass
class PrepareResult:
    encoded_images: int = 0
    skipped_images: int = 0
    shards_written: list[int] = field(default_factory=list)
    shards_reused: list[int] = field(default_factory=list)
    complete: bool = False          # every shard exists and index.json was written
    index: dict | None = None


class _ShardImages(torch.utils.data.Dataset):
    """Positions of the listing -> ``(position, uint8 HWC array or None, error text)``."""

    def __init__(self, listing: SourceListing, image_size: int):
        self.paths = listing.paths
        self.reader = ImageReader.of(listing)
        self.image_size = image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, position):
        try:
            return position, self.reader.read_cropped(self.paths[position], self.image_size), ""
        except Exception as err:  # PIL raises many types for corrupt data; all mean "skip it"
            return position, None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _collate(items):
    return items


def distributed_defaults() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _check_identity(out: Path, identity: dict) -> None:
    path = out / "prepare.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = None
        if previous != identity:
            diff = next((k for k in identity if (previous or {}).get(k) != identity[k]), "prepare.json")
            raise UsageError(f"{str(out)!r} holds a prepare with different settings ({diff}: "
                             f"{(previous or {}).get(diff)!r} vs {identity.get(diff)!r}); use another "
                             f"output folder or delete that one")
    else:
        fmt.atomic_write_json(path, identity)


def _finished(out: Path, shard: int, file_format: str) -> bool:
    """A shard is finished when its record exists and the file's sha256 matches it."""
    record, data = out / fmt.record_file(shard), out / fmt.shard_file(shard, file_format)
    if not (record.is_file() and data.is_file()):
        return False
    try:
        info = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("bytes") == data.stat().st_size and info.get("sha256") == fmt.sha256_file(data)


def _encode_batch(vae: LatentVAE, arrays: list[np.ndarray], flip: bool,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Encode one batch of uint8 images (and, with ``flip``, their mirror images)."""
    x = uint8_to_model(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
    mean, std = vae.encode(x)
    out = {"mean": mean.to(dtype).cpu(), "std": std.to(dtype).cpu()}
    if flip:
        mean, std = vae.encode(torch.flip(x, dims=[3]))
        out.update(mean_flip=mean.to(dtype).cpu(), std_flip=std.to(dtype).cpu())
    return out


def _channel_sums(mean: torch.Tensor, std: torch.Tensor) -> dict:
    """Per-channel sums that give the mean and std of ``z = mean + std * eps`` over the dataset."""
    m, s = mean.double(), std.double()
    dims = (0, 2, 3)
    return {"mean": m.sum(dims).tolist(), "mean_sq": (m * m).sum(dims).tolist(),
            "var": (s * s).sum(dims).tolist(), "elements": int(m.numel() // m.shape[1])}


def _write_shard(out: Path, shard: int, config: PrepareConfig, positions: list[int],
                 labels: list[int], paths: list[str], arrays: dict[str, torch.Tensor],
                 skipped: list[tuple[str, str]]) -> None:
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    if not positions:   # every image of the shard was unreadable: an empty, still valid shard
        keys = fmt.ARRAY_KEYS[:4 if config.flip else 2]
        arrays = {k: torch.zeros(0, dtype=fmt.DTYPES[config.dtype]) for k in keys}
    data = fmt.encode_shard(arrays, label_tensor, config.file_format)
    path = out / fmt.shard_file(shard, config.file_format)
    fmt.atomic_write_bytes(path, data)
    record = {"shard": shard, "file": fmt.shard_file(shard, config.file_format),
              "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "count": len(positions),
              "labels": labels, "sources": paths, "skipped": [list(s) for s in skipped],
              "latent_shape": list(arrays["mean"].shape[1:]) if positions else None,
              "channel_sums": _channel_sums(arrays["mean"], arrays["std"]) if positions else None}
    fmt.atomic_write_json(out / fmt.record_file(shard), record)


def _write_index(out: Path, config: PrepareConfig, listing: SourceListing, num_shards: int) -> dict | None:
    """Assemble ``index.json`` from the shard records once all of them exist."""
    records = []
    for shard in range(num_shards):
        path = out / fmt.record_file(shard)
        if not path.is_file():
            return None
        records.append(json.loads(path.read_text()))
    shapes = {tuple(r["latent_shape"]) for r in records if r["latent_shape"]}
    if len(shapes) > 1:
        raise DataError(f"shards of {str(out)!r} have different latent shapes {sorted(shapes)}")
    sums = [r["channel_sums"] for r in records if r["channel_sums"]]
    channel_stats = None
    if sums:
        n = sum(s["elements"] for s in sums)
        mean = np.sum([s["mean"] for s in sums], axis=0) / n
        # Var[z] = E[mean^2] + E[std^2] - E[mean]^2, exact for z = mean + std * eps.
        var = (np.sum([s["mean_sq"] for s in sums], axis=0) + np.sum([s["var"] for s in sums], axis=0)) / n
        channel_stats = {"mean": mean.tolist(), "std": np.sqrt(np.maximum(var - mean ** 2, 1e-12)).tolist()}
    skipped = [s for r in records for s in r["skipped"]]
    report = "".join(f"{path}\t{error}\n" for path, error in skipped)
    fmt.atomic_write_bytes(out / fmt.SKIPPED_NAME, report.encode())
    class_counts = np.bincount([l for r in records for l in r["labels"]],
                               minlength=len(listing.class_names)).tolist()
    index = {
        "kind": fmt.INDEX_KIND, "version": fmt.INDEX_VERSION,
        "source": {"root": listing.root, "prefix": listing.prefix},
        "image_size": config.image_size, "vae": config.vae, "scale": config.scale,
        "latent_shape": list(shapes.pop()) if shapes else None, "dtype": config.dtype,
        "file_format": config.file_format, "flipped": config.flip,
        "class_names": list(listing.class_names), "num_classes": len(listing.class_names),
        "count": sum(r["count"] for r in records), "class_counts": class_counts,
        "skipped": len(skipped), "skipped_report": fmt.SKIPPED_NAME, "channel_stats": channel_stats,
        "settings": {k: v for k, v in asdict(config).items()
                     if k not in ("out", "rank", "world_size", "device", "max_shards", "progress", "workers")},
        "shards": [{k: r[k] for k in ("file", "sha256", "bytes", "count", "labels", "sources")}
                   for r in records],
    }
    fmt.atomic_write_json(out / fmt.INDEX_NAME, index)
    return index


def prepare(config: PrepareConfig, vae: LatentVAE | None = None) -> PrepareResult:
    """Encode this process's share of the shards; write the index if every shard is done."""
    config.validate()
    listing = list_images(config.source)
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} exists and is not a folder")
    (out / fmt.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    _check_identity(out, config.identity(listing))
    if config.world_size == 1:   # other ranks may be writing theirs right now
        for leftover in (out / fmt.SHARD_DIR).glob("*.tmp-*"):   # from an interrupted run
            leftover.unlink(missing_ok=True)

    num_shards = (len(listing) + config.shard_size - 1) // config.shard_size
    mine = [s for s in range(num_shards) if s % config.world_size == config.rank]
    result = PrepareResult()
    pending = []
    for shard in mine:
        (result.shards_reused if _finished(out, shard, config.file_format) else pending).append(shard)
    if config.max_shards:
        pending = pending[:config.max_shards]

    if pending:
        if vae is None:
            device = pick_device(config.device or "auto", distributed_defaults()[2])
            vae = LatentVAE.load(config.vae, device=device, dtype=PRECISIONS[config.precision],
                                 batch_size=config.batch_size)
        if config.image_size % vae.downsample_factor:
            raise UsageError(f"image size {config.image_size} is not divisible by the VAE's "
                             f"downsampling factor {vae.downsample_factor}")
        _encode_pending(out, config, listing, vae, pending, result)

    index = _write_index(out, config, listing, num_shards)
    result.complete, result.index = index is not None, index
    return result


def _encode_pending(out: Path, config: PrepareConfig, listing: SourceListing, vae: LatentVAE,
                    pending: list[int], result: PrepareResult) -> None:
    size = config.shard_size
    ranges = {s: range(s * size, min((s + 1) * size, len(listing))) for s in pending}
    # Batches never cross a shard boundary, and the DataLoader yields them in order.
    batches = [list(r[i:i + config.batch_size]) for s in pending
               for r in [ranges[s]] for i in range(0, len(r), config.batch_size)]
    loader = torch.utils.data.DataLoader(
        _ShardImages(listing, config.image_size), batch_sampler=batches, collate_fn=_collate,
        num_workers=config.workers, pin_memory=False)
    total = sum(len(r) for r in ranges.values())
    bar = tqdm(total=total, unit="img", desc=f"prepare rank {config.rank}" if config.world_size > 1 else "prepare",
               disable=not config.progress or config.rank != 0, dynamic_ncols=True, smoothing=0.05)
    dtype = fmt.DTYPES[config.dtype]
    shard_iter = iter(pending)
    shard = next(shard_iter)
    positions: list[int] = []
    parts: list[dict[str, torch.Tensor]] = []
    skipped: list[tuple[str, str]] = []
    try:
        for batch in loader:
            good = [(p, a) for p, a, _ in batch if a is not None]
            skipped += [(listing.paths[p], err) for p, a, err in batch if a is None]
            for p, a, err in batch:
                if a is None:
                    bar.write(f"skipped unreadable image {listing.paths[p]}: {err}")
            if good:
                parts.append(_encode_batch(vae, [a for _, a in good], config.flip, dtype))
                positions += [p for p, _ in good]
            bar.update(len(batch))
            if batch[-1][0] != ranges[shard][-1]:
                continue
            arrays = {k: torch.cat([part[k] for part in parts]) for k in parts[0]} if parts else {}
            _write_shard(out, shard, config, positions, [listing.labels[p] for p in positions],
                         [listing.paths[p] for p in positions], arrays, skipped)
            result.shards_written.append(shard)
            result.encoded_images += len(positions)
            result.skipped_images += len(skipped)
            positions, parts, skipped = [], [], []
            shard = next(shard_iter, None)
    finally:
        bar.close()
