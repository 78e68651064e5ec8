"""``selfalign convert``: import released DiT/SiT/REPA/SRA checkpoints, or export to their layouts."""
from __future__ import annotations

from ..conventions import MAX_CLASSES, MAX_GRID
from .argtypes import existing_file, existing_path, int_range

LAYOUT_HELP = ("sra: official SRA release (SiT + ap_head); repa: REPA SiT (+ projectors); "
               "sit: original SiT (t = 1 is data, learned sigma); dit: original DiT (learned sigma)")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="import released DiT/SiT/REPA/SRA checkpoints (or export to them)",
                       description="Convert between selfalign checkpoints and the released layouts. "
                                   + LAYOUT_HELP + ". Only tensors are read (never pickled code).")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    imp = actions.add_parser("import", help="released .pt/.safetensors -> selfalign run directory")
    imp.add_argument("source", type=existing_file, help="the released checkpoint file")
    imp.add_argument("run_dir", help="new selfalign run directory to write")
    imp.add_argument("--from", dest="layout", required=True, choices=("sra", "repa", "sit", "dit"),
                     help=LAYOUT_HELP)
    imp.add_argument("--preset", default=None, help="e.g. SiT-XL/2 (default: inferred from the shapes)")
    imp.add_argument("--input-size", type=int_range(1, MAX_GRID), default=None,
                     help="latent grid size (default: inferred)")
    imp.add_argument("--num-classes", type=int_range(1, MAX_CLASSES), default=None,
                     help="default: inferred (1000 for ImageNet)")
    imp.add_argument("--keep-heads", action="store_true",
                     help="keep SRA's ap_head / REPA's projector as regularizer weights (default: drop)")
    imp.add_argument("--data-path", default="", help="prepared latent dataset to record as data.path")
    imp.set_defaults(func=run_import)
    exp = actions.add_parser("export", help="selfalign run/checkpoint directory -> released layout")
    exp.add_argument("checkpoint", type=existing_path,
                     help="run directory (newest checkpoint) or checkpoint directory")
    exp.add_argument("out_file", help="output .pt ({'model', 'ema'}) or .safetensors (EMA only)")
    exp.add_argument("--to", dest="layout", required=True, choices=("sra", "repa", "sit", "dit"),
                     help=LAYOUT_HELP)
    exp.set_defaults(func=run_export)


def run_import(args) -> int:
    from ..pipeline.convert import import_checkpoint

    path, converted = import_checkpoint(args.source, args.layout, args.run_dir, data_path=args.data_path,
                                        preset=args.preset, input_size=args.input_size,
                                        num_classes=args.num_classes, keep_heads=args.keep_heads)
    cfg = converted.backbone
    print(f"imported {args.source} ({args.layout}) as {converted.preset}, input {cfg.input_size}, "
          f"{cfg.num_classes} classes, step {converted.step} -> {path}")
    for note in converted.notes:
        print(f"  {note}")
    return 0


def run_export(args) -> int:
    from ..pipeline.convert import export_checkpoint

    path, notes = export_checkpoint(args.checkpoint, args.layout, args.out_file)
    print(f"exported {args.checkpoint} in the {args.layout} layout -> {path}")
    for note in notes:
        print(f"  {note}")
    return 0
