"""``selfalign report RUN [RUN ...]``: compare training runs in one report.

Every run is scored the same way: the denoising loss of each kept checkpoint's EMA on the same
images, labels, noise and times (Fashion-MNIST: its test split; any other data: a fixed sample
of the training images, since an image folder has no test split), a class-conditional sample
grid from fixed noise, and the training and evaluation records of its ``metrics.jsonl``. The
report itself is :mod:`selfalign.evaluation.report`.
"""
from __future__ import annotations

import argparse
import re

from ..conventions import MAX_SAMPLES, MAX_STEPS
from .argtypes import device_name, int_range


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="compare training runs: table, curves, metric-vs-kimg plots, sample grids",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Write OUT/report.md comparing runs (e.g. vanilla and SRA on the same "
                                   "data): the first run is the baseline.")
    p.add_argument("runs", nargs="+", help="run directories (the first is the baseline)")
    p.add_argument("--out", default="runs/report", help="folder for report.md and its plots")
    p.add_argument("--labels", default=None, help="comma-separated names of the runs (default: their config names)")
    p.add_argument("--loss-images", type=int_range(2, MAX_SAMPLES), default=500,
                   help="images for the denoising loss (Fashion-MNIST: test split; other data: training images)")
    p.add_argument("--grid-steps", type=int_range(1, MAX_STEPS), default=None,
                   help="sampler steps of the sample grids (default: each run's grid sampler)")
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=run)


def loss_examples(config, dataset, count: int, seed: int = 0):
    """``(x0, labels, what)``: the images every checkpoint's denoising loss is measured on."""
    import torch

    from ..data import FashionMNIST
    from ..evaluation.features import dataset_batch

    if config.data.kind == "fashion_mnist":
        test = FashionMNIST("test", config.data.path or None, config.data.resolution)
        count = min(count, len(test))
        x0, labels = test.__getitems__(list(range(count)))
        return x0, labels, f"held-out denoising loss ({count} test images)"
    count = min(count, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    x0, labels = dataset_batch(dataset, sorted(order.tolist()), torch.Generator().manual_seed(seed + 1))
    return x0, torch.as_tensor(labels), f"denoising loss ({count} training images)"


def score_run(run_dir, label: str, device, out, loss_count: int, grid_name: str, grid_steps: int | None = None,
              grid_count: int | None = None, train_seconds: float | None = None):
    """``(RunSummary, what the loss was measured on)`` of one run directory
    (:class:`~selfalign.evaluation.report.RunSummary`)."""
    from pathlib import Path

    from ..data import build_dataset
    from ..errors import UsageError
    from ..evaluation.heldout import heldout_losses
    from ..evaluation.report import RunSummary
    from ..formats.checkpoint import list_checkpoints, verify
    from ..runs import load_for_inference
    from ..sampling import SamplerConfig
    from ..training.metrics import read_metrics
    from ..training.samples import sample_grid

    run_dir = Path(run_dir)
    checkpoints = [c for c in list_checkpoints(run_dir) if verify(c) is None]
    if not checkpoints:
        raise UsageError(f"{run_dir} holds no complete checkpoint: give a run directory that `selfalign train` wrote")
    config = load_for_inference(checkpoints[-1], device=device)[2]
    dataset = build_dataset(config.data)
    x0, labels, what = loss_examples(config, dataset, loss_count)
    curve, losses, model, objective = [], None, None, None
    for ckpt in checkpoints:
        model, objective, _ = load_for_inference(ckpt, device=device)
        losses = heldout_losses(model, objective, x0, labels, seed=1234, device=device)
        curve.append({"kimg": int(ckpt.name.split("-")[1]) * config.train.batch_size / 1000,
                      "loss": float(losses.mean())})
    if grid_steps:
        config.sampler = SamplerConfig(name=config.grid_sampler().name, steps=grid_steps)
    classes = model.config.num_classes
    grid = sample_grid(model, objective, config, Path(out) / grid_name, device=device,
                       count=grid_count or (4 * classes if classes <= 16 else 64),
                       decode=getattr(dataset, "decode", None))
    records = read_metrics(run_dir)
    data = "Fashion-MNIST" if config.data.kind == "fashion_mnist" else f"{config.data.kind} {config.data.path}"
    description = (f"{config.model.preset}, {', '.join(config.regularizers) or 'no regularizer'}, "
                   f"{curve[-1]['kimg']:g} kimg on {data} at {config.data.resolution} px")
    return RunSummary(label=label or config.name or run_dir.name, run_dir=run_dir, description=description,
                      data_key=(config.data.kind, config.data.path, config.data.resolution),
                      train=[r for r in records if r.get("kind") == "train"],
                      eval=[r for r in records if r.get("kind") == "eval"], loss_curve=curve, losses=losses,
                      grid=grid, train_seconds=train_seconds), what


def run(args) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..evaluation.report import write_report
    from ..devices import pick_device

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [""] * len(args.runs)
    if len(labels) != len(args.runs):
        raise UsageError(f"--labels names {len(labels)} runs but {len(args.runs)} were given")
    device = pick_device(args.device)
    out = Path(args.out)
    runs, what = [], ""
    for i, (run_dir, label) in enumerate(zip(args.runs, labels)):
        print(f"scoring {run_dir} ...", flush=True)
        grid_name = f"samples-{i}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label or Path(run_dir).name)}.png"
        summary, what = score_run(run_dir, label, device, out, args.loss_images, grid_name, args.grid_steps)
        runs.append(summary)
    names = " vs ".join(r.label for r in runs)
    intro = [f"{len(runs)} run(s), scored on {device}; the first is the baseline. Each run's denoising loss "
             f"is measured on the same images, labels, noise and times ({what})."]
    report = write_report(out, runs, title=f"selfalign report: {names}", intro=intro,
                          loss_label=what.split(" (")[0],
                          grid_caption="EMA, fixed noise; one column per class when there are at most 16",
                          footer=[f"Made with `selfalign report {' '.join(map(str, args.runs))}`."])
    print(f"report: {report}")
    return 0
