"""``selfalign models``: every model preset with its parameter count."""
from __future__ import annotations

from ..errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list model presets and their parameter counts")
    p.add_argument("--input-size", type=int, default=32, help="latent/pixel grid size (default 32)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--filter", default="", help="only presets whose name contains this text")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..models import backbone_config, count_parameters, preset_names
    from ..models.backbone import DiffusionTransformer
    from ..models.presets import PUBLISHED_PARAMS_M
    from ..regularizers.sra import LAYER_PRESETS

    names = [name for name in preset_names() if args.filter in name
             and args.input_size % backbone_config(name).patch_size == 0]
    if not names:
        raise UsageError(f"no preset matches --filter {args.filter!r} with --input-size "
                         f"{args.input_size} (the input size must be divisible by the patch size)")
    print(f"{'preset':<10} {'params':>10} {'published':>10} {'tokens':>6} {'SRA m->n':>9}")
    for name in names:
        cfg = backbone_config(name, input_size=args.input_size, in_channels=args.in_channels,
                              num_classes=args.num_classes)
        with torch.device("meta"):     # no memory is allocated for the weights
            params = count_parameters(DiffusionTransformer(cfg))
        size_patch = name.split("-", 1)[1]
        published = PUBLISHED_PARAMS_M.get(size_patch)
        layers = LAYER_PRESETS.get(name.split("/")[0])
        print(f"{name:<10} {params / 1e6:>9.2f}M {f'{published:.0f}M' if published else '-':>10} "
              f"{cfg.num_tokens:>6} {f'{layers[0]}->{layers[1]}' if layers else '-':>9}")
    return 0
