"""The released SRA training scripts' arguments as a selfalign config, and back.

``SiT-SRA/train.py`` and ``DiT-SRA/train.py`` store their ``argparse`` namespace as ``args`` in
every checkpoint. Each argument selfalign has a setting for goes into the config (a plain
experiment mapping here); every other one is reported in one line. Export takes the reverse
road, keeping an imported argument's own value wherever it still describes the run.

Facts of the released code this module relies on (vvvvvjdy/SRA at 1723f85):

- ``--batch-size`` is per process; the README trains on one node of 8 GPUs (global 256).
- The label dropout is the models' ``class_dropout_prob`` (0.1); ``--cfg-prob`` only sets
  ``use_cfg``, which nothing reads (SiT), or is not read at all (DiT).
- The alignment weight is code, not an argument: SiT with ``cos`` 0.5 constant; otherwise
  ``2 * 0.1 ** (1 + (e - 149) / 1000)`` after epoch 149 at 256 px (``(e - 99) / 800`` after 99
  at 512 px), i.e. base 0.2 with selfalign's ``official_decay``; DiT the same form with 0.4,
  i.e. base 0.04. DiT always uses smooth-L1 (``--loss-type`` has the one choice ``sml1``).
- The teacher is the EMA model's full forward, outside the student's autocast (fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UsageError

# train.py's arguments and defaults, in declaration order (SiT-SRA at 1723f85; DiT-SRA lacks the
# four SiT-only ones and defaults to loss_type "sml1" and t_max 0.1).
SIT_ARGS = {
    "output_dir": "exps", "exp_name": None, "logging_dir": "logs", "resume_ckpt": None, "sample_steps": 100000,
    "epochs": 801, "checkpoint_steps": 50000, "checkpoint_epochs": 200, "max_train_steps": 4100000, "model": None,
    "num_classes": 1000, "fused_attn": True, "qk_norm": False, "data_dir_train": "../data/imagenet256",
    "resolution": 256, "batch_size": 32, "mixed_precision": "fp16", "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 0.0,
    "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "seed": 0, "num_workers": 8, "loss_type": "cos",
    "cfg_prob": 0.1, "path_type": "linear", "prediction": "v", "weighting": "uniform", "block_out_s": 4,
    "block_out_t": 8, "t_max": 0.2,
}
SIT_ONLY = ("sample_steps", "path_type", "prediction", "weighting")
DIT_ARGS = {k: {"loss_type": "sml1", "t_max": 0.1}.get(k, v) for k, v in SIT_ARGS.items() if k not in SIT_ONLY}
RELEASED_ARGS = {"SiT": SIT_ARGS, "DiT": DIT_ARGS}

DEFAULT_PROCESSES = 8                  # the released README: one node of 8 GPUs
LABEL_DROPOUT = 0.1                    # the released models' class_dropout_prob
IMAGENET_TRAIN_IMAGES = 1_281_167      # for the epoch arithmetic of ImageNet-1k runs
RELEASED_TEACHER = {"teacher_truncate": False, "teacher_precision": "fp32"}
NOT_USED = {
    "output_dir": "selfalign writes into the run directory",
    "logging_dir": "selfalign logs into the run directory",
    "resume_ckpt": "this checkpoint is the resume point",
    "checkpoint_epochs": "selfalign checkpoints every train.ckpt_every_kimg",
    "data_dir_train": "the released code's preprocessed data; give selfalign's prepared latents with --data-path",
    "fused_attn": "selfalign always uses PyTorch's scaled_dot_product_attention",
}
LOSS_TO_DISTANCE = {"sml1": "smooth_l1", "l1": "l1", "l2": "l2", "cos": "channel_cosine"}
MIXED_TO_PRECISION = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


def released_weighting(family: str, loss_type: str, resolution: int) -> dict:
    """The SRA weight settings the released training loop hard-codes."""
    if family == "SiT" and loss_type == "cos":
        return {"weight": 0.5, "weight_schedule": "constant"}
    start, period = (149, 1000.0) if resolution == 256 else (99, 800.0)
    return {"weight": 0.2 if family == "SiT" else 0.04, "weight_schedule": "official_decay",
            "decay_start_epoch": start, "decay_period": period}


@dataclass(frozen=True)
class Batch:
    """How the released run's per-process batch makes selfalign's global one."""

    processes: int
    accumulation: int

    def images_per_step(self, per_process: int) -> int:
        return per_process * self.processes * self.accumulation


def _invert(table: dict) -> dict:
    return {v: k for k, v in table.items()}


@dataclass(frozen=True)
class Rule:
    """One argument <-> one config key; ``to_config``/``to_args`` return None where no value fits."""

    arg: str
    key: str
    to_config: Callable[[Any, Batch, int], Any]     # (value, batch, global batch) -> config value
    to_args: Callable[[Any, Batch, int], Any]
    checked: bool = False                            # set from the tensors; the argument is compared


def _same(value, _batch, _global):
    return value


def _steps_to_kimg(value, _batch, global_batch):
    return None if value is None else value * global_batch / 1000


def _kimg_to_steps(value, _batch, global_batch):
    return max(1, round(value * 1000 / global_batch)) if value else None


def _lookup(table):
    return lambda value, _b, _g: table.get(value)


RULES = [
    Rule("exp_name", "name", _same, _same),
    Rule("model", "model.preset", _same, _same, checked=True),
    Rule("num_classes", "model.num_classes", _same, _same, checked=True),
    Rule("qk_norm", "model.qk_norm", _same, _same, checked=True),
    Rule("resolution", "data.resolution", _same, _same, checked=True),
    Rule("batch_size", "train.batch_size", lambda v, b, _g: b.images_per_step(v),
         lambda v, b, _g: v // (b.processes * b.accumulation)),
    Rule("gradient_accumulation_steps", "train.micro_batch", lambda v, b, g: g // (b.processes * v) if v > 1 else 0,
         lambda v, b, _g: b.accumulation),
    Rule("mixed_precision", "train.precision", _lookup(MIXED_TO_PRECISION), _lookup(_invert(MIXED_TO_PRECISION))),
    Rule("learning_rate", "train.lr", _same, _same),
    Rule("adam_beta1", "train.betas.0", _same, _same),
    Rule("adam_beta2", "train.betas.1", _same, _same),
    Rule("adam_weight_decay", "train.weight_decay", _same, _same),
    Rule("adam_epsilon", "train.eps", _same, _same),
    Rule("max_grad_norm", "train.grad_clip", _same, _same),
    Rule("seed", "train.seed", _same, _same),
    Rule("num_workers", "data.num_workers", _same, _same),
    Rule("max_train_steps", "train.total_kimg", _steps_to_kimg, _kimg_to_steps),
    Rule("checkpoint_steps", "train.ckpt_every_kimg", _steps_to_kimg, _kimg_to_steps),
    Rule("sample_steps", "train.sample_every_kimg", _steps_to_kimg, _kimg_to_steps),
    Rule("cfg_prob", "train.label_dropout", lambda v, _b, _g: LABEL_DROPOUT,
         lambda v, _b, _g: LABEL_DROPOUT if v == LABEL_DROPOUT else None),
    Rule("path_type", "objective.path", _lookup({"linear": "linear", "cosine": "cosine"}),
         _lookup({"linear": "linear"})),
    Rule("prediction", "objective.kind", _lookup({"v": "flow"}), _lookup({"flow": "v"})),
    Rule("weighting", "objective.time_sampling", _lookup({"uniform": "uniform", "lognormal": "lognormal"}), _same),
    Rule("loss_type", "regularizers.sra.distance", _lookup(LOSS_TO_DISTANCE), _lookup(_invert(LOSS_TO_DISTANCE))),
    Rule("block_out_s", "regularizers.sra.student_layer", _same, _same),
    Rule("block_out_t", "regularizers.sra.teacher_layer", _same, _same),
    Rule("t_max", "regularizers.sra.k_max", _same, _same),
]
WHY_NOT = {
    "cfg_prob": f"the released models drop labels with their class_dropout_prob {LABEL_DROPOUT} whatever "
                f"--cfg-prob says",
    "path_type": "the released loss knows 'linear' and 'cosine' only (it stops on 'cos')",
    "mixed_precision": "not one of no/fp16/bf16",
    "loss_type": "not one of sml1/l1/l2/cos",
    "prediction": "the released code predicts v only",
    "weighting": "not one of uniform/lognormal",
}


# -- dotted keys in a plain experiment mapping ---------------------------------------------------
def get_key(tree: dict, key: str, default=None):
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return default
    return node


def set_key(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[int(part)]
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


def _applies(rule: Rule, family: str, config: dict) -> bool:
    if family == "DiT" and rule.arg in SIT_ONLY:
        return False
    return not rule.key.startswith("regularizers.sra.") or "sra" in config.get("regularizers", {})


# -- import -------------------------------------------------------------------------------------
def args_to_config(args: dict, family: str, config: dict, processes: int = DEFAULT_PROCESSES) -> list[str]:
    """Set ``config`` (a plain experiment mapping whose model and data come from the tensors) from
    the released arguments; return one line per argument that could not be used as it is."""
    notes = []
    accumulation = int(args.get("gradient_accumulation_steps") or 1)
    batch = Batch(processes, accumulation)
    global_batch = batch.images_per_step(int(args.get("batch_size") or SIT_ARGS["batch_size"]))
    config.setdefault("train", {}).setdefault("betas", [0.9, 0.999])
    known = {rule.arg: rule for rule in RULES}
    for name, value in args.items():
        rule = known.get(name)
        if name == "epochs":
            notes.append(_epochs_note(value, args, global_batch))
        elif name in NOT_USED:
            notes.append(f"args.{name}={value!r}: not used ({NOT_USED[name]})")
        elif rule is None:
            notes.append(f"args.{name}={value!r}: not an argument of the released SRA train.py; ignored")
        elif not _applies(rule, family, config):
            notes.append(f"args.{name}={value!r}: not used ("
                         + ("a SiT-only argument)" if family == "DiT" else "the checkpoint holds no SRA head)"))
        elif name == "loss_type" and family == "DiT":
            set_key(config, rule.key, "smooth_l1")      # DiT-SRA's loss is smooth-L1 whatever the argument
        else:
            wanted = rule.to_config(value, batch, global_batch)
            if rule.checked and wanted != get_key(config, rule.key):
                notes.append(f"args.{name}={value!r} but the tensors say {rule.key}={get_key(config, rule.key)!r}: "
                             f"the tensors decide")
            elif wanted is None and value is not None:
                notes.append(f"args.{name}={value!r}: not used ({WHY_NOT.get(name, 'no selfalign setting')})")
            elif wanted is not None and not rule.checked:
                set_key(config, rule.key, wanted)
                if name == "cfg_prob" and value != LABEL_DROPOUT:
                    notes.append(f"args.cfg_prob={value!r}: train.label_dropout={LABEL_DROPOUT} ({WHY_NOT[name]})")
    return notes


def _epochs_note(epochs, args: dict, global_batch: int) -> str:
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // global_batch
    kimg = int(epochs) * steps_per_epoch * global_batch / 1000
    limit = args.get("max_train_steps")
    return (f"args.epochs={epochs!r}: not used (train.total_kimg comes from max_train_steps={limit!r}; the "
            f"released loop also stops after {epochs} epochs, about {kimg:,.0f} kimg on ImageNet-1k: "
            f"--set train.total_kimg={kimg:.0f} stops there)")


def sra_settings(family: str, args: dict | None, resolution: int) -> dict:
    """The SRA regularizer's weight and teacher settings of the released training loop."""
    loss = (args or {}).get("loss_type", RELEASED_ARGS[family]["loss_type"])
    return {**released_weighting(family, loss if family == "SiT" else "sml1", resolution), **RELEASED_TEACHER}


