"""``selfalign prepare``: cache VAE latents of an image folder (or zip) as checksummed shards."""
from __future__ import annotations

from ..conventions import MAX_SAMPLES, MAX_WORKERS, SD_VAE_SCALE
from .argtypes import (batch_size, device_name, existing_path, int_range, non_negative_int, positive_float,
                       positive_int)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prepare", help="encode an image folder/zip with the VAE into latent shards (resumable, multi-process)",
        description="Encode an ImageNet-style class-folder tree (train/<wnid>/*.JPEG), any ImageFolder, or a "
                    "zip of one with the SD-VAE into sharded latents (encoder mean and std) plus index.json. "
                    "Run it again with the same arguments to resume; run it under torchrun (or with "
                    "--rank/--world-size) to split the shards over processes.")
    p.add_argument("source", type=existing_path, help="image folder, its parent holding train/, or a .zip")
    p.add_argument("out", help="output folder for the shards and index.json")
    p.add_argument("--image-size", type=positive_int, default=256,
                   help="ADM center crop size (256 or 512; default 256)")
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL: hub id or local folder "
                                               "(default stabilityai/sd-vae-ft-ema)")
    p.add_argument("--scale", type=positive_float, default=None, help="latent scale stored in the index (default 0.18215)")
    p.add_argument("--flip", action="store_true", help="also store the horizontally flipped image's latent")
    p.add_argument("--shard-size", type=int_range(1, MAX_SAMPLES), default=1000, help="images per shard (default 1000)")
    p.add_argument("--batch-size", type=batch_size, default=64, help="VAE batch size per process (default 64)")
    p.add_argument("--format", dest="file_format", choices=("safetensors", "npy"), default="safetensors")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="VAE compute precision")
    p.add_argument("--workers", type=int_range(0, MAX_WORKERS), default=None,
                   help="image-decoding workers per process (default 4)")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto: cuda:$LOCAL_RANK if available, else cpu; or cpu, cuda, cuda:N")
    p.add_argument("--rank", type=non_negative_int, default=None, help="this process's rank (default $RANK or 0)")
    p.add_argument("--world-size", type=positive_int, default=None,
                   help="number of processes (default $WORLD_SIZE or 1)")
    p.add_argument("--max-shards", type=non_negative_int, default=0, help="stop after this many new shards (0: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ..pipeline.prepare import PrepareConfig, distributed_defaults, prepare
    from ..data.vae import DEFAULT_VAE
    from ..devices import pick_device
    from ..formats.paths import check_output_dir

    pick_device(args.device or "auto")      # an impossible --device fails before anything is written
    check_output_dir(args.out, "the output folder")
    rank, world, _ = distributed_defaults()
    config = PrepareConfig(
        source=args.source, out=args.out, image_size=args.image_size, vae=args.vae or DEFAULT_VAE,
        scale=SD_VAE_SCALE if args.scale is None else args.scale, flip=args.flip,
        shard_size=args.shard_size, batch_size=args.batch_size, file_format=args.file_format,
        dtype=args.dtype, precision=args.precision, workers=4 if args.workers is None else args.workers,
        device="" if args.device == "auto" else args.device, rank=rank if args.rank is None else args.rank,
        world_size=world if args.world_size is None else args.world_size, max_shards=args.max_shards,
        progress=not args.no_progress)
    result = prepare(config)
    done = (f"encoded {result.encoded_images} images into {len(result.shards_written)} new shards, "
            f"reused {len(result.shards_reused)} verified shards, skipped {result.skipped_images} unreadable images")
    if result.complete:
        index = result.index
        print(f"{done}; dataset complete: {index['count']} images, {index['num_classes']} classes, latents "
              f"{index['latent_shape']} -> {args.out}/index.json"
              + (f" ({index['skipped']} unreadable images listed in {args.out}/skipped.txt)" if index["skipped"] else ""))
    else:
        print(f"{done}; other shards are still missing: run again (or wait for the other ranks) to finish",
              file=sys.stderr if config.rank else sys.stdout)
    return 0
