"""Convergence benchmark: vanilla vs SRA vs REPA on Fashion-MNIST, several seeds, plus a small SRA
ablation, all through the real trainer (``selfalign train``) and its in-loop evaluation
(``evaluation.training_eval``: in-domain FD, accuracy, precision, recall at fixed kimg).

Runs one training at a time (the machine may be shared), resumably: a finished run is skipped, an
interrupted one continues from its newest checkpoint (``--resume auto``). Then
``summarize.py`` writes the table, JSON and plot.

    python benchmarks/convergence/run.py --budget smoke               # minutes: checks every arm
    nohup python benchmarks/convergence/run.py --budget cpu --seeds 3 > convergence.log 2>&1 &
    python benchmarks/convergence/run.py --budget gpu --seeds 3        # one GPU, SiT-S/2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "src"))          # a bare checkout works too


@dataclass(frozen=True)
class Budget:
    presets: dict            # arm family -> trainer preset
    kimg: float              # images per run
    eval_every_kimg: float   # the fixed checkpoints of the curves
    eval_samples: int
    seeds: int
    ablation_seeds: int
    fid_samples: int         # Inception FID at the final checkpoint (0: skipped)
    threads: int | None      # torch/OpenMP threads per run (None: torch's default)
    extra: tuple = ()        # --set overrides for every run
    only: tuple = ()         # arms to run (empty: all)
    jobs: int = 1            # trainings at a time


CPU_PRESETS = {"vanilla": "fmnist-cpu-tiny-vanilla", "sra": "fmnist-cpu-tiny-sra",
               "repa": "fmnist-cpu-tiny-repa"}
GPU_PRESETS = {"vanilla": "fmnist-gpu-small-vanilla", "sra": "fmnist-gpu-small-sra",
               "repa": "fmnist-gpu-small-repa"}
BUDGETS = {
    # 2-core CPU: SiT-T/4 (64 tokens), batch 64; sized for about 60-90 minutes on a quiet machine
    # One thread per run: on a shared 2-core machine two OpenMP threads wait on each other's
    # time slices and run several times slower; on a quiet machine --threads 2 is faster.
    "cpu": Budget(CPU_PRESETS, kimg=12.8, eval_every_kimg=3.2, eval_samples=300, seeds=3,
                  ablation_seeds=1, fid_samples=0, threads=1),
    # 2-core CPU, the claim only (vanilla vs SRA, 3 seeds), three times longer: 600 steps each, two
    # runs at a time with one thread each; about 60 minutes on a quiet machine
    "cpu-long": Budget(CPU_PRESETS, kimg=38.4, eval_every_kimg=12.8, eval_samples=300, seeds=3,
                       ablation_seeds=1, fid_samples=0, threads=1, only=("vanilla", "sra"), jobs=2),
    # one GPU: SiT-S/2 (256 tokens), batch 256
    "gpu": Budget(GPU_PRESETS, kimg=1000.0, eval_every_kimg=100.0, eval_samples=5000, seeds=3,
                  ablation_seeds=2, fid_samples=5000, threads=None),
    # every arm for a few steps: checks the wiring, numbers meaningless
    "smoke": Budget(CPU_PRESETS, kimg=0.256, eval_every_kimg=0.128, eval_samples=24, seeds=1,
                    ablation_seeds=1, fid_samples=0, threads=1, extra=("train.log_every_kimg=0.064",)),
}


def arms(budget: Budget, gpu: bool) -> dict[str, tuple[str, tuple[str, ...], bool]]:
    """name -> (preset, overrides, is_ablation). Layers follow the preset's model (T: 2->4, S: 3->8)."""
    p = budget.presets
    student = "3" if gpu else "2"
    return {
        "vanilla": (p["vanilla"], (), False),
        "sra": (p["sra"], (), False),
        "repa": (p["repa"], (), False),
        # the paper's 3->3 (teacher at the student's own block) on this depth
        f"sra_layers_{student}to{student}": (p["sra"], (f"regularizers.sra.teacher_layer={student}",), True),
        "sra_no_head": (p["sra"], ("regularizers.sra.head=false",), True),
        "sra_interval_0": (p["sra"], ("regularizers.sra.k_max=0",), True),
        # below the floor: the teacher (and the alignment loss) on the first half of the batch only
        "sra_teacher_fraction_0.5": (p["sra"], ("regularizers.sra.teacher_fraction=0.5",), True),
        # below the floor: the teacher's block linears as row-scaled fp8 matmuls (selfalign.models.fp8)
        "sra_teacher_fp8": (p["sra"], ("regularizers.sra.teacher_precision=fp8",), True),
        # EMA 0: the teacher is the current student. The trainer's EMA is also the evaluated model,
        # so vanilla with EMA 0 is the fair reference for this row.
        "sra_ema_0": (p["sra"], ("train.ema_decay=0",), True),
        "vanilla_ema_0": (p["vanilla"], ("train.ema_decay=0",), True),
    }


