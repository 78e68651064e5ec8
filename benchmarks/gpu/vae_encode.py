"""SD-VAE encoding throughput (images/s) at 256 px: the GPU cost of ``selfalign prepare``.

A randomly initialised ``AutoencoderKL`` with the architecture of ``stabilityai/sd-vae-ft-ema``
(built from a config in code: no download; the weights do not change the speed) encodes random
images to the latent distribution's mean and std through :class:`selfalign.data.vae.LatentVAE`,
the path ``prepare`` takes, for each precision and batch size. JSON goes to ``--out`` (a file or a
folder; default ``$OUT`` or benchmarks/results/).

    PYTHONPATH=src python benchmarks/gpu/vae_encode.py                   # CUDA: bf16 + fp32
    PYTHONPATH=src python benchmarks/gpu/vae_encode.py --cpu-dry-run     # tiny VAE, every path
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # benchmarks/common.py
from common import environment, summary, timed, write_json  # noqa: E402

from selfalign.data.vae import LatentVAE, sd_vae_config, tiny_vae_config  # noqa: E402
from selfalign.devices import pick_device  # noqa: E402

IMAGENET_TRAIN = 1_281_167
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny VAE at 64 px on the CPU, batch 2")
    p.add_argument("--device", default="auto")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--batch-sizes", default="32,64,128")
    p.add_argument("--iters", type=int, default=10, help="timed calls per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=300.0, help="start no new row after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT"), help="JSON file or folder")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        args.device, args.resolution, args.batch_sizes, args.iters, args.warmup = "cpu", 64, "2", 2, 1
    return args


def run_row(vae: LatentVAE, batch: int, resolution: int, iters: int, warmup: int, device) -> dict:
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(warmup):
            vae.encode(x)
        times = [timed(lambda: vae.encode(x), device) for _ in range(iters)]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"batch": batch, "status": "oom"}
    row = {"batch": batch, "status": "ok", "images_per_s": batch / statistics.median(times), **summary(times)}
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    start = time.perf_counter()
    config = tiny_vae_config(downsample=8) if args.cpu_dry_run else sd_vae_config()
    rows, best = {}, {}
    for precision in args.precisions.split(","):
        torch.manual_seed(0)
        vae = LatentVAE.load(config, device=device, dtype=DTYPES[precision], batch_size=10**9)
        params = sum(p.numel() for p in vae.autoencoder.encoder.parameters())
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            name = f"{precision}-b{batch}"
            if time.perf_counter() - start > args.budget_s:
                rows[name] = {"batch": batch, "status": "skipped (budget)"}
                continue
            rows[name] = run_row(vae, batch, args.resolution, args.iters, args.warmup, device)
            print(f"{name}: {rows[name].get('images_per_s', float('nan')):.1f} img/s ({rows[name]['status']})",
                  flush=True)
            if rows[name]["status"] == "ok":
                best[precision] = max(best.get(precision, 0.0), rows[name]["images_per_s"])
        del vae
        if device.type == "cuda":
            torch.cuda.empty_cache()
    top = max(best.values(), default=None)
    data = {
        "benchmark": "vae_encode", "device": environment(device)["device"], "resolution": args.resolution,
        "vae": "sd-vae-ft-ema architecture, random init" if not args.cpu_dry_run else "tiny dry-run VAE",
        **{f"best_images_per_s_{k}": round(v, 2) for k, v in best.items()},
        # Encoding alone (JPEG decode + crop run in DataLoader workers alongside): a lower bound.
        "imagenet_train_encode_hours_at_best": round(IMAGENET_TRAIN / top / 3600, 3) if top else None,
        "encoder_params_m": round(params / 1e6, 2), "dry_run": args.cpu_dry_run,
        "rows": rows, "environment": environment(device),
        "command": "python benchmarks/gpu/vae_encode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    path = write_json(data, args.out, "vae_encode.json" if not args.cpu_dry_run else "vae_encode_dry.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
