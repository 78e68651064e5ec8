"""Representation analysis of a trained model: per-block linear probes, CKNNA, PCA maps.

The images come from the run's own dataset (``config.data``): Fashion-MNIST probes train on its
train split and test on its test split; datasets with one split are split by a seeded permutation.
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


def load_examples(config, count: int, split: str, seed: int = 0, offset: int = 0):
    """``(x0, labels)``: ``count`` examples of the run's dataset (a seeded random subset)."""
    single_split = config.data.kind != "fashion_mnist"
    dataset = build_dataset(config.data, "train" if single_split else split)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    if single_split and split == "test":
        offset = offset + len(dataset) // 2    # test examples from the other half of the permutation
    chosen = order[offset:offset + count]
    if len(chosen) < min(count, 2):
        raise DataError(f"the dataset has {len(dataset)} examples, too few for {count} {split} examples")
    x0, labels = [], []
    generator = torch.Generator().manual_seed(seed + 1)
    for start in range(0, len(chosen), 1000):
        x, y = dataset_batch(dataset, chosen[start:start + 1000].tolist(), generator)
        x0.append(x)
        labels.append(torch.as_tensor(y))
    return torch.cat(x0), torch.cat(labels)


def probe_checkpoint(model, objective, config, layers: list[int], t: float, train_count: int = 10000,
                     test_count: int = 2000, epochs: int = 50, seed: int = 0, batch_size: int = 256,
                     log=print) -> dict[int, float]:
    """Test accuracy of a linear probe on each block's token-averaged features at noise level ``t``."""
    train_x0, train_y = load_examples(config, train_count, "train", seed)
    test_x0, test_y = load_examples(config, test_count, "test", seed)
    feats = {}
    for name, x0 in (("train", train_x0), ("test", test_x0)):
        log(f"features of {len(x0)} {name} images at t={t:g} ...")
        feats[name] = block_features(model, objective, x0, layers, t, torch.Generator().manual_seed(seed),
                                     batch_size=batch_size)
    num_classes = model.config.num_classes
    return {layer: linear_probe(feats["train"][layer], train_y, feats["test"][layer], test_y, num_classes,
                                epochs=epochs, seed=seed) for layer in layers}


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
                     count: int = 2000, topk: int = 10, seed: int = 0, device="cpu") -> dict[int, float]:
    """CKNNA between each block's features at ``t`` and a target feature set of the same images.

    ``target``: ``None`` for the Fashion-MNIST classifier's pooled features of the clean images
    (an encoder; Fashion-MNIST runs), or a :class:`BlockTarget`: a block of this model (the SRA
    teacher's view) or of another one, with the same noise as the model's side.
    """
    x0, _ = load_examples(config, count, "test", seed)
    if topk >= len(x0) - 1:
        raise DataError(f"the run's data set gives {len(x0)} test examples, too few for CKNNA with topk={topk} "
                        f"(each example's {topk} nearest neighbours among the others): lower --topk")
    generator = lambda: torch.Generator().manual_seed(seed)   # same noise for both sides
    feats = block_features(model, objective, x0, layers, t, generator())
    if target is None:
        reference = torch.from_numpy(classifier_outputs(cached_classifier(device), x0)[0])
    else:
        reference = block_features(target.model, target.objective, x0, [target.block], target.t,
                                   generator())[target.block]
    return {layer: cknna(feats[layer], reference, topk) for layer in layers}


def pca_checkpoint(model, objective, config, layers: list[int], times: list[float], count: int, path,
                   seed: int = 0, title: str = "") -> Path:
    """PNG grid of PCA maps (rows: noise level x image; columns: noisy input, then blocks)."""
    x0, _ = load_examples(config, count, "test", seed)
    inputs, maps = {}, {}
    for t in times:
        feats = block_features(model, objective, x0, layers, t, torch.Generator().manual_seed(seed), pooled=False)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        inputs[t] = objective.interpolate(x0, noise, objective_time(objective, t, len(x0), "cpu"))
        for layer in layers:
            maps[(t, layer)] = pca_rgb(feats[layer])
    return save_pca_grid(path, inputs, maps, layers, title)
