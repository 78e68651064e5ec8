"""The regularizer contract: every regularizer module registers itself, and a new one is one module.

A regularizer written as a module of its own, dropped on the package's path, is found, loads
from a config mapping (defaults, types, choices and ranges checked with one-line errors) and
trains through the same step as the built-in ones, with nothing else edited.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import textwrap

import pytest
import torch

import selfalign.regularizers as regularizers
from selfalign.config.experiment import load_config
from selfalign.errors import ConfigError
from selfalign.models import DiffusionTransformer, backbone_config
from selfalign.objectives import build_objective
from selfalign.regularizers import (REGISTRY, Progress, Regularizer, RegularizerConfig, build_regularizer,
                                    register)
from selfalign.training.step import TrainingStep

pytestmark = pytest.mark.usefixtures("single_thread")

TOY_MODULE = '''
"""A regularizer written the way the developer guide says: this module and nothing else."""
from dataclasses import dataclass
from typing import Literal

import torch

from selfalign.regularizers.base import Regularizer, RegularizerConfig, register


@dataclass
class ToyConfig(RegularizerConfig):
    layer: int = 0                  # 0: filled from the model preset by for_model
    weight: float = 0.5
    reduce: Literal["square", "abs"] = "square"

    @classmethod
    def for_model(cls, preset, **overrides):
        return cls(**{"layer": 3 if preset.startswith("SiT-T") else 1, **overrides})

    def validate(self, depth):
        super().validate(depth)
        self.check_block("layer", depth)


@register("toy_for_test", ToyConfig)
class Toy(Regularizer):
    def __init__(self, config, backbone):
        super().__init__(config, backbone)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def student_layers(self):
        return (self.config.layer,)

    def loss(self, ctx):
        tokens = ctx.features[self.config.layer]
        return self.scale * (tokens.square() if self.config.reduce == "square" else tokens.abs()).mean()
'''
TINY = {"model": {"preset": "SiT-T/4"}, "data": {"kind": "fashion_mnist", "resolution": 32}}


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    """Put a module holding a new regularizer on the package's path and import the package's modules."""
    (tmp_path / "toy_for_test.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.setattr(regularizers, "__path__", [*regularizers.__path__, str(tmp_path)])
    assert "toy_for_test" not in REGISTRY
    regularizers.import_all_modules()
    yield sys.modules["selfalign.regularizers.toy_for_test"]
    REGISTRY.pop("toy_for_test", None)
    sys.modules.pop("selfalign.regularizers.toy_for_test", None)


def test_every_regularizer_class_of_the_package_is_registered_or_a_base_of_registered_ones():
    defined = []
    for info in pkgutil.iter_modules(regularizers.__path__, prefix="selfalign.regularizers."):
        module = importlib.import_module(info.name)
        defined += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                    if issubclass(cls, Regularizer) and cls is not Regularizer and cls.__module__ == info.name]
    registered = {entry.regularizer for entry in REGISTRY.values()}
    shared_bases = {cls for cls in defined if any(issubclass(r, cls) and r is not cls for r in registered)}
    assert {"sra", "repa", "dispersive", "sra2", "dts"} <= set(REGISTRY)
    assert defined and set(defined) - shared_bases == registered     # each one usable by its name
    for name, entry in REGISTRY.items():          # each settings class knows the name it is used by
        assert entry.config.name == name and issubclass(entry.config, RegularizerConfig)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_regularizer_loads_with_its_defaults_and_builds(name):
    config = load_config({**TINY, "regularizers": {name: {}}})
    settings = config.regularizers[name]
    assert type(settings) is REGISTRY[name].config
    assert settings == REGISTRY[name].config.for_model("SiT-T/4")
    if name != "repa":                            # REPA's default encoder is a download
        reg = build_regularizer(name, settings, config.backbone_config())
        assert reg.weight(Progress()) == settings.weight
        assert all(1 <= m <= config.backbone_config().depth for m in reg.student_layers())


def test_a_new_module_is_found_loaded_checked_and_trained(toy_module):
    config = load_config({**TINY, "regularizers": {"toy_for_test": {"reduce": "abs"}}})
    settings = config.regularizers["toy_for_test"]
    assert type(settings) is toy_module.ToyConfig
    assert (settings.layer, settings.weight, settings.reduce) == (3, 0.5, "abs")   # for_model's layer
    assert config.to_dict()["regularizers"]["toy_for_test"] == {"weight": 0.5, "layer": 3, "reduce": "abs"}

    torch.manual_seed(0)
    model = DiffusionTransformer(config.backbone_config())
    toy = build_regularizer("toy_for_test", settings, model.config)
    step = TrainingStep(model, build_objective(config.objective), {"toy_for_test": toy})
    x0, y = torch.randn(4, 1, 32, 32), torch.arange(4)
    total, terms = step(x0, y, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(total, terms["gen"] + 0.5 * terms["toy_for_test"])
    total.backward()
    assert toy.scale.grad is not None and toy.scale.grad.item() != 0.0
    # at initialisation the output ignores the input (adaLN-Zero), so the patch embedding learns
    # from the toy's tapped tokens alone
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("settings, message", [
    ({"layer": 7}, "regularizers.toy_for_test.layer=7 must be a block in 1..6"),
    ({"weight": -1}, "regularizers.toy_for_test.weight must be >= 0, got -1.0"),
    ({"reduce": "max"}, "regularizers.toy_for_test.reduce: expected one of 'square', 'abs', got 'max'"),
    ({"layr": 2}, "regularizers.toy_for_test.layr: unknown key (did you mean 'layer'?)"),
    ({"layer": "two"}, "regularizers.toy_for_test.layer: expected an integer, got 'two'"),
])
def test_a_new_modules_settings_get_one_line_errors(toy_module, settings, message):
    with pytest.raises(ConfigError) as err:
        load_config({**TINY, "regularizers": {"toy_for_test": settings}})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_base_defaults_constant_weight_and_plain_for_model():
    class Plain(RegularizerConfig):
        pass

    assert Plain.for_model("SiT-XL/2", weight=0.3) == Plain(weight=0.3)
    reg = Regularizer(Plain(weight=0.3), backbone_config("SiT-T/2"))
    assert reg.weight(Progress(images=10 ** 9, dataset_size=10)) == 0.3 and reg.student_layers() == ()


def test_register_refuses_a_second_class_under_a_name_and_non_regularizers():
    sra = REGISTRY["sra"]

    class Impostor(Regularizer):
        pass

    with pytest.raises(TypeError, match="two regularizers are named 'sra'"):
        register("sra", sra.config)(Impostor)
    with pytest.raises(TypeError, match="needs a Regularizer and a RegularizerConfig subclass"):
        register("not_a_regularizer", sra.config)(torch.nn.Linear)
    assert REGISTRY["sra"] is sra and "not_a_regularizer" not in REGISTRY


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^regularizers.nope: unknown regularizer; choose from \["):
        load_config({**TINY, "regularizers": {"nope": {}}})
    with pytest.raises(ConfigError, match=r"^regularizers.nope: unknown regularizer"):
        build_regularizer("nope", None, backbone_config("SiT-T/2"))
