"""The contract of an alignment regularizer, its registry, and the per-step context it reads.

A regularizer is two classes in one module of this package:

* a settings dataclass deriving from :class:`RegularizerConfig` (the mapping under its name in a
  config's ``regularizers:``), which checks its ranges in ``validate(depth)`` and may fill
  model-dependent defaults in ``for_model(preset)``;
* an ``nn.Module`` deriving from :class:`Regularizer`, built as ``Regularizer(config, backbone)``
  from the backbone's :class:`~selfalign.models.BackboneConfig` (its trainable heads are ordinary
  submodules, optimised and checkpointed with the model), and registered under its name with
  ``@register(name, ConfigClass)``.

Per step the trainer

1. builds a :class:`StepContext` (clean data, noise, time, noisy input, dropped labels),
2. calls :meth:`Regularizer.prepare` on each regularizer (which may change the student's
   input, e.g. dual-timestep scheduling),
3. runs **one** student forward tapping the union of :meth:`Regularizer.student_layers`,
4. adds ``weight(progress) * loss(ctx)`` of each regularizer to the generative loss.

Neither the backbone nor the trainer knows any concrete regularizer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, ContextManager, NamedTuple

import torch
from torch import nn

from ..choices import check_choices
from ..errors import ConfigError
from ..models.backbone import BackboneConfig
from ..objectives.base import Objective


@dataclass
class Progress:
    """Where training is: images seen so far and the epoch length that maps images to epochs."""

    images: int = 0
    dataset_size: int = 0

    @property
    def kimg(self) -> float:
        return self.images / 1000.0

    @property
    def epoch(self) -> int:
        """Completed epochs (the released code's epoch counter), 0 when the size is unknown."""
        return self.images // self.dataset_size if self.dataset_size else 0


@dataclass
class StepContext:
    """Everything a regularizer may read about the current training step."""

    model: nn.Module                    # the bare student backbone (never a DDP wrapper)
    objective: Objective
    x0: torch.Tensor                    # clean model input (latent sample or pixels)
    noise: torch.Tensor
    t: torch.Tensor                     # objective time, (B,) or per token (B, N)
    x_t: torch.Tensor
    y: torch.Tensor                     # labels after CFG dropout, shared by every forward
    teacher: nn.Module | None = None    # the EMA backbone
    images: torch.Tensor | None = None  # raw pixels in [-1, 1] for encoder-based regularizers
    progress: Progress = field(default_factory=Progress)
    generator: torch.Generator | None = None
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    attn_groups: torch.Tensor | None = None         # set by prepare() for attention separation
    features: dict[int, torch.Tensor] = field(default_factory=dict)   # student taps
    model_output: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # the labels before the CFG dropout (None: not given)


@dataclass
class RegularizerConfig:
    """Base of every regularizer's settings; closed choices are ``Literal`` fields."""

    #: the regularizer's name in configs, set by :func:`register`; messages name keys with it
    name: ClassVar[str] = "regularizer"

    weight: float = 1.0     # lambda, the loss's weight (a subclass states its own default)

    @classmethod
    def for_model(cls, preset: str, **overrides):
        """The settings for a model preset ("SiT-XL/2") before a config's own values: a subclass
        with model-dependent defaults (e.g. the paper's layers) fills them here."""
        return cls(**overrides)

    def validate(self, depth: int) -> None:
        """One-line :class:`ConfigError` for a bad value; ``depth`` is the backbone's block count.

        A subclass calls ``super().validate(depth)`` and adds its ranges with the helpers below."""
        check_choices(self, self.name)
        self.check_at_least("weight", 0.0)

    # -- helpers for validate(): each names the key as ``<name>.<key>`` -----------------------
    def check_at_least(self, key: str, low: float, *, strict: bool = False) -> None:
        value = getattr(self, key)
        if value < low or (strict and value == low):
            raise ConfigError(f"{self.name}.{key} must be {'>' if strict else '>='} {low:g}, got {value}")

    def check_between(self, key: str, low: float, high: float, *, open_low: bool = False) -> None:
        value = getattr(self, key)
        if not (low < value if open_low else low <= value) or value > high:
            interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
            raise ConfigError(f"{self.name}.{key} must be in {interval}, got {value}")

    def check_block(self, key: str, depth: int) -> None:
        """A 1-based block index of a ``depth``-block backbone (None: left to the regularizer)."""
        value = getattr(self, key)
        if value is not None and not 1 <= value <= depth:
            raise ConfigError(f"{self.name}.{key}={value} must be a block in 1..{depth}")


class Regularizer(nn.Module):
    """Base class: override :meth:`loss` and, as needed, the other hooks."""

    def __init__(self, config: RegularizerConfig, backbone: BackboneConfig):
        super().__init__()
        config.validate(backbone.depth)
        self.config = config

    def student_layers(self) -> tuple[int, ...]:
        """Blocks (1-based) whose outputs the student forward must return."""
        return ()

    def needs_teacher(self) -> bool:
        return False

    def needs_images(self) -> bool:
        return False

    def adapt_teacher(self, teacher: nn.Module) -> nn.Module:
        """The module the teacher forwards run on, built once from the EMA backbone (default: itself).

        It must share the EMA's tensors, not copy them (e.g. SRA's fp8 view). There is one teacher
        per run: with several teacher-using regularizers each adapts the previous one's result."""
        return teacher

    def prepare(self, ctx: StepContext) -> None:
        """Optionally change the student's input (``ctx.x_t``, ``ctx.t``, ``ctx.attn_groups``)."""

    def weight(self, progress: Progress) -> float:
        """The loss's weight at this point of training (default: the constant ``config.weight``)."""
        return self.config.weight

    def loss(self, ctx: StepContext) -> torch.Tensor:
        """The unweighted scalar loss for this step."""
        raise NotImplementedError

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return self.loss(ctx)


class Registration(NamedTuple):
    config: type[RegularizerConfig]
    regularizer: type[Regularizer]


#: name -> (settings class, regularizer class); filled by :func:`register` as the package's
#: modules are imported (``selfalign.regularizers`` imports all of them)
REGISTRY: dict[str, Registration] = {}


def register(name: str, config_class: type[RegularizerConfig]):
    """Class decorator: make a :class:`Regularizer` available as ``regularizers: {name: ...}``."""
    def decorate(regularizer_class: type[Regularizer]) -> type[Regularizer]:
        if not (issubclass(regularizer_class, Regularizer) and issubclass(config_class, RegularizerConfig)):
            raise TypeError(f"register({name!r}): needs a Regularizer and a RegularizerConfig subclass")
        known = REGISTRY.get(name)
        if known and _qualified(known.regularizer) != _qualified(regularizer_class):
            raise TypeError(f"two regularizers are named {name!r}: {_qualified(known.regularizer)} "
                            f"and {_qualified(regularizer_class)}")
        config_class.name = name
        REGISTRY[name] = Registration(config_class, regularizer_class)
        return regularizer_class
    return decorate


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def build_regularizer(name: str, config: RegularizerConfig, backbone: BackboneConfig) -> Regularizer:
    """The registered regularizer ``name`` for a backbone of shape ``backbone``."""
    if name not in REGISTRY:
        raise ConfigError(f"regularizers.{name}: unknown regularizer; choose from {sorted(REGISTRY)}")
    return REGISTRY[name].regularizer(config, backbone)
