"""Strict typed configuration: unknown keys, wrong types, overrides, nesting, Optional fields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from selfalign.choices import check_choices
from selfalign.config.loader import (ConfigError, apply_overrides, from_dict, load_yaml,
                                     parse_override, to_dict)


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup: Optional[int] = None

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"train.optim.lr must be > 0, got {self.lr}")


@dataclass
class Train:
    steps: int = 10
    name: str = "run"
    compile: bool = False
    optim: Optim = field(default_factory=Optim)
    layers: list[int] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    sampler: Optional[Optim] = None
    mode: Literal["fast", "exact"] = "fast"
    pair: tuple[int, str] = (1, "a")


@dataclass
class Root:
    train: Train = field(default_factory=Train)
    seed: int | None = 0


@dataclass
class Needs:
    path: str


def test_defaults_and_full_round_trip():
    assert from_dict(Root, {}) == Root()
    data = {"train": {"steps": 5, "name": "x", "compile": True, "optim": {"lr": 3, "betas": [0.5, 0.6]},
                      "layers": [1, 2], "extra": {"a": 1}, "sampler": {"warmup": 4}, "mode": "exact",
                      "pair": [2, "b"]},
            "seed": None}
    config = from_dict(Root, data)
    assert config.train.optim.lr == 3.0 and isinstance(config.train.optim.lr, float)
    assert config.train.optim.betas == (0.5, 0.6) and config.train.extra == {"a": 1.0}
    assert config.train.sampler == Optim(warmup=4) and config.seed is None
    assert config.train.pair == (2, "b")
    assert from_dict(Root, to_dict(config)) == config


@pytest.mark.parametrize("data,message", [
    ({"trian": {}}, r"^trian: unknown key \(did you mean 'train'\?\)"),
    ({"train": {"optim": {"learning_rate": 1}}}, r"^train\.optim\.learning_rate: unknown key"),
    ({"train": {"sampler": {"bogus": 1}}}, r"^train\.sampler\.bogus: unknown key"),
])
def test_unknown_key_names_the_dotted_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Root, data)


@pytest.mark.parametrize("data,message", [
    ({"train": {"steps": "ten"}}, r"^train\.steps: expected an integer, got 'ten'"),
    ({"train": {"steps": 1.5}}, r"^train\.steps: expected an integer"),
    ({"train": {"steps": True}}, r"^train\.steps: expected an integer"),
    ({"train": {"compile": "yes please"}}, r"^train\.compile: expected true or false"),
    ({"train": {"compile": 1}}, r"^train\.compile: expected true or false"),
    ({"train": {"optim": {"lr": "abc"}}}, r"^train\.optim\.lr: expected a number, got 'abc'"),
    ({"train": {"optim": {"lr": False}}}, r"^train\.optim\.lr: expected a number"),
    ({"train": {"name": 3}}, r"^train\.name: expected a string"),
    ({"train": {"optim": 3}}, r"^train\.optim: expected a mapping"),
    ({"train": {"layers": 3}}, r"^train\.layers: expected a list"),
    ({"train": {"layers": [1, "x"]}}, r"^train\.layers\[1\]: expected an integer"),
    ({"train": {"extra": {"a": "b"}}}, r"^train\.extra\.a: expected a number"),
    ({"train": {"sampler": {"warmup": "x"}}}, r"^train\.sampler\.warmup: expected an integer"),
    ({"train": {"mode": "slow"}}, r"^train\.mode: expected one of 'fast', 'exact', got 'slow'"),
    ({"train": {"pair": [1]}}, r"^train\.pair: expected a list of 2 items"),
    ({"train": {"pair": ["a", 1]}}, r"^train\.pair\[0\]: expected an integer"),
    ({"seed": "x"}, r"^seed: expected an integer"),
    ({"train": []}, r"^train: expected a mapping"),
])
def test_wrong_types_name_the_dotted_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Root, data)


def test_validate_runs_on_nested_dataclasses_as_config_error():
    with pytest.raises(ConfigError, match=r"train\.optim\.lr must be > 0"):
        from_dict(Root, {"train": {"optim": {"lr": -1}}})


def test_validate_can_be_left_to_the_caller():
    assert from_dict(Optim, {"lr": -1}, validate=False).lr == -1.0
    with pytest.raises(ConfigError, match=r"^optim\.lr: expected a number"):   # types still checked
        from_dict(Optim, {"lr": "x"}, "optim", validate=False)


@dataclass
class Choices:
    mode: Literal["fast", "exact"] = "fast"
    level: Literal[1, 2] | None = None
    free: str = "anything"


def test_check_choices_holds_a_dataclass_built_in_python_to_its_literals():
    check_choices(Choices(mode="exact", level=2, free="x"), "c")
    check_choices(Choices(level=None), "c")
    with pytest.raises(ConfigError, match=r"^c\.mode: expected one of 'fast', 'exact', got 'slow'$"):
        check_choices(Choices(mode="slow"), "c")
    with pytest.raises(ConfigError, match=r"^c\.level: expected one of 1, 2, got True$"):
        check_choices(Choices(level=True), "c")          # True == 1, but it is not a choice
    with pytest.raises(ConfigError, match=r"^c\.level: expected one of 1, 2, got 3$"):
        from_dict(Choices, {"level": 3}, "c")            # the loader says the same


def test_required_field_missing_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^section\.path: required key missing"):
        from_dict(Needs, {}, "section")
    assert from_dict(Needs, {"path": "p"}).path == "p"


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict(Root, [1, 2])


@pytest.mark.parametrize("text,expected", [
    ("train.optim.lr=1e-4", 1e-4), ("a=3", 3), ("a=2.5", 2.5), ("a=1E+3", 1000.0),
    ("a=-2e-3", -0.002), ("a=true", True), ("a=null", None), ("a=[3, 8]", [3, 8]),
    ("a=fast", "fast"), ("a=", ""), ("a=x=y", "x=y"),
])
def test_override_values_are_parsed(text, expected):
    key, value = parse_override(text)
    assert value == expected and type(value) is type(expected)
    assert key == text.split("=", 1)[0].split(".")


@pytest.mark.parametrize("bad", ["no_equals", "=3", "a..b=3", ".a=1"])
def test_bad_overrides_are_rejected(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_override(bad)


def test_overrides_apply_to_nested_sections_before_typing():
    data = {"train": {"steps": 3, "optim": None}}
    apply_overrides(data, ["train.optim.lr=1e-3", "train.steps=7", "seed=5", "train.sampler.warmup=2"])
    config = from_dict(Root, data)
    assert (config.train.optim.lr, config.train.steps, config.seed) == (1e-3, 7, 5)
    assert config.train.sampler.warmup == 2
    with pytest.raises(ConfigError, match="steps is not a section"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])
    with pytest.raises(ConfigError, match=r"^train\.steps: expected an integer, got 'many'"):
        from_dict(Root, apply_overrides({}, ["train.steps=many"]))


def test_load_yaml_reads_scientific_numbers_and_reports_problems(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  optim:\n    lr: 1e-4   # YAML 1.1 would read a string\n  steps: 4\n")
    config = from_dict(Root, load_yaml(path))
    assert config.train.optim.lr == 1e-4 and config.train.steps == 4
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_yaml(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    path.write_text("")
    assert load_yaml(path) == {}
