"""Sampling to ADM ``.npz`` batches: index-split across processes, resumable shards.

Determinism: sample ``i`` takes its initial noise (and, without class balancing, its label) from
its own generator seeded by ``(seed, i)``, so it does not depend on the number of processes or
on which process draws it. Stochastic samplers (Euler-Maruyama, DDPM, DDIM with eta > 0) also
draw noise at every step, sample ``i``'s from its own CPU generator seeded by ``(seed, i,
"steps")``: images depend on neither the process count, nor ``batch_size``, nor the device's
random number generator (only on floating-point differences between batch sizes and devices).

Layout of ``out_dir``: ``plan.json`` (everything that determines the images), ``shards/
shard-XXXXXX.npz`` (``arr_0`` uint8 images, ``arr_1`` labels, ``index`` sample indices), written
under a temporary name and renamed when complete, and finally ``samples.npz`` (``arr_0`` N x H x
W x 3, ``arr_1`` labels), the file ADM's evaluator and ``selfalign eval fid`` read.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..data.transforms import model_to_uint8
from ..errors import DataError, UsageError
from ..sampling import sample

PLAN_FILE = "plan.json"
SHARD_DIR = "shards"
SAMPLES_FILE = "samples.npz"


def sample_seed(seed: int, index: int, stream: str = "sample") -> int:
    """A 63-bit seed for ``(seed, index)``; ``stream`` separates independent uses."""
    digest = hashlib.sha256(f"selfalign:{stream}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_labels(num_samples: int, num_classes: int, seed: int, balanced: bool,
                  start: int = 0, end: int | None = None) -> np.ndarray:
    """Labels of samples ``start..end``: uniform per sample from ``(seed, i)``, or class-balanced.

    Balanced: ``i % num_classes`` over all ``num_samples``, permuted by ``seed`` (every class gets
    ``N // C`` or ``N // C + 1`` samples).
    """
    end = num_samples if end is None else end
    if balanced:
        order = np.random.default_rng(sample_seed(seed, 0, "balanced")).permutation(num_samples)
        return (order % num_classes)[start:end].astype(np.int64)
    return np.array([torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
        sample_seed(seed, i, "label"))).item() for i in range(start, end)], dtype=np.int64)


def sample_noise(shape: tuple[int, ...], seed: int, indices) -> torch.Tensor:
    """Initial noise ``(len(indices), *shape)``, row ``k`` from the generator of ``indices[k]`` (CPU)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, int(i))))
                        for i in indices])


@dataclass
class SamplePlan:
    """Everything the images depend on; a resumed directory must hold the same plan."""

    checkpoint: str
    num_samples: int
    seed: int = 0
    batch_size: int = 64
    shard_size: int = 1000
    class_balanced: bool = False
    unconditional: bool = False
    sampler: dict | None = None
    # how stochastic samplers draw their per-step noise: samples drawn another way (e.g. one
    # generator per batch) are other images for the same seed, so their plan must not match
    step_noise: str = "per-sample"

    def validate(self) -> None:
        for key in ("num_samples", "batch_size", "shard_size"):
            if getattr(self, key) < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.shard_size % self.batch_size:
            raise UsageError(f"--shard-size {self.shard_size} must be a multiple of --batch-size {self.batch_size}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples)


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / SHARD_DIR / f"shard-{shard:06d}.npz"


def check_plan(out_dir: Path, plan: SamplePlan) -> None:
    """Write ``plan.json``, or refuse a directory that holds samples of a different plan."""
    path = out_dir / PLAN_FILE
    wanted = json.loads(json.dumps(asdict(plan)))
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted:
            diff = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise UsageError(f"{out_dir} holds samples of a different plan (differs in: {', '.join(diff)}); "
                             "use another --out or the same settings to resume")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(wanted, indent=2) + "\n")
    tmp.replace(path)


def shard_is_complete(path: Path, plan: SamplePlan, shard: int, labels: np.ndarray) -> bool:
    """A finished shard loads, has the expected indices and labels, and uint8 images."""
    if not path.is_file():
        return False
    start, end = plan.shard_range(shard)
    try:
        with np.load(path) as data:
            images, stored_labels, index = data["arr_0"], data["arr_1"], data["index"]
    except Exception:
        return False
    return (images.dtype == np.uint8 and images.ndim == 4 and len(images) == end - start
            and np.array_equal(index, np.arange(start, end)) and np.array_equal(stored_labels, labels))


