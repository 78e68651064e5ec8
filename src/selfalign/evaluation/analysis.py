"""Representation analysis of a trained model: per-block linear probes, CKNNA, PCA maps.

The images come from the run's own dataset (``config.data``): Fashion-MNIST probes train on its
train split and test on its test split; a dataset with one split (an image folder, prepared
latents) is split by a seeded permutation into a held-out test part (the asked test count, at
most a fifth of the images) and a disjoint training part, so a probe never tests on an image it
was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import build_dataset
from ..errors import DataError
from ..objectives.base import Objective
from .features import block_features, dataset_batch, objective_time
from .figures import pyplot, save_figure
from .indomain import cached_classifier, classifier_outputs
from .pca import pca_rgb, save_pca_grid
from .probe import cknna, linear_probe


@dataclass(frozen=True)
class BlockTarget:
    """Block ``block`` of ``model`` at noise level ``t``: a feature set CKNNA compares with."""

    model: nn.Module
    objective: Objective
    block: int
    t: float


HELDOUT_FRACTION = 5          # a single-split dataset holds out at most 1 / 5 of its images


@dataclass(frozen=True)
class Split:
    """Which examples of a run's dataset a probe trains and tests on."""

    train_set: object            # the datasets the indices point into (the same one when single)
    test_set: object
    train: torch.Tensor
    test: torch.Tensor
    single: bool                 # one dataset split in two, rather than its own train/test splits

    def describe(self) -> str:
        what = ("a held-out split of the training data (seeded permutation, disjoint)" if self.single
                else "Fashion-MNIST's own train and test splits")
        return f"{len(self.train)} train / {len(self.test)} test images: {what}"


def _dataset(config, split: str):
    single = config.data.kind != "fashion_mnist"
    return build_dataset(config.data, "train" if single else split), single


def probe_split(config, train_count: int, test_count: int, seed: int = 0) -> Split:
    """Disjoint train and test examples for a probe (see the module docstring)."""
    train_set, single = _dataset(config, "train")
    generator = torch.Generator().manual_seed(seed)
    if single:
        order = torch.randperm(len(train_set), generator=generator)
        held = min(test_count, len(train_set) // HELDOUT_FRACTION)
        if held < 2 or len(train_set) - held < 2:
            raise DataError(f"the dataset has {len(train_set)} images, too few to hold out a test split for a probe")
        return Split(train_set, train_set, order[:len(train_set) - held][:train_count],
                     order[len(train_set) - held:], True)
    test_set, _ = _dataset(config, "test")
    train = torch.randperm(len(train_set), generator=generator)[:train_count]
    test = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(seed))[:test_count]
    return Split(train_set, test_set, train, test, False)


def examples(dataset, indices: torch.Tensor, seed: int = 0):
    """``(x0, labels)`` of ``indices`` of a training dataset (latents drawn with a seeded generator)."""
    x0, labels = [], []
    generator = torch.Generator().manual_seed(seed + 1)
    for start in range(0, len(indices), 1000):
        x, y = dataset_batch(dataset, indices[start:start + 1000].tolist(), generator)
        x0.append(x)
        labels.append(torch.as_tensor(y))
    return torch.cat(x0), torch.cat(labels)


def load_examples(config, count: int, seed: int = 0):
    """``(x0, labels)``: a seeded random subset of ``count`` images to look at (CKNNA, PCA maps):
    Fashion-MNIST's test split, or any images of a single-split dataset."""
    dataset, _ = _dataset(config, "test")
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    if len(chosen) < min(count, 2):
        raise DataError(f"the dataset has {len(dataset)} examples, too few for {count}")
    return examples(dataset, chosen, seed)


def probe_checkpoint(model, objective, config, layers: list[int], t: float, train_count: int = 10000,
                     test_count: int = 2000, epochs: int = 50, seed: int = 0, batch_size: int = 256,
                     log=print) -> tuple[dict[int, float], Split]:
    """Test accuracy of a linear probe on each block's token-averaged features at noise level ``t``,
    and the :class:`Split` it used."""
    split = probe_split(config, train_count, test_count, seed)
    log(f"probe data: {split.describe()}")
    feats, labels = {}, {}
    for name, dataset, indices in (("train", split.train_set, split.train), ("test", split.test_set, split.test)):
        x0, labels[name] = examples(dataset, indices, seed)
        log(f"features of {len(x0)} {name} images at t={t:g} ...")
        feats[name] = block_features(model, objective, x0, layers, t, torch.Generator().manual_seed(seed),
                                     batch_size=batch_size)
    num_classes = model.config.num_classes
    return {layer: linear_probe(feats["train"][layer], labels["train"], feats["test"][layer], labels["test"],
                                num_classes, epochs=epochs, seed=seed) for layer in layers}, split


def save_probe_plot(path: str | Path, results: dict[str, dict[int, float]], t: float) -> Path:
    fig, ax = pyplot().subplots(figsize=(5, 3.2))
    for name, accs in results.items():
        ax.plot(list(accs), [100 * a for a in accs.values()], marker="o", label=name)
    ax.set_xlabel("block")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.set_title(f"linear probing at t = {t:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=120)


def cknna_checkpoint(model, objective, config, layers: list[int], t: float, target: BlockTarget | None,
                     count: int = 2000, topk: int = 10, seed: int = 0,
                     device="cpu") -> tuple[dict[int, float], int]:
    """CKNNA between each block's features at ``t`` and a target feature set of the same images,
    and how many images that was (at most ``count``).

    ``target``: ``None`` for the Fashion-MNIST classifier's pooled features of the clean images
    (an encoder; Fashion-MNIST runs), or a :class:`BlockTarget`: a block of this model (the SRA
    teacher's view) or of another one, with the same noise as the model's side.
    """
    x0, _ = load_examples(config, count, seed)
    if topk >= len(x0) - 1:
        raise DataError(f"the run's data set gives {len(x0)} examples, too few for CKNNA with topk={topk} "
                        f"(each example's {topk} nearest neighbours among the others): lower --topk")
    generator = lambda: torch.Generator().manual_seed(seed)   # same noise for both sides
    feats = block_features(model, objective, x0, layers, t, generator())
    if target is None:
        reference = torch.from_numpy(classifier_outputs(cached_classifier(device), x0)[0])
    else:
        reference = block_features(target.model, target.objective, x0, [target.block], target.t,
                                   generator())[target.block]
    return {layer: cknna(feats[layer], reference, topk) for layer in layers}, len(x0)


def pca_checkpoint(model, objective, config, layers: list[int], times: list[float], count: int, path,
                   seed: int = 0, title: str = "") -> Path:
    """PNG grid of PCA maps (rows: noise level x image; columns: noisy input, then blocks)."""
    x0, _ = load_examples(config, count, seed)
    inputs, maps = {}, {}
    for t in times:
        feats = block_features(model, objective, x0, layers, t, torch.Generator().manual_seed(seed), pooled=False)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        inputs[t] = objective.interpolate(x0, noise, objective_time(objective, t, len(x0), "cpu"))
        for layer in layers:
            maps[(t, layer)] = pca_rgb(feats[layer])
    return save_pca_grid(path, inputs, maps, layers, title)
