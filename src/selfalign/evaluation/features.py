"""Block features of a diffusion transformer at a chosen noise level (probing, CKNNA, PCA).

The clean input ``x0`` (model space: pixels in [-1, 1] or scaled latents) is noised to time ``t``
with the objective's own interpolation and fixed noise from ``generator``, then the backbone runs
with feature taps up to the deepest requested block. Labels default to the null class, so
class-conditional models cannot read the answer of a probe from their label embedding.
"""
from __future__ import annotations

import torch

from ..objectives.base import Objective


def objective_time(objective: Objective, t: float, batch: int, device) -> torch.Tensor:
    """``t`` in [0, 1] (0 = data) in the objective's units: flow time, or DDPM step ``round(t (T-1))``."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"noise level t={t} must be in [0, 1] (0 = data, 1 = noise)")
    if objective.kind == "ddpm":
        step = round(t * (objective.num_timesteps - 1))
        return torch.full((batch,), step, dtype=torch.long, device=device)
    return torch.full((batch,), float(t), device=device)


@torch.no_grad()
def block_features(model, objective: Objective, x0: torch.Tensor, layers, t: float,
                   generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
                   batch_size: int = 256, pooled: bool = True) -> dict[int, torch.Tensor]:
    """``{block: features}`` of ``x0`` noised to ``t``: ``(N, D)`` token means if ``pooled`` else ``(N, T, D)``.

    Blocks are 1-based (:mod:`selfalign.conventions`). Noise is drawn on the CPU from
    ``generator`` so the result does not depend on the device.
    """
    layers = sorted(set(int(layer) for layer in layers))
    device = next(model.parameters()).device
    null = model.config.num_classes
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(x0), batch_size):
        x = x0[start:start + batch_size].to(device, torch.float32)
        noise = torch.randn(x.shape, generator=generator).to(device)
        t_batch = objective_time(objective, t, len(x), device)
        x_t = objective.interpolate(x, noise, t_batch)
        y = (labels[start:start + batch_size].to(device) if labels is not None
             else torch.full((len(x),), null, dtype=torch.long, device=device))
        _, feats = model(x_t, objective.model_time(t_batch), y, taps=layers, features_only=True)
        for layer in layers:
            f = feats[layer].float()
            out[layer].append((f.mean(dim=1) if pooled else f).cpu())
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}


def dataset_batch(dataset, indices, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0 in model space, labels)`` of ``indices`` from any training dataset of :mod:`selfalign.data`.

    Latent datasets store the encoder's ``(mean, std)``: the latent is drawn from them with
    ``generator`` (:meth:`selfalign.data.latents.LatentDataset.to_model`).
    """
    x, labels = dataset.__getitems__(list(indices))[:2]
    if hasattr(dataset, "to_model"):
        x = dataset.to_model(x, generator)
    return x, labels