def make_draw(model, objective, sampler_config, device, decode: Callable | None = None,
              unconditional: bool = False) -> Callable[[torch.Tensor, np.ndarray, list[int]], np.ndarray]:
    """``draw(noise, labels, step_seeds)`` -> uint8 NHWC: sample with the core sampler, then decode.

    ``step_seeds`` seed one CPU generator per sample for the sampler's per-step noise.

    ``decode`` maps model-space samples to uint8 ``(B, H, W, 3)`` (a latent model's VAE); pixel
    models go through :func:`to_uint8_images`.
    """
    device = torch.device(device)

    def draw(noise: torch.Tensor, labels: np.ndarray, step_seeds: list[int]) -> np.ndarray:
        generator = [torch.Generator().manual_seed(seed) for seed in step_seeds]
        y = None if unconditional else torch.as_tensor(labels, dtype=torch.long, device=device)
        x = sample(model, objective, noise.to(device), y, sampler_config, generator=generator)
        if decode is not None:
            return np.asarray(decode(x))
        return to_uint8_images(x)

    return draw


def generate_shards(plan: SamplePlan, out_dir: Path, draw: Callable[[torch.Tensor, np.ndarray, list[int]], np.ndarray],
                    image_shape: tuple[int, ...], num_classes: int, rank: int = 0, world_size: int = 1,
                    progress: bool = True) -> dict:
    """Make this process's shards (``shard % world_size == rank``); finished ones are verified and skipped.

    ``draw(noise, labels, step_seeds)`` turns initial noise and labels into uint8 NHWC images
    (:func:`make_draw`); ``step_seeds[k]`` seeds the per-step noise of the batch's sample ``k``.
    Returns counts: ``{"made": .., "skipped": .., "images": ..}``.
    """
    plan.validate()
    mine = [s for s in range(plan.num_shards) if s % world_size == rank]
    todo, skipped = [], 0
    for shard in mine:
        start, end = plan.shard_range(shard)
        labels = sample_labels(plan.num_samples, num_classes, plan.seed, plan.class_balanced, start, end)
        if shard_is_complete(shard_path(out_dir, shard), plan, shard, labels):
            skipped += 1
        else:
            todo.append((shard, labels))
    total = sum(plan.shard_range(s)[1] - plan.shard_range(s)[0] for s, _ in todo)
    bar = tqdm(total=total, unit="img", desc=f"sampling (rank {rank})", disable=not progress or total == 0)
    for shard, labels in todo:
        start, end = plan.shard_range(shard)
        images = []
        for b in range(start, end, plan.batch_size):
            stop = min(b + plan.batch_size, end)
            noise = sample_noise(image_shape, plan.seed, range(b, stop))
            step_seeds = [sample_seed(plan.seed, i, "steps") for i in range(b, stop)]
            images.append(draw(noise, labels[b - start:stop - start], step_seeds))
            bar.update(stop - b)        # tqdm shows the rate in img/s
        path = shard_path(out_dir, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, arr_0=np.concatenate(images), arr_1=labels, index=np.arange(start, end))
        tmp.replace(path)
    bar.close()
    return {"made": len(todo), "skipped": skipped, "images": total}


def missing_shards(plan: SamplePlan, out_dir: Path, num_classes: int) -> list[int]:
    """Shards of the plan that are not (verifiably) finished."""
    return [shard for shard in range(plan.num_shards)
            if not shard_is_complete(shard_path(out_dir, shard), plan, shard, sample_labels(
                plan.num_samples, num_classes, plan.seed, plan.class_balanced, *plan.shard_range(shard)))]


def merge_shards(plan: SamplePlan, out_dir: Path, num_classes: int) -> Path:
    """Concatenate every shard into ``samples.npz`` (``arr_0``, ``arr_1``); all shards must be complete."""
    missing = missing_shards(plan, out_dir, num_classes)
    if missing:
        raise DataError(f"{len(missing)} shard(s) missing or incomplete (first: {shard_path(out_dir, missing[0])}): "
                        "run the same sample command again to finish them")
    images, labels = [], []
    for shard in range(plan.num_shards):
        with np.load(shard_path(out_dir, shard)) as data:
            images.append(data["arr_0"])
            labels.append(data["arr_1"])
    out = out_dir / SAMPLES_FILE
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(tmp, arr_0=np.concatenate(images), arr_1=np.concatenate(labels))
    tmp.replace(out)
    return out


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Model-space pixels in [-1, 1] ``(B, C, H, W)`` -> uint8 ``(B, H, W, 3)`` (gray repeated)."""
    images = model_to_uint8(x.float().cpu()).permute(0, 2, 3, 1).numpy()
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def write_pngs(samples: Path, folder: Path) -> int:
    """Every image of an ADM .npz as ``folder/000000.png`` ..."""
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(samples) as data:
        images = data["arr_0"]
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return len(images)
