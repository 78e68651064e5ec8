"""In-domain metrics of a model during training (the trainer's ``eval_every_kimg``, the demo).

    evaluate(model, objective, config, num_samples, generator, device) -> {"fd": .., "accuracy": ..,
        "precision": .., "recall": .., "eval_seconds": ..}

Class-balanced labels, a fast deterministic sampler (Euler ODE, 25 steps, no guidance; DDIM 25
steps for DDPM objectives), then the classifier metrics of :mod:`.indomain` against the
Fashion-MNIST test split. Only Fashion-MNIST runs have an in-domain judge: other datasets get an
empty dict (use ``selfalign sample`` + ``selfalign eval fid`` for them).
"""
from __future__ import annotations

import time

import torch

from ..sampling import SamplerConfig, sample
from .indomain import indomain_metrics

EVAL_STEPS = 25


def default_sampler(objective_kind: str, steps: int = EVAL_STEPS) -> SamplerConfig:
    return SamplerConfig(name="ddim" if objective_kind == "ddpm" else "euler", steps=steps)


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


def evaluate(model, objective, config, num_samples: int, generator: torch.Generator, device,
             sampler=None) -> dict[str, float]:
    """FD, class accuracy, precision and recall of ``num_samples`` samples (Fashion-MNIST runs)."""
    if config.data.kind != "fashion_mnist":
        return {}
    began = time.time()
    was_training = model.training
    model.eval()
    try:
        samples, labels = draw_samples(model, objective, num_samples, generator, device, sampler)
    finally:
        model.train(was_training)
    results = indomain_metrics(samples, labels, device=device)
    results["eval_seconds"] = time.time() - began
    return results
