"""``selfalign sample``: N samples from a checkpoint into an ADM ``.npz`` (plus PNGs on request).

Works with ``torchrun --nproc-per-node K selfalign sample ...``: shards are split by index, sample
``i`` depends only on ``(seed, i)``, finished shards survive an interruption and are skipped.
"""
from __future__ import annotations

import argparse

from ..conventions import MAX_SAMPLES, MAX_STEPS
from ..errors import UsageError
from .argtypes import (batch_size, device_name, existing_path, int_range, non_negative_float, non_negative_int,
                       noise_level, positive_int, seed)


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw samples from a checkpoint into an ADM .npz",
                       description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=existing_path,
                   help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (samples.npz, shards/, png/)")
    p.add_argument("-n", "--num-samples", type=int_range(1, MAX_SAMPLES), default=50000)
    p.add_argument("--sampler", default=None, help="euler | heun | euler_maruyama | ddpm | ddim "
                   "(default: the run's; without one euler_maruyama for flows, ddpm for DDPM)")
    p.add_argument("--steps", type=int_range(1, MAX_STEPS), default=None,
                   help="sampling steps (default: the run's, else 250)")
    p.add_argument("--cfg-scale", type=non_negative_float, default=None,
                   help="classifier-free guidance scale, 1 = off (default: the run's, else 1)")
    p.add_argument("--guidance-interval", type=noise_level, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="guide only for t in [LOW, HIGH] (e.g. 0 0.7; default: the run's, else 0 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sampler setting, e.g. --set diffusion=sigma --set eta=1.0")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--batch-size", type=batch_size, default=64, help="per-process batch")
    p.add_argument("--shard-size", type=int_range(1, MAX_SAMPLES), default=None,
                   help="images per resumable shard, a multiple of --batch-size (default 16 batches)")
    p.add_argument("--class-balanced", action="store_true", help="equal class counts instead of uniform labels")
    p.add_argument("--unconditional", action="store_true", help="sample with the null class")
    p.add_argument("--raw-weights", action="store_true", help="use the trained weights instead of the EMA")
    p.add_argument("--png", action="store_true", help="also write every image to OUT/png/")
    p.add_argument("--vae", default=None, help="latent models: VAE hub id or directory "
                   "(default: the one the latent dataset was prepared with)")
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--rank", type=non_negative_int, default=None,
                   help="this process's share (default: torchrun's RANK)")
    p.add_argument("--world-size", type=positive_int, default=None,
                   help="number of shares (default: torchrun's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def sampler_config(args, objective_kind: str, recorded=None):
    """A :class:`SamplerConfig`, strictly typed: the run's own (``recorded``, its config's
    ``sampler:`` section, where a preset records how its authors sampled), else 250 steps of the
    SDE (flows) or DDPM without guidance; each flag and ``--set`` override replaces one value."""
    from dataclasses import asdict

    from ..config.loader import apply_overrides, from_dict
    from ..sampling import SamplerConfig

    values = (asdict(recorded) if recorded is not None
              else {"name": "ddpm" if objective_kind == "ddpm" else "euler_maruyama"})
    if args.sampler:
        values["name"] = args.sampler
    if args.steps is not None:
        values["steps"] = args.steps
    if args.cfg_scale is not None:
        values["cfg_scale"] = args.cfg_scale
    if args.guidance_interval:
        values["guidance_low"], values["guidance_high"] = args.guidance_interval
    values = apply_overrides(values, args.set)
    config = from_dict(SamplerConfig, values, "sampler")
    config.check_objective(objective_kind)
    return config


def latent_decoder(config, vae_spec: str | None, device):
    """The VAE decode of a latent model (``None`` for pixel models)."""
    if config.data.kind != "latents":
        return None
    from ..formats.shards import load_index
    from ..data.vae import LatentScaling, LatentVAE

    index = load_index(config.data.path) if config.data.path else None
    if vae_spec:
        scaling = LatentScaling.from_index(index) if index else LatentScaling.constant()
        vae = LatentVAE.load(vae_spec, scaling=scaling, device=device)
    elif index:
        vae = LatentVAE.for_dataset(index, device=device)
    else:
        raise UsageError("this is a latent model but its data.path names no prepared dataset: pass --vae")
    return lambda x: vae.decode_uint8(x).numpy()


def run(args) -> int:
    from dataclasses import asdict

    from ..evaluation.generate import (SamplePlan, check_plan, generate_shards, make_draw, merge_shards,
                                       missing_shards, write_pngs)
    from ..training import distributed
    from ..formats.checkpoint import resolve_checkpoint, warn
    from ..formats.paths import check_output_dir, writing
    from ..runs import load_for_inference

    out = check_output_dir(args.out, "--out")
    info = distributed.init(args.device)
    rank = info.rank if args.rank is None else args.rank
    world = info.world_size if args.world_size is None else args.world_size
    if not 0 <= rank < world:
        raise UsageError(f"--rank {rank} must be in [0, --world-size {world})")
    # a run dir's newest: fixed for resumes; a fallback past a damaged one is said once, not per process
    checkpoint = resolve_checkpoint(args.checkpoint, report=warn if info.is_main else lambda _message: None)
    model, objective, config = load_for_inference(checkpoint, use_ema=not args.raw_weights)
    model = model.to(info.device).eval()
    sampler = sampler_config(args, objective.kind, config.sampler)
    plan = SamplePlan(checkpoint=str(checkpoint.resolve()), num_samples=args.num_samples,
                      seed=args.seed, batch_size=args.batch_size,
                      shard_size=args.shard_size or 16 * args.batch_size,
                      class_balanced=args.class_balanced, unconditional=args.unconditional,
                      sampler=asdict(sampler) | {"ema": not args.raw_weights, "vae": args.vae})
    plan.validate()
    if info.is_main or not info.distributed:
        with writing(out, "--out"):
            check_plan(out, plan)
    distributed.barrier(info)
    check_plan(out, plan)

    bb = model.config
    draw = make_draw(model, objective, sampler, info.device, latent_decoder(config, args.vae, info.device),
                     unconditional=args.unconditional)
    shape = (bb.in_channels, bb.input_size, bb.input_size)
    with writing(out, "--out"):
        counts = generate_shards(plan, out, draw, shape, bb.num_classes, rank, world,
                                 progress=not args.no_progress and rank == 0)
    print(f"rank {rank}: {counts['made']} shards sampled ({counts['images']} images), "
          f"{counts['skipped']} finished shards kept")
    distributed.barrier(info)
    try:
        if not info.is_main:
            return 0
        if missing_shards(plan, out, bb.num_classes):
            print(f"other shares are still missing: when every --rank has finished, run the command again "
                  f"(any rank) to write {out / 'samples.npz'}")
            return 0
        with writing(out, "--out"):
            path = merge_shards(plan, out, bb.num_classes)
            print(f"wrote {path} ({plan.num_samples} images)")
            if args.png:
                print(f"wrote {write_pngs(path, out / 'png')} PNGs to {out / 'png'}")
        return 0
    finally:
        distributed.shutdown(info)      # every rank meets here, also when rank 0 returns early
