"""``ExperimentConfig``: the typed tree a training run is built from.

Loaded strictly (unknown keys and wrong types are one-line errors naming the dotted key) from a
YAML file or a preset name in ``selfalign/configs/`` (either may name a ``base:``, see
:mod:`.presets`), with ``--set key=value`` overrides applied before typing. Regularizers are a mapping ``name -> that regularizer's config`` looked up in
``regularizers.REGISTRY``; SRA's layers default to the paper's for the model preset.
Values left ``null`` that follow from others (model input size and channels from the data) are
filled in by :func:`load_config`, so a saved ``config.yaml`` is complete.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from ..conventions import (MAX_BATCH, MAX_CHANNELS, MAX_CLASSES, MAX_GRID, MAX_RESOLUTION, MAX_SAMPLES, MAX_SEED,
                           MAX_WORKERS)
from ..data import describe_data as describe_data_facts
from ..errors import ConfigError
from ..models import backbone_config, parse_preset
from ..objectives import ObjectiveConfig, space_timesteps
from ..regularizers import REGISTRY, RegularizerConfig
from ..sampling.config import SamplerConfig
from .loader import apply_overrides, from_dict, to_dict
from .presets import PRESET_DIR, preset_names, read_config, resolve_config_path

__all__ = ["ExperimentConfig", "ModelConfig", "DataConfig", "TrainConfig", "LoggingConfig", "load_config",
           "experiment_from_dict", "save_config", "resume_mismatch", "preset_names", "resolve_config_path",
           "PRESET_DIR", "VAE_DOWNSAMPLE", "LATENT_CHANNELS", "RESUMABLE_CHANGES", "REQUIRED_KEYS"]
VAE_DOWNSAMPLE = 8          # SD-VAE: 256 px -> 32x32 latents
LATENT_CHANNELS = 4
DataKind = Literal["fashion_mnist", "imagefolder", "latents"]
DATA_DEFAULTS = {           # kind: (in_channels, num_classes) unless the config says otherwise
    "fashion_mnist": (1, 10), "imagefolder": (3, 1000), "latents": (LATENT_CHANNELS, 1000),
}
# Keys a resumed run may change without becoming a different run.
RESUMABLE_CHANGES = (
    "name", "logging.", "data.path", "data.num_workers", "train.total_kimg", "train.log_every_kimg",
    "train.ckpt_every_kimg", "train.keep_last", "train.sample_every_kimg", "train.sample_count",
    "train.eval_every_kimg", "train.eval_samples", "train.eval_metrics", "train.nonfinite",
    "train.max_consecutive_bad", "train.device", "train.compile", "sampler.",
)
# What a user's config must state itself or through its base:, so that an empty or partial file is
# refused instead of training the defaults (SiT-XL/2 on Fashion-MNIST, 673 M parameters).
REQUIRED_KEYS = ("model.preset", "data.kind")


@dataclass
class ModelConfig:
    preset: str = "SiT-XL/2"
    input_size: int | None = None       # default: data resolution (/ 8 for latents)
    in_channels: int | None = None      # default: 1 Fashion-MNIST, 3 images, 4 latents
    num_classes: int | None = None      # default: 10 Fashion-MNIST, else 1000 (ImageNet)
    learn_sigma: bool | None = None     # default: objective.learn_sigma for ddpm, else False
    qk_norm: bool = False
    grad_checkpointing: bool = False

    def validate(self) -> None:
        try:
            parse_preset(self.preset)
        except ValueError as err:
            raise ConfigError(f"model.preset: {err}") from None
        for key, most in (("input_size", MAX_GRID), ("in_channels", MAX_CHANNELS), ("num_classes", MAX_CLASSES)):
            value = getattr(self, key)
            if value is not None and not 1 <= value <= most:
                raise ConfigError(f"model.{key} must be in 1..{most}, got {value}")


@dataclass
class DataConfig:
    kind: DataKind = "fashion_mnist"
    path: str = ""                      # "" = the default location (Fashion-MNIST only)
    resolution: int = 32                # image size in pixels (latents: of the encoded images)
    hflip: bool = False                 # random horizontal flips, drawn from the step generator
    num_workers: int = 0                # DataLoader workers (0: load in the training process)

    def validate(self) -> None:
        if not 1 <= self.resolution <= MAX_RESOLUTION:
            raise ConfigError(f"data.resolution must be in 1..{MAX_RESOLUTION} pixels, got {self.resolution}")
        if self.kind == "fashion_mnist" and (self.resolution < 28 or self.resolution % 2):
            raise ConfigError(f"data.resolution={self.resolution}: Fashion-MNIST (28x28) is padded, "
                              f"use an even size >= 28 (default 32)")
        if self.kind != "fashion_mnist" and not self.path:
            raise ConfigError(f"data.path is required for data.kind={self.kind!r}")
        if not 0 <= self.num_workers <= MAX_WORKERS:
            raise ConfigError(f"data.num_workers must be in 0..{MAX_WORKERS}, got {self.num_workers}")


@dataclass
class TrainConfig:
    batch_size: int = 256               # GLOBAL batch (all processes, all accumulation steps)
    micro_batch: int = 0                # per-process forward size cap; 0 = no accumulation
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0              # max global grad norm; 0 = no clipping
    ema_decay: float = 0.9999
    label_dropout: float = 0.1          # classifier-free guidance label dropout
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # fp16: with loss scaling
    tf32: bool = True
    compile: bool = False               # torch.compile the student and, when a regularizer needs one, the EMA teacher
    total_kimg: float = 100_000.0
    log_every_kimg: float = 10.0
    ckpt_every_kimg: float = 1_000.0
    keep_last: int = 3
    sample_every_kimg: float = 0.0      # fixed-noise EMA sample grid; 0 = never
    sample_count: int = 64
    eval_every_kimg: float = 0.0        # evaluation.training_eval; 0 = never
    eval_samples: int = 1000
    # the metrics of evaluation.training_eval; auto: classifier on Fashion-MNIST, else inception
    eval_metrics: Literal["auto", "classifier", "inception", "none"] = "auto"
    seed: int = 0
    nonfinite: Literal["skip", "stop"] = "skip"   # a non-finite loss: skip the step, or stop
    max_consecutive_bad: int = 10       # skip policy: stop after this many bad steps in a row
    device: str = "auto"                # auto | cpu | cuda

    def validate(self) -> None:
        positive = {"batch_size": self.batch_size, "lr": self.lr, "eps": self.eps,
                    "total_kimg": self.total_kimg, "ckpt_every_kimg": self.ckpt_every_kimg,
                    "log_every_kimg": self.log_every_kimg, "keep_last": self.keep_last,
                    "max_consecutive_bad": self.max_consecutive_bad,
                    "sample_count": self.sample_count, "eval_samples": self.eval_samples}
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"train.{key} must be > 0, got {value}")
        for key in ("micro_batch", "weight_decay", "grad_clip", "sample_every_kimg", "eval_every_kimg"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        for key in ("ema_decay", "label_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"train.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"train.seed must be in 0..2**63 - 1, got {self.seed}")
        # Sizes that are allocated at once: checked before any model or data is built.
        for key, most in (("batch_size", MAX_BATCH), ("micro_batch", MAX_BATCH), ("sample_count", MAX_BATCH),
                          ("eval_samples", MAX_SAMPLES)):
            if getattr(self, key) > most:
                raise ConfigError(f"train.{key} must be at most {most}, got {getattr(self, key)}"
                                  + (" (train.micro_batch splits a step into smaller forwards)"
                                     if key == "batch_size" else ""))


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "selfalign"
    wandb_entity: str = ""
    progress_bar: bool = True


@dataclass
class ExperimentConfig:
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    regularizers: dict[str, RegularizerConfig] = field(default_factory=dict)   # name -> its settings
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # the training grids' sampler and `selfalign sample`'s defaults (a preset's recorded sampling);
    # None: 50-step grids, 250-step SDE/DDPM samples without guidance
    sampler: SamplerConfig | None = None

    # -- derived ---------------------------------------------------------------------------
    def backbone_config(self):
        """The model's :class:`~selfalign.models.BackboneConfig` (call after :func:`load_config`)."""
        m = self.model
        extra = {} if m.learn_sigma is None else {"learn_sigma": m.learn_sigma}
        return backbone_config(m.preset, input_size=m.input_size, in_channels=m.in_channels,
                               num_classes=m.num_classes, qk_norm=m.qk_norm,
                               grad_checkpointing=m.grad_checkpointing, **extra)

    def grid_sampler(self) -> SamplerConfig:
        """The sampler of the training sample grids: ``sampler`` or 50 deterministic steps."""
        if self.sampler is not None:
            return self.sampler
        return SamplerConfig(name="euler" if self.objective.kind == "flow" else "ddim", steps=50)

    def to_dict(self) -> dict:
        return to_dict(self)

    def hash(self) -> str:
        """A short digest of the whole config; ranks compare it at start."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def check(self, world_size: int = 1) -> None:
        """Checks across sections (after the derived values are filled); one line naming the key."""
        m, d, t = self.model, self.data, self.train
        patch = self.backbone_config().patch_size
        factor = VAE_DOWNSAMPLE if d.kind == "latents" else 1
        if d.resolution % (factor * patch):
            what = (f"VAE factor {factor} x patch {patch} = {factor * patch}" if factor > 1
                    else f"the patch size {patch}")
            raise ConfigError(f"data.resolution={d.resolution} is not divisible by {what} ({m.preset})")
        expected = d.resolution // factor
        if m.input_size != expected:
            raise ConfigError(f"model.input_size={m.input_size} does not match data.resolution="
                              f"{d.resolution} (expected {expected}; leave it unset)")
        o = self.objective
        wanted_sigma = o.kind == "ddpm" and o.learn_sigma
        if m.learn_sigma != wanted_sigma:
            raise ConfigError(f"model.learn_sigma={m.learn_sigma} does not fit objective.kind={o.kind!r}"
                              f" (learn_sigma={o.learn_sigma}); leave model.learn_sigma unset")
        depth = self.backbone_config().depth
        for name, reg in self.regularizers.items():
            try:
                reg.validate(depth)
            except ConfigError as err:
                raise ConfigError(_regularizer_key(name, str(err))) from None
        if self.sampler is not None:
            try:
                self.sampler.check_objective(o.kind)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if o.kind == "ddpm":    # checked now, not at the first sample grid hours into the run
                try:
                    space_timesteps(o.num_timesteps, self.sampler.respacing or str(self.sampler.steps))
                except ConfigError as err:
                    raise ConfigError(f"sampler.{err}") from None
        if t.batch_size % world_size:
            raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the number of "
                              f"processes ({world_size})")


def _regularizer_key(name: str, message: str) -> str:
    """"sra.k_max must be ..." -> "regularizers.sra.k_max must be ..."."""
    return f"regularizers.{message}" if message.startswith(f"{name}.") else f"regularizers.{name}: {message}"


def _load_regularizers(raw: Any, preset: str) -> dict[str, RegularizerConfig]:
    """Type each ``name: settings`` over the regularizer's defaults for the model preset;
    :meth:`ExperimentConfig.check` validates them against the model's depth."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"regularizers: expected a mapping name -> settings, got {raw!r}")
    configs = {}
    for name, settings in raw.items():
        if name not in REGISTRY:
            raise ConfigError(f"regularizers.{name}: unknown regularizer; choose from {sorted(REGISTRY)}")
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise ConfigError(f"regularizers.{name}: expected a mapping of settings, got {settings!r}")
        config_class = REGISTRY[name].config
        defaults = to_dict(config_class.for_model(preset))
        configs[name] = from_dict(config_class, {**defaults, **settings}, f"regularizers.{name}",
                                  validate=False)
    return configs


