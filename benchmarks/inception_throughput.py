"""Inception feature extraction throughput (images/s) of the TF-FID network, on CPU or GPU.

Rows, run interleaved (round r in order, the next reversed) on the same uint8 batch:

* ``scripted``: the fid-helper TorchScript export run as loaded, layer by layer (the sFID tap
  needs ``mixed_6/conv``): batch norm as its own pass after every convolution, NCHW, every
  block's branches forced contiguous;
* ``folded_nchw``: :class:`selfalign.evaluation.inception_layers.FoldedInception` (batch norm
  folded into the convolutions) in NCHW;
* ``folded_channels_last``: the same in channels-last memory, the resize computed straight into
  that layout: what :class:`selfalign.evaluation.inception.InceptionV3` runs;
* ``folder_pipeline``: ``evaluation.reference``'s path for a training folder, from PNG files on
  disk to pool features (decode + ADM crop + the row above).

Every row includes the TF1 bilinear resize to 299 px; the first three start from uint8 arrays in
memory. The folded rows are checked against ``scripted`` (largest absolute pool-feature
difference in the JSON).

    PYTHONPATH=src python benchmarks/inception_throughput.py --images 100 --size 32
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, pick_device, print_table, summary, timed, write_json  # noqa: E402

from selfalign.evaluation.inception import SPATIAL_CHANNELS, InceptionV3  # noqa: E402
from selfalign.evaluation.inception_layers import FoldedInception  # noqa: E402


def scripted_features(network: InceptionV3, images: np.ndarray, batch: int) -> np.ndarray:
    """The TorchScript export layer by layer, tapping mixed_6/conv like an ADM evaluator."""
    out = []
    layers = list(network.net.net.layers.named_children())
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = InceptionV3.preprocess(images[start:start + batch], network.device)
            for name, layer in layers:
                if name == "mixed_6":
                    layer.conv(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1).cpu()
                x = layer(x)
            out.append(x.reshape(len(x), -1).cpu().numpy())
    return np.concatenate(out)


def folded_features(model: FoldedInception, images: np.ndarray, batch: int, channels_last: bool,
                    device) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = InceptionV3.preprocess(images[start:start + batch], device, channels_last=channels_last)
            pool, spatial = model(x, SPATIAL_CHANNELS)
            spatial.permute(0, 2, 3, 1).reshape(len(x), -1).cpu()
            out.append(pool.cpu().numpy())
    return np.concatenate(out)


def write_folder(root: Path, images: np.ndarray) -> Path:
    from PIL import Image
    for i, image in enumerate(images):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="images per timed call")
    parser.add_argument("--size", type=int, default=32, help="image side before the resize to 299")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default="scripted,folded_nchw,folded_channels_last,folder_pipeline")
    parser.add_argument("--out", default=None, help="JSON file or folder (default benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    env = environment(device)
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    network = InceptionV3(device=device)
    nchw = FoldedInception(network.net.net.layers).to(device)
    channels_last = network.folded
    scratch = tempfile.TemporaryDirectory()
    folder = write_folder(Path(scratch.name) / "images", images)

    from selfalign.evaluation.reference import folder_features
    fns = {
        "scripted": lambda: scripted_features(network, images, args.batch_size),
        "folded_nchw": lambda: folded_features(nchw, images, args.batch_size, False, device),
        "folded_channels_last": lambda: folded_features(channels_last, images, args.batch_size, True, device),
        "folder_pipeline": lambda: folder_features(network, folder, args.size, batch_size=args.batch_size,
                                                   progress=False).pool,
    }
    names = [n for n in args.rows.split(",") if n]
    unknown = set(names) - set(fns)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; choose from {sorted(fns)}")
    warm = images[: min(4, len(images))]
    scripted_features(network, warm, args.batch_size)
    folded_features(nchw, warm, args.batch_size, False, device)
    folded_features(channels_last, warm, args.batch_size, True, device)

    reference = scripted_features(network, images, args.batch_size) if "scripted" in names else None
    results = {name: {"samples": []} for name in names}
    outputs = {}
    started = time.monotonic()
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            holder = {}
            results[name]["samples"].append(timed(lambda: holder.setdefault("out", fns[name]()), device))
            outputs[name] = holder["out"]
    for name, row in results.items():
        row.update(summary(row["samples"]))
        row["samples_ms"] = [round(s * 1e3, 1) for s in row.pop("samples")]
        row["images_per_s"] = args.images / (row["median_ms"] / 1e3)
        if reference is not None and name != "folder_pipeline":    # the folder lists the images in another order
            row["max_abs_pool_difference_vs_scripted"] = float(np.abs(outputs[name] - reference).max())
    base = results.get("scripted", {}).get("images_per_s")
    if base:
        for row in results.values():
            row["speedup_vs_scripted"] = row["images_per_s"] / base
    print_table([[name, f"{row['images_per_s']:.2f}", f"{row['median_ms']:.0f}",
                  f"{row.get('speedup_vs_scripted', float('nan')):.2f}",
                  f"{row.get('max_abs_pool_difference_vs_scripted', float('nan')):.1e}"]
                 for name, row in results.items()],
                ["row", "img/s", "ms/call", "x scripted", "max |diff|"])
    words = re.sub(r"\(R\)|\(TM\)|\(\d+ threads\)|CPU|@.*", "", env["device"]).split()
    cpu = "-".join(words[:2]) if device.type == "cpu" else env["device"].replace(" ", "-")
    path = write_json({"benchmark": "inception_throughput", "environment": env,
                       "settings": {"images": args.images, "size": args.size, "batch_size": args.batch_size,
                                    "repeats": args.repeats, "threads": torch.get_num_threads(),
                                    "command": " ".join(["python", "benchmarks/inception_throughput.py",
                                                         *(argv if argv is not None else sys.argv[1:])])},
                       "wall_seconds": time.monotonic() - started, "rows": results},
                      args.out, f"inception_{device.type}_{cpu}.json")
    print(f"wrote {path}")
    scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
