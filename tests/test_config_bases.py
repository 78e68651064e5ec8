"""Composable configs: ``base:`` names a preset or a file, chains, merges, and fails in one line."""
from __future__ import annotations

import re

import pytest
import yaml

from selfalign.config.experiment import load_config, preset_names, save_config
from selfalign.config.presets import PRESET_DIR, merge, read_config
from selfalign.errors import ConfigError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_merge_mappings_key_by_key_and_replace_everything_else():
    base = {"train": {"lr": 1.0, "betas": [0.9, 0.999]}, "name": "a", "regularizers": {"sra": {"k_max": 0.2}}}
    changes = {"train": {"betas": [0.5]}, "name": "b", "regularizers": {"sra": {"weight": 0.5}}}
    assert merge(base, changes) == {"train": {"lr": 1.0, "betas": [0.5]}, "name": "b",
                                    "regularizers": {"sra": {"k_max": 0.2, "weight": 0.5}}}
    assert base["train"]["betas"] == [0.9, 0.999]                  # inputs untouched
    assert merge({"sampler": {"steps": 5}}, {"sampler": None}) == {"sampler": None}


def test_a_users_file_on_a_preset_states_only_what_differs(tmp_path, monkeypatch):
    run = write(tmp_path / "runs" / "mine.yaml",
                "base: sit-xl2-256-sra\nname: mine\ntrain:\n  seed: 3\nregularizers:\n  sra:\n    weight: 0.5\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(run)
    paper = load_config("sit-xl2-256-sra")
    assert (config.name, config.train.seed, config.regularizers["sra"].weight) == ("mine", 3, 0.5)
    assert config.train.total_kimg == paper.train.total_kimg and config.model == paper.model
    assert config.regularizers["sra"].teacher_layer == paper.regularizers["sra"].teacher_layer
    # the saved config is complete: no base, and it loads back to the same run
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "base" not in saved and saved["train"]["total_kimg"] == paper.train.total_kimg
    assert load_config(tmp_path / "config.yaml").hash() == config.hash()
    # --set overrides apply after the bases
    assert load_config(run, ["train.seed=4", "regularizers.sra.weight=0.1"]).train.seed == 4


def test_file_bases_are_read_next_to_the_file_that_names_them(tmp_path, monkeypatch):
    write(tmp_path / "project" / "shared" / "recipe.yaml", "base: ../common.yaml\ntrain:\n  lr: 0.002\n")
    write(tmp_path / "project" / "common.yaml", "base: fmnist-cpu-tiny-sra\ntrain:\n  lr: 0.001\n  seed: 7\n")
    run = write(tmp_path / "project" / "runs" / "a.yaml", "base: ../shared/recipe.yaml\nname: a\n")
    monkeypatch.chdir(tmp_path)                                    # not where the files are
    config = load_config(run)
    assert (config.name, config.train.lr, config.train.seed) == ("a", 0.002, 7)   # the nearest wins
    assert set(config.regularizers) == {"sra"} and config.train.batch_size == 64  # from the preset
    # a mapping's relative base is read from the working directory
    assert load_config({"base": "project/common.yaml", "name": "m"}).train.lr == 0.001
    assert read_config({"base": "fmnist-cpu-tiny-vanilla"}) == read_config("fmnist-cpu-tiny-vanilla")


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: a.yaml\n"}, r"/a\.yaml: config bases form a cycle \(\S*/a\.yaml -> \S*/a\.yaml\)"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"},
     r"/b\.yaml: config bases form a cycle \(\S*/a\.yaml -> \S*/b\.yaml -> \S*/a\.yaml\); remove one"),
    ({"a.yaml": "base: missing.yaml\n"}, r"a\.yaml: base file 'missing\.yaml' not found \(looked for "),
    ({"a.yaml": "base: sit-xl2-256-sar\n"},
     r"a\.yaml: base 'sit-xl2-256-sar' is not a preset \(a file base is a path ending in \.yaml\); presets: "),
    ({"a.yaml": "base: [sit-xl2-256-sra]\n"}, r"a\.yaml: base must be a preset name or a YAML file, got \["),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "train: [1\n"}, r"b\.yaml' is not valid YAML at line"),
])
def test_bad_bases_are_one_line_errors(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.yaml")
    assert re.search(message, str(err.value)) and "\n" not in str(err.value)


def test_base_is_not_a_setting_of_its_own():
    with pytest.raises(ConfigError, match=r"^base: unknown key"):
        load_config("fmnist-cpu-tiny-vanilla", ["base=fmnist-cpu-tiny-sra"])


# -- the preset files themselves ---------------------------------------------------------------
SHARED = sorted(PRESET_DIR.glob("_base/*.yaml"))
PRESET_FILES = sorted(PRESET_DIR.glob("*.yaml"))
SPEED_CLAIM = re.compile(r"\d\s*x\b|\d+(\.\d+)?x\s|img/s|it/s|steps/s|faster|slower|speed", re.IGNORECASE)


def test_shared_bases_are_not_presets_and_each_is_used():
    assert SHARED and not {p.stem for p in SHARED} & set(preset_names())
    named = set()
    for path in [*PRESET_FILES, *SHARED]:
        base = yaml.safe_load(path.read_text()).get("base")
        if base and base.endswith(".yaml"):
            named.add((path.parent / base).resolve())
    assert set(p.resolve() for p in SHARED) <= named


@pytest.mark.parametrize("path", [*PRESET_FILES, *SHARED], ids=lambda p: p.relative_to(PRESET_DIR).as_posix())
def test_each_file_says_what_it_is_in_one_line_and_claims_no_speed(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and not lines[1].startswith("#")
    assert not SPEED_CLAIM.search(path.read_text())
    data = yaml.safe_load(path.read_text())
    assert ("name" in data) == (path.parent == PRESET_DIR)       # a preset names itself, a base does not
    if "name" in data:
        assert data["name"] == path.stem
