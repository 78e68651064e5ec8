"""``selfalign demo``: vanilla SiT against SiT + SRA on Fashion-MNIST, on a laptop CPU, with a report.

Every run in :data:`RUNS` trains the same model with the same seed, data order and budget; only
the regularizers differ (they come from the run's preset). A new comparison row (REPA, ...) is
one more :class:`DemoRun`. After training each run is scored on the test split (held-out
denoising loss at fixed times and noise, the in-domain metrics of
:mod:`selfalign.evaluation.training_eval` recorded during training, a class-conditional sample
grid) and ``report.md`` is written with tables and plots.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .argtypes import device_name


@dataclass(frozen=True)
class DemoRun:
    key: str        # directory and table id
    label: str      # how the report names it
    preset: str     # config preset holding this run's regularizers


RUNS = [
    DemoRun("vanilla", "SiT (vanilla)", "fmnist-cpu-tiny-vanilla"),
    DemoRun("sra", "SiT + SRA", "fmnist-cpu-tiny-sra"),
    DemoRun("repa", "SiT + REPA (Fashion-MNIST classifier as encoder)", "fmnist-cpu-tiny-repa"),
]


@dataclass(frozen=True)
class Plan:
    name: str
    model: str
    batch: int
    steps: int
    evals: int           # in-domain evaluations during training (the last one at the end)
    eval_samples: int
    heldout: int         # test images for the held-out denoising loss
    grid_steps: int      # Euler steps of the final sample grids
    fid_samples: int     # Inception FID samples per run (0: skipped)
    ema_decay: float     # EMA time constant ~ 1/8 of the run, so the grids (and SRA's teacher) keep up


PLANS = {
    "smoke": Plan("smoke", "SiT-T/8", 16, 6, 1, 20, 100, 2, 0, 0.9),
    "quick": Plan("quick", "SiT-T/4", 32, 200, 2, 200, 500, 16, 0, 0.96),
    "default": Plan("default", "SiT-T/4", 64, 600, 3, 300, 1000, 32, 0, 0.99),
    "longer": Plan("longer", "SiT-T/4", 64, 3000, 5, 1000, 5000, 32, 1000, 0.997),
}
GRID_COUNT = 40      # 4 rows of the 10 classes


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train vanilla SiT and SiT + SRA on Fashion-MNIST and compare them",
                       description="The built-in comparison: same model, seed, data order and budget "
                                   "(default: SiT-T/4, 600 steps of 64 images per run); prints the plan "
                                   "and an ETA measured on this machine, then writes OUT/report.md.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="200 steps of 32 images per run")
    size.add_argument("--smoke", action="store_true", help="6 steps of 16 on SiT-T/8: checks that everything runs")
    size.add_argument("--longer", action="store_true", help="3000 steps of 64 per run, plus Inception FID")
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.set_defaults(func=run)


def plan_from_args(args) -> Plan:
    return PLANS["smoke" if args.smoke else "quick" if args.quick else "longer" if args.longer else "default"]


def run_configs(plan: Plan, device: str, progress_bar: bool):
    """One config per run: identical overrides, only the preset's regularizers differ."""
    from ..config.experiment import load_config
    kimg_per_step = plan.batch / 1000
    eval_every = max(1, plan.steps // plan.evals) * kimg_per_step
    overrides = [f"model.preset={plan.model}", f"train.batch_size={plan.batch}",
                 f"train.total_kimg={plan.steps * kimg_per_step}",
                 f"train.log_every_kimg={max(1, plan.steps // 40) * kimg_per_step}",
                 f"train.ckpt_every_kimg={eval_every}", f"train.keep_last={plan.evals + 1}",
                 f"train.eval_every_kimg={eval_every}", f"train.eval_samples={plan.eval_samples}",
                 "train.sample_every_kimg=0", f"train.device={device}", "train.seed=0",
                 f"train.ema_decay={plan.ema_decay}",
                 "logging.tensorboard=false", f"logging.progress_bar={str(progress_bar).lower()}"]
    return [(run, load_config(run.preset, overrides)) for run in RUNS]


def calibrate(config, device) -> float:
    """Seconds per optimizer step of ``config`` (2 timed steps after a warm-up), in a scratch dir."""
    import tempfile

    from ..training.distributed import DistInfo
    from ..training.trainer import Trainer

    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(config, scratch, DistInfo(device=device), log=lambda _m: None)
        batches = trainer.batches()
        trainer.train_step(*next(batches))
        began = time.perf_counter()
        for _ in range(2):
            trainer.train_step(*next(batches))
        return (time.perf_counter() - began) / 2


def estimate_seconds(plan: Plan, step_seconds: list[float]) -> float:
    """Training from the measured steps; sampling and scoring from the cost of one forward
    (a training step is about three forwards of the batch)."""
    forward = min(step_seconds) / (3 * plan.batch)
    per_run_eval = (plan.evals * plan.eval_samples * 32 + GRID_COUNT * plan.grid_steps
                    + (plan.evals + 1) * plan.heldout * 5 + plan.fid_samples * 32) * forward
    return sum(s * plan.steps for s in step_seconds) + len(step_seconds) * per_run_eval


def run(args) -> int:
    import torch

    from ..devices import pick_device

    began = time.time()
    plan = plan_from_args(args)
    device = pick_device(args.device)
    from ..formats.paths import check_output_dir
    out = check_output_dir(args.out, "--out")
    configs = run_configs(plan, str(device), progress_bar=sys.stderr.isatty())
    torch.manual_seed(0)
    print(f"selfalign demo ({plan.name}): {' vs '.join(r.label for r, _ in configs)} on Fashion-MNIST, {device}")
    print(f"  model {plan.model}, global batch {plan.batch}, {plan.steps} steps = {plan.steps * plan.batch / 1000:g} "
          f"kimg per run, same seed and data order; {plan.evals} in-domain evaluations of {plan.eval_samples} "
          f"samples, held-out loss on {plan.heldout} test images, EMA decay {plan.ema_decay}"
          + (f", Inception FID on {plan.fid_samples} samples" if plan.fid_samples else ""))
    step_seconds = [calibrate(config, device) for _, config in configs]
    eta = estimate_seconds(plan, step_seconds)
    print("  measured " + ", ".join(f"{r.key} {s:.2f} s/step" for (r, _), s in zip(configs, step_seconds))
          + f"; estimated total {eta / 60:.1f} min (ETA {time.strftime('%H:%M', time.localtime(time.time() + eta))})",
          flush=True)

    from ..training.trainer import train
    results = []
    for demo_run, config in configs:
        run_dir = out / "runs" / f"{plan.name}-{demo_run.key}"
        print(f"[{demo_run.key}] training into {run_dir}", flush=True)
        t0 = time.time()
        result = train(config, run_dir, resume="auto", log=lambda m: print(f"  {m}", flush=True))
        if result.interrupted:
            print(f"[{demo_run.key}] stopped at step {result.step}; run the same command again to continue")
            return 1
        train_seconds = time.time() - t0
        print(f"[{demo_run.key}] scoring", flush=True)
        results.append(score_run(demo_run, run_dir, plan, device, out, train_seconds))

    report = write_demo_report(out, plan, results, wall_seconds=time.time() - began, estimate=eta)
    print(f"report: {report} ({(time.time() - began) / 60:.1f} min)")
    return 0


def score_run(demo_run: DemoRun, run_dir: Path, plan: Plan, device, out: Path, train_seconds: float):
    """The report's summary of one demo run (:func:`selfalign.commands.report.score_run`), plus FID."""
    from ..runs import load_for_inference
    from .report import score_run as score

    summary, _ = score(run_dir, demo_run.label, device, out, plan.heldout, f"samples-{demo_run.key}.png",
                       grid_steps=plan.grid_steps, grid_count=GRID_COUNT, train_seconds=train_seconds)
    if plan.fid_samples:
        model, objective, _ = load_for_inference(run_dir, device=device)
        summary.extra["Inception FID"] = inception_fid(model, objective, plan.fid_samples, device)
    return summary


def write_demo_report(out: Path, plan: Plan, results, wall_seconds: float, estimate: float) -> Path:
    """The demo's ``report.md``: :func:`selfalign.evaluation.report.write_report` with the plan."""
    from ..evaluation.report import write_report

    kimg = plan.steps * plan.batch / 1000
    intro = [f"Plan `{plan.name}`: {plan.model}, global batch {plan.batch}, {plan.steps} steps ({kimg:g} kimg) "
             f"per run, same seed (0), data order and budget; only the regularizers differ. Wall time "
             f"{wall_seconds / 60:.1f} min (estimated {estimate / 60:.1f} min before starting). "
             + (f"Inception FID (TF-FID weights) on {plan.fid_samples} class-balanced samples per run against "
                f"as many test images." if plan.fid_samples else
                "Inception FID is not computed in this plan: on a CPU the Inception network is too slow for the "
                "time budget, so the in-domain classifier's metrics stand in; `selfalign demo --longer` adds "
                "FID on 1000 samples per run.")]
    footer = [f"At this scale ({plan.model}, {kimg:g} kimg, one seed) these numbers say little about the "
              "paper's claim (faster convergence measured on ImageNet at 400K iterations, e.g. SiT-B/2 FID "
              "33.0 -> 29.1).",
              "Reproduce with `selfalign demo" + ("" if plan.name == "default" else f" --{plan.name}") + "`."]
    return write_report(out, results, title=f"selfalign demo: {' vs '.join(r.label for r in results)} on "
                        f"Fashion-MNIST", intro=intro, loss_label="held-out denoising loss",
                        grid_caption=f"class-conditional, EMA, Euler {plan.grid_steps} steps, same noise; "
                                     f"one column per class", footer=footer)


def inception_fid(model, objective, count: int, device) -> float:
    """TF-FID Inception FID of ``count`` class-balanced samples against as many test images."""
    import torch

    from ..data.transforms import model_to_uint8
    from ..evaluation.images import ArraySource, FashionMNISTSource
    from ..evaluation.inception import InceptionV3
    from ..evaluation.metrics import evaluate_source, reference_from_source
    from ..evaluation.training_eval import draw_samples

    network = InceptionV3(device=device)
    reference, _ = reference_from_source(network, FashionMNISTSource("test", resolution=32), limit=count,
                                         progress=False)
    samples, _ = draw_samples(model, objective, count, torch.Generator(device=device).manual_seed(77), device)
    images = model_to_uint8(samples).permute(0, 2, 3, 1).numpy()
    return evaluate_source(ArraySource(images, "samples"), reference, network, progress=False,
                           log=lambda _m: None)["fid"]