def plan(args) -> list[dict]:
    budget = BUDGETS[args.budget]
    seeds = args.seeds or budget.seeds
    ablation_seeds = args.ablation_seeds or budget.ablation_seeds
    kimg = args.kimg or budget.kimg
    every = args.eval_every_kimg or budget.eval_every_kimg
    samples = args.eval_samples or budget.eval_samples
    runs = []
    for name, (preset, overrides, ablation) in arms(budget, args.budget == "gpu").items():
        only = args.only.split(",") if args.only else budget.only
        if only and name not in only:
            continue
        if ablation and args.no_ablation:
            continue
        # the ablation compares end points only: one evaluation, at the end
        run_every = kimg if ablation and not args.ablation_curves else every
        for seed in range(ablation_seeds if ablation else seeds):
            sets = [f"train.seed={seed}", f"train.total_kimg={kimg}", f"train.eval_every_kimg={run_every}",
                    f"train.eval_samples={samples}", f"train.ckpt_every_kimg={every}", "train.keep_last=1",
                    "train.sample_every_kimg=0", "logging.progress_bar=false", "logging.tensorboard=false",
                    *budget.extra, *overrides, *args.set]
            if args.budget != "gpu":
                sets.append("train.device=cpu")
            runs.append({"arm": name, "seed": seed, "preset": preset, "overrides": sets, "ablation": ablation})
    # seed-major order: a run cut short (or a machine whose load drifts) leaves the arms balanced
    order = list(arms(budget, args.budget == "gpu"))
    return sorted(runs, key=lambda r: (r["ablation"], r["seed"], order.index(r["arm"])))


