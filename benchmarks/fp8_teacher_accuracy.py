"""How far the fp8 teacher's targets are from the exact ones, on a trained model.

SRA's target is the EMA teacher's raw block-n tokens at the earlier time t' = t - k. This script
loads a trained run's EMA (``selfalign train`` output), builds those inputs from real test images
exactly as SRA does (same interpolation, ``k ~ U[0, k_max)``), and compares the block-n tokens of
the fp8 view (``selfalign.models.fp8``, under bf16 autocast) and of the plain bf16-autocast teacher
with an fp32 forward: relative error and per-token cosine, overall and per t' range. The bf16 row
is the scale: SRA already trains with that teacher. Speed is measured by ``train_step.py``.

    PYTHONPATH=src python benchmarks/fp8_teacher_accuracy.py runs/convergence-cpu-long/sra-s0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402
from report import print_table  # noqa: E402

from selfalign.data import build_dataset  # noqa: E402
from selfalign.devices import pick_device  # noqa: E402
from selfalign.models.fp8 import float8_view, fp8_unavailable_reason  # noqa: E402
from selfalign.regularizers.sra import SRAConfig  # noqa: E402
from selfalign.runs import load_for_inference  # noqa: E402

T_RANGES = ((0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0))


def block_tokens(model, x, t, y, layer: int, autocast: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        _, feats = model(x, t, y, taps=[layer], features_only=True)
    return feats[layer].float()


def compare(test: torch.Tensor, exact: torch.Tensor, mask: torch.Tensor) -> dict:
    a, b = test[mask].flatten(0, 1), exact[mask].flatten(0, 1)       # (tokens, D)
    if not len(a):
        return {"n": 0}
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"n": int(mask.sum()), "relative_error": ((a - b).norm() / b.norm()).item(),
            "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run or checkpoint directory of a model trained with SRA")
    p.add_argument("--images", type=int, default=512, help="test images (each at its own t')")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file or folder (default benchmarks/results/)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    missing = fp8_unavailable_reason(device)
    if missing:
        raise SystemExit(f"fp8 teacher not available here: {missing}")
    model, objective, config = load_for_inference(args.run, device=device)
    sra = config.regularizers.get("sra")
    if not isinstance(sra, SRAConfig):
        raise SystemExit(f"{args.run} was not trained with SRA (regularizers: {sorted(config.regularizers)})")
    data = build_dataset(config.data, "test")
    g = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(data), generator=g)[:args.images].tolist()
    x0, y = (v.to(device) for v in data.__getitems__(index))
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.rand(len(index), generator=g).to(device)
    t_teacher = objective.earlier_time(t, sra.k_max, torch.Generator(device).manual_seed(args.seed))
    x_teacher, t_model = objective.interpolate(x0, noise, t_teacher), objective.model_time(t_teacher)

    layer, rows = sra.teacher_layer, {}
    exact = block_tokens(model, x_teacher, t_model, y, layer, autocast=False)
    view = float8_view(model)
    candidates = {"bf16_autocast": (model, True), "fp8_bf16_autocast": (view, True), "fp8_fp32_rest": (view, False)}
    for name, (net, autocast) in candidates.items():
        tokens = block_tokens(net, x_teacher, t_model, y, layer, autocast)
        rows[name] = {"all": compare(tokens, exact, torch.ones_like(t_teacher, dtype=torch.bool))}
        for lo, hi in T_RANGES:
            rows[name][f"t' in [{lo:.2f}, {hi:.2f})"] = compare(tokens, exact, (t_teacher >= lo) & (t_teacher < hi))
    result = {"benchmark": "fp8_teacher_accuracy", "environment": environment(device), "run": str(args.run),
              "model": config.model.preset, "teacher_layer": layer, "k_max": sra.k_max, "images": len(index),
              "reference": "fp32 forward of the same EMA", "rows": rows, "command": " ".join(sys.argv)}
    path = write_json(result, args.out, f"fp8_teacher_accuracy_{config.model.preset.replace('/', '')}.json")
    table = [[name, part, r["n"], f"{r['relative_error']:.4f}", f"{r['cosine_mean']:.5f}", f"{r['cosine_min']:.4f}"]
             for name, parts in rows.items() for part, r in parts.items() if r["n"]]
    print(f"{config.model.preset}, block {layer} tokens vs the fp32 teacher, {len(index)} test images, {device}")
    print_table(table, ["teacher", "t'", "images", "rel. error", "cos mean", "cos min"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