# -- export -------------------------------------------------------------------------------------
def config_to_args(config: dict, family: str, base: dict | None, processes: int = DEFAULT_PROCESSES
                   ) -> tuple[dict, list[str]]:
    """The released ``args`` for a selfalign run (a plain experiment mapping): ``base`` (the
    imported arguments, else the released defaults) with every mapped value taken from the
    config; an imported value stays where it still maps to the config's. Returns (args, notes)."""
    args = dict(base) if base else dict(RELEASED_ARGS[family])
    notes = []
    global_batch = int(get_key(config, "train.batch_size"))
    micro = int(get_key(config, "train.micro_batch", 0) or 0)
    per_process = micro or global_batch // processes
    if per_process < 1:
        raise UsageError(f"train.batch_size={global_batch} cannot be split over {processes} processes: "
                         f"pass --processes with the released run's process count")
    batch = Batch(processes, max(1, global_batch // (processes * per_process)))
    if batch.images_per_step(per_process) != global_batch:
        notes.append(f"train.batch_size={global_batch} is not {processes} processes x a per-process batch "
                     f"(micro_batch {micro}): args.batch_size={per_process} gives {batch.images_per_step(per_process)}")
    for rule in RULES:
        if rule.arg not in RELEASED_ARGS[family] or not _applies(rule, family, config):
            continue
        value = get_key(config, rule.key)
        if value is None:
            continue
        kept = args.get(rule.arg)
        if kept is not None and rule.to_config(kept, batch, global_batch) == value:
            continue
        new = rule.to_args(value, batch, global_batch)
        if new is None:
            notes.append(f"{rule.key}={value!r} has no released equivalent: args.{rule.arg}={kept!r} kept")
        else:
            args[rule.arg] = new
    if family == "DiT":
        args["loss_type"] = "sml1"
    return args, notes + _weighting_notes(config, family, args)


def _weighting_notes(config: dict, family: str, args: dict) -> list[str]:
    sra = get_key(config, "regularizers.sra")
    if not sra:
        return []
    notes = []
    distance = sra.get("distance")
    if family == "DiT" and distance != "smooth_l1":
        notes.append(f"regularizers.sra.distance={distance!r}: the released DiT code always uses smooth-L1")
    resolution = int(get_key(config, "data.resolution", 256))
    released = released_weighting(family, args.get("loss_type", "sml1"), resolution)
    ours = {k: sra.get(k) for k in released}
    if ours["weight_schedule"] == "constant" == released["weight_schedule"]:
        ours = {k: ours[k] for k in ("weight", "weight_schedule")}
    if ours != released:
        notes.append(f"the SRA weight here is {_describe_weight(ours)}; the released code's resume uses "
                     f"{_describe_weight(released)}")
    if sra.get("teacher_fraction", 1.0) != 1.0 or sra.get("head", True) is not True:
        notes.append("regularizers.sra.teacher_fraction/head differ from the released code (whole batch, with head)")
    return notes


def _describe_weight(w: dict) -> str:
    if w.get("weight_schedule") == "constant":
        return f"{w['weight']} constant"
    return (f"{w['weight']} decaying by 10x every {w.get('decay_period'):g} epochs after epoch "
            f"{w.get('decay_start_epoch')}")
