"""Metrics of a model during training (the trainer's ``eval_every_kimg``, the demo, reports).

    evaluate(model, objective, config, num_samples, generator, device) -> {"fid" or "fd": ..,
        "precision": .., "recall": .., ["accuracy": ..,] "eval_samples": .., "eval_seconds": ..}

Class-balanced labels, a fast deterministic sampler (Euler ODE, 25 steps, no guidance; DDIM 25
steps for DDPM objectives), then one of (``train.eval_metrics``):

* ``classifier`` (``auto`` on Fashion-MNIST): FD, accuracy, precision and recall in the
  committed Fashion-MNIST classifier's features against the test split (:mod:`.indomain`);
* ``inception`` (``auto`` on every other dataset): FID, precision and recall in TF-FID
  Inception features against the training images' reference statistics, computed once and
  cached beside the data (:mod:`.reference`); latent samples are decoded with the dataset's VAE;
* ``none``: no evaluation; training says so once, in one line.

The result is never empty: a metric that cannot be computed raises, and the trainer turns that
into a one-line warning.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..data.transforms import model_to_uint8
from ..errors import ConfigError
from ..formats.shards import load_index
from ..sampling import SamplerConfig, sample
from .fid import FeatureStatistics, frechet_distance
from .images import ArraySource
from .inception import InceptionV3, default_weights_path
from .indomain import indomain_metrics
from .metrics import inception_activations
from .precision_recall import precision_recall
from .reference import cached_reference

EVAL_STEPS = 25
_NETWORKS: dict[tuple[str, str], object] = {}


def default_sampler(objective_kind: str, steps: int = EVAL_STEPS) -> SamplerConfig:
    return SamplerConfig(name="ddim" if objective_kind == "ddpm" else "euler", steps=steps)


def metrics_kind(config) -> str:
    """``classifier``, ``inception`` or ``none`` for a run's config (``auto`` resolved)."""
    kind = config.train.eval_metrics          # one of config.experiment.EVAL_METRICS (validated)
    if kind == "auto":
        return "classifier" if config.data.kind == "fashion_mnist" else "inception"
    if kind == "classifier" and config.data.kind != "fashion_mnist":
        raise ConfigError(f"train.eval_metrics=classifier needs Fashion-MNIST data, not data.kind="
                          f"{config.data.kind!r}; use inception (or auto) or none")
    return kind


def plan_line(config) -> str | None:
    """The one line training prints about its evaluations (None when there are none)."""
    t = config.train
    if t.eval_every_kimg <= 0:
        return None
    kind = metrics_kind(config)
    if kind == "none":
        return (f"evaluation: off (train.eval_metrics=none), although train.eval_every_kimg="
                f"{t.eval_every_kimg:g}; metrics.jsonl gets no eval records")
    what = ("FD, accuracy, precision, recall in the Fashion-MNIST classifier's features against the test split"
            if kind == "classifier" else
            "FID, precision, recall in Inception features against the training images (reference "
            "statistics computed once, cached beside the data)")
    return f"evaluation every {t.eval_every_kimg:g} kimg: {t.eval_samples} samples, {what}"


@torch.no_grad()
def draw_samples(model, objective, num_samples: int, generator: torch.Generator, device,
                 sampler=None, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``(samples in model space (N, C, H, W) on the CPU, labels (N,))`` with class-balanced labels."""
    cfg = model.config
    sampler = sampler or default_sampler(objective.kind)
    gen_device = generator.device
    labels = torch.arange(num_samples, device=gen_device) % cfg.num_classes
    labels = labels[torch.randperm(num_samples, device=gen_device, generator=generator)]
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    out = []
    for start in range(0, num_samples, batch_size):
        y = labels[start:start + batch_size]
        noise = torch.randn((len(y), *shape), device=gen_device, generator=generator)
        out.append(sample(model, objective, noise.to(device), y.to(device), sampler, generator).float().cpu())
    return torch.cat(out), labels.cpu()


def cached_network(device):
    """The Inception network (``$SELFALIGN_INCEPTION`` or the TF-FID default), loaded once per device."""
    key = (str(default_weights_path()), str(device))
    if key not in _NETWORKS:
        _NETWORKS[key] = InceptionV3(key[0], device)
    return _NETWORKS[key]


def reference_source(data) -> tuple[str, int]:
    """``(image folder or zip, resolution)`` whose statistics a run's samples are compared with."""
    if data.kind == "latents":
        index = load_index(data.path)
        return index["source"]["root"], int(index["image_size"])
    return data.path, data.resolution


def inception_metrics(images_uint8: np.ndarray, data, device, seed: int = 0, log=print) -> dict[str, float]:
    """FID, precision and recall of uint8 ``N x H x W x C`` samples against the run's training images."""
    network = cached_network(device)
    root, resolution = reference_source(data)
    reference, _ = cached_reference(root, resolution, network, progress=False, log=log)
    feats = inception_activations(network, ArraySource(images_uint8, "samples"), progress=False).pool
    results = {"fid": frechet_distance(FeatureStatistics.of(feats), reference.pool)}
    ref_feats = reference.pool_features
    subset = np.random.default_rng(seed).permutation(len(ref_feats))[:min(len(feats), len(ref_feats))]
    results["precision"], results["recall"] = precision_recall(ref_feats[subset], feats)
    results["reference_images"] = float(reference.count or len(ref_feats))
    return results


def evaluate(model, objective, config, num_samples: int, generator: torch.Generator, device,
             sampler=None, decode=None, log=print) -> dict[str, float]:
    """The metrics of ``num_samples`` samples that ``train.eval_metrics`` asks for ({} for none).

    ``decode`` turns latent samples into images (the latent dataset's VAE)."""
    kind = metrics_kind(config)
    if kind == "none":
        return {}
    began = time.time()
    was_training = model.training
    model.eval()
    try:
        samples, labels = draw_samples(model, objective, num_samples, generator, device, sampler)
    finally:
        model.train(was_training)
    if kind == "classifier":
        results = indomain_metrics(samples, labels, device=device)
    else:
        if decode is not None:
            samples = torch.cat([decode(samples[i:i + 50].to(device)).float().cpu()
                                 for i in range(0, len(samples), 50)])
        images = model_to_uint8(samples).permute(0, 2, 3, 1).numpy()
        results = inception_metrics(images, config.data, device, log=log)
    results["eval_samples"] = float(num_samples)
    results["eval_seconds"] = time.time() - began
    return results
