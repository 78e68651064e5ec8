"""What every benchmark script shares: the machine's description, timing, matmul rate, JSON output.

Benchmarks are scripts, not library code: run them as ``PYTHONPATH=src python benchmarks/X.py``
(the package is usually installed; ``src`` on the path also works from a bare checkout).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity). Only used
# to print a second MFU next to the one against the *measured* matmul rate, which is the target's.
SPEC_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H200": 989.4, "A100": 312.0}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def spec_bf16_tflops(name: str) -> float | None:
    for key, value in SPEC_BF16_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Everything needed to judge a number later: card, software, and how busy the machine was."""
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["spec_bf16_tflops"] = spec_bf16_tflops(env["device"])
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def summary(samples: list[float]) -> dict:
    """Median and quartiles (milliseconds) of per-call seconds."""
    ms = sorted(s * 1e3 for s in samples)
    if not ms:
        return {"n": 0}
    quart = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"n": len(ms), "median_ms": statistics.median(ms), "p25_ms": quart[0],
            "p75_ms": quart[2], "min_ms": ms[0]}


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                  repeats: int = 10) -> dict:
    """The measured rate of one large square matmul: the denominator of model FLOPs utilisation."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, device) for _ in range(repeats)]
    best, median = min(times), statistics.median(times)
    flops = 2 * size**3
    return {"size": size, "dtype": str(dtype).replace("torch.", ""),
            "tflops_median": flops / median / 1e12, "tflops_best": flops / best / 1e12}


def write_json(data: dict, out: str | None, default_name: str) -> Path:
    """Write to ``out`` (a file, or a folder that gets ``default_name``); default: results/."""
    path = Path(out) if out else RESULTS_DIR / default_name
    if path.suffix != ".json":
        path = path / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**data, "load_average_end": list(os.getloadavg())}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
