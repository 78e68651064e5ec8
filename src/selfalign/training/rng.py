"""Random-number state of one process, as JSON, so a resumed run draws the same numbers.

All randomness of a training step comes from the per-rank step generator; the global torch,
CUDA, NumPy and Python generators are saved too so that anything else (a user's regularizer,
a sampler) continues as well.
"""
from __future__ import annotations

import base64
import random

import numpy as np
import torch

_MIX = 0x9E3779B97F4A7C15


def step_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of a rank's training steps, seeded from (seed, rank)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * _MIX + 7919 * (rank + 1)) % (2 ** 63))
    return gen


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {
        "step_generator": _b64(generator.get_state()),
        "torch": _b64(torch.get_rng_state()),
        "numpy": {"kind": np_state[0], "keys": base64.b64encode(np_state[1].tobytes()).decode(),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def restore(state: dict, generator: torch.Generator) -> None:
    generator.set_state(_tensor(state["step_generator"]))
    torch.set_rng_state(_tensor(state["torch"]))
    n = state["numpy"]
    keys = np.frombuffer(base64.b64decode(n["keys"]), dtype=np.uint32).copy()
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor(state["cuda"]))
