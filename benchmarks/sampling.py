"""Sampling benchmark: images/s of Euler-50 ODE and Euler-Maruyama SDE-250, with and without
classifier-free guidance and with a guidance interval, through ``selfalign.sampling.sample``.

Each row also counts the network calls and how many of them were guided (a batch of 2B:
conditional + null labels); outside the guidance interval the unconditional pass is skipped.
Rows run interleaved in one process (round r in order, the next reversed).

    PYTHONPATH=src python benchmarks/sampling.py --preset cpu-tiny
    PYTHONPATH=src python benchmarks/sampling.py --preset gpu-xl2 --out $OUT
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, summary, timed, write_json  # noqa: E402
from report import print_table  # noqa: E402

from selfalign.devices import pick_device  # noqa: E402
from selfalign.models.flops import forward_flops  # noqa: E402
from selfalign.models import build_model  # noqa: E402
from selfalign.objectives import FlowObjective  # noqa: E402
from selfalign.sampling import SamplerConfig, sample  # noqa: E402


@dataclass(frozen=True)
class Preset:
    model: str
    input_size: int
    in_channels: int
    num_classes: int
    batch: int
    precision: str
    device: str
    repeats: int
    scale: float          # step counts are multiplied by this (1.0 = Euler-50 / SDE-250)


PRESETS = {
    # the convergence benchmark's model: SiT-T/4 on Fashion-MNIST 1x32x32
    "cpu-tiny": Preset("SiT-T/4", 32, 1, 10, 16, "fp32", "cpu", 2, 1.0),
    "gpu-b2": Preset("SiT-B/2", 32, 4, 1000, 64, "bf16", "cuda", 2, 1.0),
    "gpu-xl2": Preset("SiT-XL/2", 32, 4, 1000, 64, "bf16", "cuda", 1, 1.0),
    "dry": Preset("SiT-T/2", 8, 4, 10, 4, "fp32", "cpu", 1, 0.1),
}
CFG_SCALE, GUIDANCE_HIGH = 1.8, 0.7      # the SRA paper's ImageNet 256 setting: CFG 1.8 for t <= 0.7


def rows(scale: float) -> dict[str, SamplerConfig]:
    euler, sde = max(2, round(50 * scale)), max(2, round(250 * scale))
    return {
        f"euler{euler}": SamplerConfig(name="euler", steps=euler),
        f"euler{euler}_cfg": SamplerConfig(name="euler", steps=euler, cfg_scale=CFG_SCALE),
        f"euler{euler}_cfg_interval": SamplerConfig(name="euler", steps=euler, cfg_scale=CFG_SCALE,
                                                    guidance_high=GUIDANCE_HIGH),
        f"sde{sde}": SamplerConfig(name="euler_maruyama", steps=sde),
        f"sde{sde}_cfg_interval": SamplerConfig(name="euler_maruyama", steps=sde, cfg_scale=CFG_SCALE,
                                                guidance_high=GUIDANCE_HIGH),
    }


class CountedNetwork(nn.Module):
    """The backbone under autocast, counting calls and evaluated images (``.module`` lets the
    sampler find ``num_classes``)."""

    def __init__(self, module: nn.Module, autocast):
        super().__init__()
        self.module, self.autocast = module, autocast
        self.reset(0)

    def reset(self, batch: int) -> None:
        self.batch, self.calls, self.guided_calls, self.images = batch, 0, 0, 0

    def forward(self, x, t, y):
        self.calls += 1
        self.guided_calls += int(x.shape[0] > self.batch)
        self.images += x.shape[0]
        with self.autocast():
            return self.module(x, t, y).float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting new rows after this")
    parser.add_argument("--out", default=None, help="JSON file or folder (default benchmarks/results/)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, **{k: getattr(args, k) for k in ("batch", "repeats")
                                            if getattr(args, k) is not None})
    device = pick_device(preset.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    deadline = started + args.budget_s if args.budget_s else float("inf")
    env = environment(device)

    torch.manual_seed(0)
    model = build_model(preset.model, input_size=preset.input_size, in_channels=preset.in_channels,
                        num_classes=preset.num_classes).to(device).eval()
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if preset.precision == "bf16"
                else contextlib.nullcontext)
    network = CountedNetwork(model, autocast)
    objective = FlowObjective()
    shape = (preset.batch, preset.in_channels, preset.input_size, preset.input_size)
    noise = torch.randn(shape, device=device)
    labels = torch.randint(0, preset.num_classes, (preset.batch,), device=device)
    configs = rows(preset.scale)

    def run(config):
        generator = torch.Generator(device).manual_seed(0)
        sample(network, objective, noise, labels, config, generator)

    run(SamplerConfig(name="euler", steps=2, cfg_scale=CFG_SCALE))   # warm-up: both batch sizes
    results = {name: {"sampler": dataclasses.asdict(c), "samples": [], "status": "ok"} for name, c in configs.items()}
    for r in range(preset.repeats):
        for name in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            if time.monotonic() > deadline:
                results[name]["status"] = "skipped or cut short: time budget spent"
                continue
            network.reset(preset.batch)
            results[name]["samples"].append(timed(lambda: run(configs[name]), device))
            results[name].update(calls=network.calls, guided_calls=network.guided_calls,
                                 network_images_per_image=network.images / preset.batch)
    per_image = sum(forward_flops(model.config).values())
    for row in results.values():
        row.update(summary(row["samples"]))
        row["samples_ms"] = [round(s * 1e3, 2) for s in row.pop("samples")]
        if row.get("median_ms"):
            row["images_per_s"] = preset.batch / (row["median_ms"] / 1e3)
            row["achieved_tflops"] = (per_image * row["network_images_per_image"] * preset.batch
                                      / (row["median_ms"] / 1e3) / 1e12)
    result = {"benchmark": "sampling", "environment": env,
              "settings": {"preset": args.preset, **dataclasses.asdict(preset), "cfg_scale": CFG_SCALE,
                           "guidance_interval": [0.0, GUIDANCE_HIGH], "command": " ".join(sys.argv)},
              "rows": results, "wall_s": round(time.monotonic() - started, 1)}
    slug = env["device"].split("(")[0].strip().replace(" ", "-").replace("/", "-")[:40]
    path = write_json(result, args.out, f"sampling_{args.preset}_{slug}.json")
    print(f"\nsampling {args.preset}: {preset.model}, batch {preset.batch}, {env['device']}, "
          f"load {env['load_average_start'][0]:.2f}")
    print_table([[name, f"{r.get('median_ms', 0) / 1e3:.2f}" if r.get("median_ms") else "-",
                  f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-", r.get("calls", "-"),
                  r.get("guided_calls", "-"), f"{r.get('network_images_per_image', 0):.0f}", r["status"]]
                 for name, r in results.items()],
                ["row", "s/batch", "img/s", "calls", "guided", "net evals/img", "status"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
