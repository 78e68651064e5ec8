"""``selfalign train CONFIG [--set key=value ...] [--run-dir DIR] [--resume auto|PATH]``."""
from __future__ import annotations

import sys

from ..errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config or preset name",
                       description="Train DiT/SiT with any regularizers. Run under torchrun for several "
                                   "processes; train.batch_size is the global batch.")
    p.add_argument("config", help="YAML file or preset name (see `selfalign train --list`)", nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--run-dir", default=None, help="output directory (default runs/<config name>)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: continue from the newest complete checkpoint in the run dir (or start); "
                        "PATH: a checkpoint or run directory")
    p.add_argument("--list", action="store_true", help="list the config presets and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..config.experiment import REQUIRED_KEYS, load_config, preset_names, resolve_config_path
    from ..formats.paths import check_output_dir, check_run_name
    from ..training.distributed import world_size_from_env

    if args.list:
        print("\n".join(preset_names()))
        return 0
    if not args.config:
        raise UsageError("give a config file or preset name (selfalign train --list shows the presets)")
    config = load_config(args.config, args.overrides, world_size=world_size_from_env(), required=REQUIRED_KEYS)
    check_run_name(config.name)
    name = config.name or Path(resolve_config_path(args.config)).stem
    run_dir = check_output_dir(args.run_dir or Path("runs") / name,
                               "--run-dir" if args.run_dir else f"the run directory (runs/<name>, name={name!r})")

    from ..training.outcome import TrainingStopped
    from ..training.trainer import train
    try:
        result = train(config, run_dir, args.resume)
    except TrainingStopped as err:
        print(f"selfalign train: {err}", file=sys.stderr)
        return 1
    if result.interrupted:
        print(f"stopped at step {result.step} by a signal; checkpoint {result.checkpoint}; continue with "
              f"--resume auto")
        return 1
    print(f"done: step {result.step} ({result.images / 1000:.3f} kimg), {result.skipped_steps} skipped "
          f"step(s); checkpoint {result.checkpoint}")
    return 0
