"""``selfalign convert``: import released DiT/SiT/REPA/SRA checkpoints, or export to their layouts."""
from __future__ import annotations

from ..conventions import MAX_CLASSES, MAX_GRID
from .argtypes import existing_file, int_range, positive_int

LAYOUT_HELP = ("sra: official SRA release, SiT-SRA or DiT-SRA (told apart by the tensors), with ap_head, "
               "opt, args and epoch; repa: REPA SiT (+ projectors); sit: original SiT (t = 1 is data, learned "
               "sigma); dit: original DiT (learned sigma)")
PROCESSES_HELP = ("processes of the released run: its --batch-size is per process, so the global batch is "
                  "batch-size x processes x accumulation (default 8, the released README's one node of 8 GPUs)")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="import released DiT/SiT/REPA/SRA checkpoints (or export to them)",
                       description="Convert between selfalign checkpoints and the released layouts. "
                                   + LAYOUT_HELP + ". Only tensors are read (never pickled code).")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    imp = actions.add_parser("import", help="released .pt/.safetensors -> new selfalign run directory",
                             description="Write a resumable run directory: config from the checkpoint's args "
                                         "(one line for each it cannot use), the released step as the run's step, "
                                         "the SRA head and the optimizer state where they map.")
    imp.add_argument("source", type=existing_file, help="the released checkpoint file")
    imp.add_argument("run_dir", help="new selfalign run directory to write (must not exist, or be empty)")
    imp.add_argument("--from", dest="layout", required=True, choices=("sra", "repa", "sit", "dit"),
                     help=LAYOUT_HELP)
    imp.add_argument("--preset", default=None, help="e.g. SiT-XL/2 (default: inferred from the shapes)")
    imp.add_argument("--input-size", type=int_range(1, MAX_GRID), default=None,
                     help="latent grid size (default: inferred)")
    imp.add_argument("--num-classes", type=int_range(1, MAX_CLASSES), default=None,
                     help="default: inferred (1000 for ImageNet)")
    imp.add_argument("--keep-heads", action="store_true",
                     help="keep REPA's projector as regularizer weights (default: drop); SRA's ap_head is always kept")
    imp.add_argument("--data-path", default="", help="prepared latent dataset to record as data.path")
    imp.add_argument("--processes", type=positive_int, default=None, metavar="N", help=PROCESSES_HELP)
    imp.set_defaults(func=run_import)
    exp = actions.add_parser("export", help="selfalign run/checkpoint directory -> released layout")
    exp.add_argument("checkpoint", help="run directory (newest checkpoint) or checkpoint directory")
    exp.add_argument("out_file", help="output .pt (sra: the released training checkpoint; others: "
                                      "{'model', 'ema'}) or .safetensors (EMA only)")
    exp.add_argument("--to", dest="layout", required=True, choices=("sra", "repa", "sit", "dit"),
                     help=LAYOUT_HELP)
    exp.add_argument("--force", action="store_true", help="overwrite OUT_FILE if it exists")
    exp.add_argument("--processes", type=positive_int, default=None, metavar="N",
                     help=PROCESSES_HELP.replace("(default 8,", "(default: the imported run's, else 8,"))
    exp.set_defaults(func=run_export)


def run_import(args) -> int:
    from ..formats.paths import check_output_dir
    from ..pipeline.convert import import_checkpoint
    from ..pipeline.convert_args import DEFAULT_PROCESSES

    check_output_dir(args.run_dir, "RUN_DIR")      # before the source is read and converted
    path, converted = import_checkpoint(args.source, args.layout, args.run_dir, data_path=args.data_path,
                                        processes=args.processes or DEFAULT_PROCESSES,
                                        preset=args.preset, input_size=args.input_size,
                                        num_classes=args.num_classes, keep_heads=args.keep_heads)
    cfg = converted.backbone
    print(f"imported {args.source} ({args.layout}: {converted.family}) as {converted.preset}, input "
          f"{cfg.input_size}, {cfg.num_classes} classes, step {converted.step} -> {path}")
    for note in converted.notes:
        print(f"  {note}")
    return 0


def run_export(args) -> int:
    from ..formats.paths import check_output_file
    from ..pipeline.convert import export_checkpoint

    check_output_file(args.out_file, "OUT_FILE")
    path, notes = export_checkpoint(args.checkpoint, args.layout, args.out_file, force=args.force,
                                    processes=args.processes)
    print(f"exported {args.checkpoint} in the {args.layout} layout -> {path}")
    for note in notes:
        print(f"  {note}")
    return 0
