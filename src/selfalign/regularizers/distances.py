"""Distances between student predictions and targets, by name, averaged to a scalar.

Inputs are token tensors ``(B, N, D)``. A config field naming one is typed :data:`Distance`.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F

Distance = Literal["smooth_l1", "cosine", "channel_cosine", "negative_cosine", "l1", "l2"]

SMOOTH_L1_BETA = 0.05   # the SRA paper's beta


def smooth_l1(pred, target):
    return F.smooth_l1_loss(pred, target, beta=SMOOTH_L1_BETA)


def cosine(pred, target):
    """``1 - cos`` per token (over channels, dim -1), as REPA and the natural reading of SRA."""
    return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


def channel_cosine(pred, target):
    """The released SRA code's form: ``F.cosine_similarity`` with its default dim=1 on (B, N, D),
    i.e. across the token axis for each channel."""
    return (1 - F.cosine_similarity(pred, target, dim=1)).mean()


def negative_cosine(pred, target):
    """REPA's per-token ``-cos``, mean over tokens and batch."""
    return -F.cosine_similarity(pred, target, dim=-1).mean()


def l1(pred, target):
    return (pred - target).abs().mean()


def l2(pred, target):
    return ((pred - target) ** 2).mean()


DISTANCES = {"smooth_l1": smooth_l1, "cosine": cosine, "channel_cosine": channel_cosine,
             "negative_cosine": negative_cosine, "l1": l1, "l2": l2}


def get_distance(name: str):
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}: choose one of {sorted(DISTANCES)}")
    return DISTANCES[name]
