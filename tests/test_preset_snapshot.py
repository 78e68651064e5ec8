"""Every preset resolves to exactly the values recorded in ``data/preset_snapshot.json``.

The snapshot holds each preset's complete resolved config (``load_config(name).to_dict()``), so
rewriting how presets are written (shared bases, shorter files) cannot change what a run gets.
Presets added later need no entry; a recorded one may not disappear or change.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfalign.config.experiment import load_config, preset_names

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "preset_snapshot.json").read_text())


def json_safe(tree: dict) -> dict:
    """Tuples become lists, as they would in the JSON file."""
    return json.loads(json.dumps(tree, default=list))


def test_every_recorded_preset_still_exists():
    assert set(SNAPSHOT) <= set(preset_names())


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_preset_resolves_to_its_snapshot(name):
    assert json_safe(load_config(name).to_dict()) == SNAPSHOT[name]