def train(run: dict, run_dir: Path, env: dict) -> dict:
    """One ``selfalign train`` subprocess; returns what happened (never raises on a failed run)."""
    done = run_dir / "DONE.json"
    if done.is_file():
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "selfalign.cli", "train", run["preset"], "--run-dir", str(run_dir)]
    for item in run["overrides"]:
        cmd += ["--set", item]
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        cmd += ["--resume", "auto"]
    run_dir.mkdir(parents=True, exist_ok=True)
    began = time.time()
    with open(run_dir / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    record = {**run, "command": " ".join(cmd), "returncode": code, "seconds": round(time.time() - began, 1),
              "load_average_end": list(os.getloadavg())}
    if code == 0:
        done.write_text(json.dumps(record, indent=2) + "\n")
    return record


def inception_fid(run_dir: Path, samples: int, work: Path, env: dict) -> None:
    """FID of ``samples`` EMA samples (Euler-50) against as many Fashion-MNIST test images."""
    out = run_dir / "fid.json"
    if out.is_file() or samples <= 0:
        return
    ref = work / f"fashion-mnist-test-ref-{samples}.npz"
    cli = [sys.executable, "-m", "selfalign.cli"]
    if not ref.is_file():
        subprocess.run(cli + ["eval", "ref", "fashion-mnist:test", "--resolution", "32", "--limit", str(samples),
                              "--out", str(ref), "--no-progress"], env=env, cwd=REPO, check=True)
    subprocess.run(cli + ["sample", str(run_dir), "--out", str(run_dir / "fid_samples"), "-n", str(samples),
                          "--sampler", "euler", "--steps", "50", "--class-balanced", "--batch-size", "50",
                          "--shard-size", "1000", "--no-progress"],
                   env=env, cwd=REPO, check=True)
    subprocess.run(cli + ["eval", "fid", str(run_dir / "fid_samples" / "samples.npz"), "--ref", str(ref),
                          "--json", str(out), "--no-progress"], env=env, cwd=REPO, check=True)


def heldout(run_dir: Path, threads: int | None, count: int = 500) -> None:
    """Held-out denoising loss of the final EMA on the first ``count`` Fashion-MNIST test images.

    Same images, labels, noise and times (0.1 .. 0.9) for every run, so runs of one seed pair
    up image by image; at CPU scale it separates arms long before sample metrics do.
    """
    out = run_dir / "heldout.json"
    if out.is_file():
        return
    import torch

    from selfalign.data import FashionMNIST
    from selfalign.formats.checkpoint import latest_checkpoint
    from selfalign.runs import load_for_inference
    from selfalign.evaluation.heldout import DEFAULT_TIMES, heldout_losses

    if threads:
        torch.set_num_threads(threads)
    ckpt = latest_checkpoint(run_dir)
    model, objective, _ = load_for_inference(ckpt, device=torch.device("cpu"))
    images, labels = FashionMNIST("test").__getitems__(list(range(count)))
    losses = heldout_losses(model, objective, images, labels, seed=1234)      # (times, images)
    record = {"checkpoint": ckpt.name, "images": count, "times": list(DEFAULT_TIMES),
              "mean": float(losses.mean()), "per_time": losses.mean(1).tolist(),
              "per_image": [round(x, 6) for x in losses.mean(0).tolist()]}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per main arm (default: the budget's)")
    parser.add_argument("--ablation-seeds", type=int, default=None, help="seeds per ablation arm")
    parser.add_argument("--kimg", type=float, default=None, help="images per run, thousands")
    parser.add_argument("--eval-every-kimg", type=float, default=None)
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--fid-samples", type=int, default=None, help="Inception FID samples (0: none)")
    parser.add_argument("--only", default="", help="comma list of arms (default: all)")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--jobs", type=int, default=None, help="trainings at a time (default: the budget's; "
                        "cpu-long: 2, one per core)")
    parser.add_argument("--ablation-curves", action="store_true",
                        help="evaluate ablation runs at every checkpoint too (default: at the end only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    parser.add_argument("--threads", type=int, default=None, help="OMP/torch threads of each run "
                        "(default: the budget's; cpu: 1)")
    parser.add_argument("--work-dir", default=None, help="where runs go (default runs/convergence-<budget>)")
    parser.add_argument("--results", default=None, help="where the table/JSON/plot go "
                        "(default benchmarks/convergence/results[-<budget>] )")
    parser.add_argument("--dry-plan", action="store_true", help="print the runs and exit")
    args = parser.parse_args(argv)

    budget = BUDGETS[args.budget]
    work = Path(args.work_dir or REPO / "runs" / f"convergence-{args.budget}")
    results = Path(args.results or HERE / ("results" if args.budget == "cpu" else f"results-{args.budget}"))
    runs = plan(args)
    if args.dry_plan:
        for run in runs:
            print(run["arm"], run["seed"], run["preset"], " ".join(run["overrides"]))
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    threads = args.threads or budget.threads
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    fid_samples = budget.fid_samples if args.fid_samples is None else args.fid_samples
    from selfalign.models.classifier import ASSET
    if not ASSET.is_file():   # the in-domain judge (and REPA's stand-in encoder): every run needs it
        print(f"the Fashion-MNIST classifier {ASSET} is missing; train it with "
              f"`python scripts/train_classifier.py --out {ASSET}` first", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    judge = hashlib.sha256(ASSET.read_bytes()).hexdigest()[:16]
    manifest = {"budget": args.budget, "command": " ".join(["python"] + sys.argv),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_average_start": list(os.getloadavg()),
                "threads": threads, "classifier_sha256": judge, "runs": []}
    began = time.time()

    def do(i: int, run: dict) -> dict:
        run_dir = work / f"{run['arm']}-s{run['seed']}"
        print(f"[{time.strftime('%H:%M:%S')}] {i + 1}/{len(runs)} {run_dir.name} (load {os.getloadavg()[0]:.1f})",
              flush=True)
        record = train(run, run_dir, env)
        if record["returncode"] != 0:
            print(f"  {run_dir.name} FAILED (code {record['returncode']}); see {run_dir / 'train.log'}", flush=True)
            return {**record, "run_dir": str(run_dir)}
        heldout(run_dir, threads)
        if not run["ablation"]:
            try:
                inception_fid(run_dir, fid_samples, work, env)
            except subprocess.CalledProcessError as err:
                print(f"  {run_dir.name}: Inception FID failed: {err}", flush=True)
        print(f"  {run_dir.name}: {record['seconds']:.0f}s", flush=True)
        return {**record, "run_dir": str(run_dir)}

    jobs = args.jobs or budget.jobs
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:     # subprocesses do the work
        manifest["runs"] = list(pool.map(do, range(len(runs)), runs))
    manifest["jobs"] = jobs
    manifest["seconds"] = round(time.time() - began, 1)
    if hashlib.sha256(ASSET.read_bytes()).hexdigest()[:16] != judge:
        # the FD judge changed under the runs: their numbers are not comparable
        manifest["warning"] = f"{ASSET.name} changed during the benchmark; rerun it"
        print("WARNING: " + manifest["warning"], file=sys.stderr)
    manifest["load_average_end"] = list(os.getloadavg())
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sys.path.insert(0, str(HERE))
    from summarize import summarize
    summarize(work, results, manifest)
    return 0 if all(r["returncode"] == 0 for r in manifest["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