def _fill_derived(config: ExperimentConfig, facts=None) -> None:
    """Fill what follows from the rest; ``facts`` (:func:`selfalign.data.describe_data`) are what
    the data says, and an explicit value that contradicts them is refused."""
    m, d = config.model, config.data
    channels, classes = (facts.channels, facts.num_classes) if facts else DATA_DEFAULTS[d.kind]
    for key, value, what in (("in_channels", channels, "channels"), ("num_classes", classes, "classes")):
        current = getattr(m, key)
        if facts is not None and current is not None and current != value:
            raise ConfigError(f"model.{key}={current} but {facts.where} has {value} {what}; leave "
                              f"model.{key} unset: the data decides")
        if current is None:
            setattr(m, key, value)
    if m.input_size is None:
        factor = VAE_DOWNSAMPLE if d.kind == "latents" else 1
        m.input_size = max(1, d.resolution // factor)
    if m.learn_sigma is None:   # DiT's learned variance is the DDPM objective's business
        o = config.objective
        m.learn_sigma = o.kind == "ddpm" and o.learn_sigma


def experiment_from_dict(data: dict, world_size: int = 1, describe_data: bool = False) -> ExperimentConfig:
    """Type, complete and validate a config mapping; ``describe_data`` asks the data (an image
    folder, prepared latents) for the classes and channels instead of assuming them."""
    data = dict(data or {})
    raw_regularizers = data.pop("regularizers", {})
    config = from_dict(ExperimentConfig, data)
    config.regularizers = _load_regularizers(raw_regularizers, config.model.preset)
    _fill_derived(config, describe_data_facts(config.data) if describe_data else None)
    config.check(world_size)
    return config


def load_config(source: str | Path | dict, overrides: list[str] | tuple = (), world_size: int = 1,
                required: tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML file, preset name or mapping (its ``base:`` chain merged in), apply ``key=value``
    overrides, type and validate. ``required`` keys (``REQUIRED_KEYS`` for a user's config) must be
    set by the config, its bases or the overrides."""
    data = read_config(source)
    data = apply_overrides(json.loads(json.dumps(data, default=list)), list(overrides))
    _require(data, required, source)
    return experiment_from_dict(data, world_size, describe_data=True)


def _require(data: dict, keys: tuple[str, ...], source) -> None:
    def is_set(key: str) -> bool:     # a value of the wrong type counts: typing names it better
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict):
                return True
            if node.get(part) is None:
                return False
            node = node[part]
        return True

    missing = [key for key in keys if not is_set(key)]
    if missing:
        where = "the config" if isinstance(source, dict) else f"config {str(source)!r}"
        state = "is empty" if not data else f"does not set {' or '.join(missing)}"
        raise ConfigError(f"{where} {state}: a config names its model (model.preset, e.g. SiT-B/2; `selfalign "
                          f"models` lists them) and its data (data.kind: {', '.join(get_args(DataKind))}), or "
                          f"starts from a preset with `base: NAME` (`selfalign train --list` lists them)")


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(config.to_dict(), default=list)),
                                         sort_keys=False))


def may_change_on_resume(key: str) -> bool:
    """Whether the dotted ``key`` may differ between a checkpoint and the run resuming it."""
    return any(key == p or key == p.rstrip(".") or (p.endswith(".") and key.startswith(p))
               for p in RESUMABLE_CHANGES)


def _first_difference(old: Any, new: Any, key: str) -> str | None:
    """The first key (depth first, sorted) where two config trees differ, saying what each holds."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return None if old == new else f"{key} is {old!r} in the checkpoint but {new!r} now"
    names = [n for n in sorted(set(old) | set(new), key=str) if not may_change_on_resume(f"{key}.{n}" if key else str(n))]
    only_old, only_new = [n for n in names if n not in new], [n for n in names if n not in old]
    if key == "regularizers" and (only_old or only_new):     # a regularizer in one and not the other
        return (f"{key}: the checkpoint has {', '.join(map(str, only_old)) or 'none'} but this "
                f"config has {', '.join(map(str, only_new)) or 'none'}")
    for n in names:
        if n not in old or n not in new:
            where = f"{key}.{n}" if key else str(n)
            return (f"{where} is {old.get(n, '<unset>')!r} in the checkpoint but "
                    f"{new.get(n, '<unset>')!r} now")
    for n in names:
        found = _first_difference(old[n], new[n], f"{key}.{n}" if key else str(n))
        if found:
            return found
    return None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out if tree else {prefix[:-1]: {}}
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _defaults(current: ExperimentConfig) -> dict[str, Any]:
    """Every key of ``current`` at its schema default (regularizers: for the model preset)."""
    tree = to_dict(ExperimentConfig())
    tree["regularizers"] = {name: to_dict(type(reg).for_model(current.model.preset))
                            for name, reg in current.regularizers.items()}
    return _flatten(json.loads(json.dumps(tree, default=list)))


def resume_mismatch(saved: dict, current: ExperimentConfig) -> str | None:
    """The first setting that makes ``current`` a different run from the checkpoint's ``saved``.

    A key the checkpoint's config lacks (a setting added since it was written) is no mismatch
    while it holds its default."""
    old = json.loads(json.dumps(saved, default=list))
    new = json.loads(json.dumps(current.to_dict(), default=list))
    defaults = _defaults(current)
    saved_keys = _flatten(old)
    for key, value in _flatten(new).items():
        if value != {} and key not in saved_keys and key in defaults and value == defaults[key]:
            _add_leaf(old, key.split("."), value)
    return _first_difference(old, new, "")


def _add_leaf(tree: dict, path: list[str], value: Any) -> None:
    """Set ``tree[a][b]... = value`` where the section ``tree[a]...`` exists and lacks the key (a
    whole section the checkpoint lacks, e.g. another regularizer, stays a difference)."""
    for part in path[:-1]:
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return
    tree.setdefault(path[-1], value)
