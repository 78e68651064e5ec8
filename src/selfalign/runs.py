"""Run directories as trained models: the newest complete checkpoint of a run, built into the
model, objective and experiment config it was trained with."""
from __future__ import annotations

import os

import torch

from .config.experiment import experiment_from_dict
from .formats.checkpoint import load_module, load_tensors, read_state, resolve_checkpoint
from .models.backbone import DiffusionTransformer
from .objectives import build_objective


def load_for_inference(path: str | os.PathLike, use_ema: bool = True, device="cpu"):
    """``(model, objective, ExperimentConfig)`` from a run or checkpoint directory, model in eval mode."""
    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    config = experiment_from_dict(state["config"])
    with torch.device("meta"):
        model = DiffusionTransformer(config.backbone_config())
    model = model.to_empty(device=device)
    tensors = load_tensors(ckpt, "ema" if use_ema else "model", device)
    load_module(model, tensors, "EMA weights" if use_ema else "model weights", ckpt)
    return model.eval().requires_grad_(False), build_objective(config.objective), config
