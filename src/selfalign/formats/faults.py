"""Named fault points for the reliability tests (``scripts/kill_harness.py``, ``docs/RELIABILITY.md``).

``SELFALIGN_FAULT=POINT:N`` makes this process kill itself (SIGKILL: no cleanup, no ``finally``)
the ``N``-th time it passes ``POINT``. Without the variable a point costs one dictionary lookup.
Points: ``step`` (after the backward pass, before the optimizer step), ``ckpt_file`` (after each
file of a checkpoint), ``ckpt_rename`` (checkpoint complete, not yet renamed), ``ckpt_done``
(renamed, before old checkpoints are pruned), ``ckpt_prune`` (an old checkpoint moved aside, not
yet deleted), ``metrics_write`` (half a metrics line written and flushed).
"""
from __future__ import annotations

import os
import signal

ENV_VAR = "SELFALIGN_FAULT"
POINTS = ("step", "ckpt_file", "ckpt_rename", "ckpt_done", "ckpt_prune", "metrics_write")
_passes: dict[str, int] = {}


def point(name: str, before_kill=None) -> None:
    """Kill this process here if ``$SELFALIGN_FAULT`` names this pass; ``before_kill()`` runs first
    (e.g. writes half a line, so the kill leaves a torn record)."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(count or 1):
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
