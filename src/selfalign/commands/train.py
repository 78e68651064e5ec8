"""``selfalign train [CONFIG] [--set key=value ...] [--run-dir DIR] [--resume auto|PATH]``."""
from __future__ import annotations

import sys

from ..errors import UsageError

RUN_CONFIG = "config.yaml"      # written into every run directory when training starts


def add_parser(sub) -> None:
    import argparse
    p = sub.add_parser("train", help="train a model from a YAML config or preset name",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train DiT/SiT with any regularizers. Run under torchrun for several "
                                   "processes; train.batch_size is the global batch. To continue a run, "
                                   "`selfalign train --run-dir RUN --resume auto` is enough: the config is "
                                   "the run's own, and --set may change only its length, logging, "
                                   "sampling and evaluation.")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML file or preset name (see `selfalign train --list`); when resuming, "
                        "default: the run directory's config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--run-dir", default=None,
                   help="output directory (default: runs/<name>; the name is the config's, or says "
                        "the data, model and regularizers when a preset was pointed at other data)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: continue from the newest complete checkpoint in the run dir (or start); "
                        "PATH: a checkpoint or run directory")
    p.add_argument("--list", action="store_true", help="list the config presets and exit")
    p.set_defaults(func=run)


def data_run_name(config) -> str:
    """``<data>-<model>-<regularizers>``, e.g. ``shapes-sit-t4-sra`` or ``fashion-mnist-sit-t4-vanilla``."""
    from pathlib import Path
    data = (Path(config.data.path).name or "data") if config.data.kind != "fashion_mnist" else "fashion-mnist"
    model = config.model.preset.lower().replace("/", "")
    return f"{data}-{model}-{'-'.join(config.regularizers) or 'vanilla'}"


def run_name(config, source: str, overrides) -> str:
    """The config's own name, unless it is a preset's and the data was changed: then a name that
    says the data (a run on one's own images is not called after the built-in data set)."""
    from pathlib import Path

    from ..config.experiment import load_config, preset_names

    if any(text.split("=", 1)[0].strip() == "name" for text in overrides):
        return config.name
    is_preset = source in preset_names() and not Path(source).is_file()
    if not is_preset:
        return config.name or Path(source).stem
    preset = load_config(source)
    if (preset.data.kind, preset.data.path) != (config.data.kind, config.data.path) or not config.name:
        return data_run_name(config)
    return config.name


def config_of_run(run_dir, overrides, world_size: int):
    """A run's own config (``RUN/config.yaml``, else its newest checkpoint's) with ``overrides``
    that may change on resume."""
    from ..config.experiment import load_config, may_change_on_resume
    from ..config.loader import parse_override
    from ..formats.checkpoint import latest_checkpoint, read_state

    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if not may_change_on_resume(key):
            raise UsageError(f"--set {text}: {key} cannot change when resuming (it would make another run); "
                             f"on resume --set may change the length (train.total_kimg), logging, "
                             f"checkpoint/sample/eval intervals, the device and the sampler; start a new "
                             f"--run-dir for the rest")
    saved = run_dir / RUN_CONFIG
    if saved.is_file():
        return load_config(saved, overrides, world_size=world_size)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UsageError(f"--run-dir {run_dir} holds neither {RUN_CONFIG} nor a checkpoint: give the "
                         f"config file or preset that starts it")
    return load_config(read_state(ckpt)["config"], overrides, world_size=world_size)


def run(args) -> int:
    from pathlib import Path

    from ..config.experiment import REQUIRED_KEYS, load_config, preset_names
    from ..formats.paths import check_output_dir, check_run_name
    from ..training.distributed import world_size_from_env

    if args.list:
        print("\n".join(preset_names()))
        return 0
    world_size = world_size_from_env()
    if args.config:
        config = load_config(args.config, args.overrides, world_size=world_size, required=REQUIRED_KEYS)
        config.name = run_name(config, args.config, args.overrides)
        check_run_name(config.name)
        run_dir = check_output_dir(args.run_dir or Path("runs") / config.name,
                                   "--run-dir" if args.run_dir else f"the run directory (runs/<name>, name={config.name!r})")
    elif args.resume and args.run_dir:
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise UsageError(f"--run-dir {run_dir} does not exist: give a config file or preset to start it")
        config = config_of_run(run_dir, args.overrides, world_size)
    else:
        raise UsageError("give a config file or preset name (selfalign train --list shows the presets), or "
                         "--run-dir RUN --resume auto to continue a run")

    from ..training.outcome import TrainingStopped
    from ..training.trainer import train
    try:
        result = train(config, run_dir, args.resume)
    except TrainingStopped as err:
        print(f"selfalign train: {err}", file=sys.stderr)
        return 1
    if result.interrupted:
        print(f"stopped at step {result.step} by a signal; checkpoint {result.checkpoint}; continue with "
              f"`selfalign train --run-dir {run_dir} --resume auto`")
        return 1
    print(f"done: step {result.step} ({result.images / 1000:.3f} kimg), {result.skipped_steps} skipped "
          f"step(s); checkpoint {result.checkpoint}")
    return 0
