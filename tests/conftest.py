"""Shared pytest set-up. Several engineers append here: add, don't replace."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

# Tests never reach a model hub (diffusers/huggingface look this up at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def randomize_zero_init(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give adaLN-Zero's zero-initialised layers random values.

    At initialisation every residual branch and the final layer are closed (exactly zero), so
    a forward pass would hide most bugs; numerical checks need a model whose every weight acts.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


@pytest.fixture
def tiny_model():
    """Factory for a tiny SiT/DiT on CPU: ``tiny_model("SiT-T/2", input_size=8, ...)``."""
    from selfalign.models import build_model

    def make(name: str = "SiT-T/2", *, input_size: int = 8, in_channels: int = 2,
             num_classes: int = 10, randomize: bool = True, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = build_model(name, input_size=input_size, in_channels=in_channels,
                            num_classes=num_classes, **overrides)
        return randomize_zero_init(model, seed=seed) if randomize else model

    return make


@contextlib.contextmanager
def one_thread():
    """Torch on one intra-op thread inside the block, the previous setting restored after it.

    Tiny models gain nothing from a second thread, and on a shared, loaded machine OpenMP's
    waiting threads make them many times slower. Module-scoped fixtures (which run before any
    function fixture) use this directly.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread():
    """A test on one intra-op thread (see :func:`one_thread`). Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with one_thread():
        yield


def load_kill_harness():
    """``scripts/kill_harness.py`` as a module: its data maker and run helpers serve the
    reliability tests (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "kill_harness.py"
    spec = importlib.util.spec_from_file_location("kill_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
