"""Print the short table of a folder of benchmark JSON files (the last thing gpu/run.sh shows), and
the plain-text tables every benchmark prints. Imports no torch: reading results stays instant.

    python benchmarks/report.py benchmarks/results/            # or any files / folders
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def print_table(rows: list[list], header: list[str]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def train_step_lines(data: dict) -> None:
    s, a, rows = data["settings"], data["analysis"], data["rows"]
    env = data["environment"]
    print(f"\n== train step {s['preset']}: {s['model']} batch {s['batch']} ({s['tokens']} tokens, "
          f"{s['precision']}) on {env['device']}, torch {env['torch']}, load {env['load_average_start'][0]:.2f}; "
          f"matmul {data['matmul_rate']['tflops_best']:.3g} TFLOP/s (best) ({data['matmul_rate']['dtype']})")
    table = []
    for name, row in rows.items():
        mfu = a["mfu"].get(name, {}).get("vs_measured_matmul")
        toggle = a["toggles"].get(name)
        table.append([name, _f(row.get("median_ms"), ".1f"), _f(row.get("images_per_s"), ".1f"),
                      f"{toggle['speedup_vs_base']:.2f}x vs {toggle['base']}" if toggle else "",
                      _f(row.get("peak_gib"), ".1f"), _f(mfu, ".1%"), row["status"][:50]])
    print_table(table, ["row", "ms/step", "img/s", "speedup", "peak GiB", "MFU", "status"])
    for line in a["lines"]:
        print("  " + line)


def sampling_lines(data: dict) -> None:
    s, env = data["settings"], data["environment"]
    print(f"\n== sampling {s['preset']}: {s['model']} batch {s['batch']} on {env['device']}")
    print_table([[name, _f(r.get("images_per_s"), ".2f"), r.get("calls", "-"), r.get("guided_calls", "-"),
                  r["status"]] for name, r in data["rows"].items()],
                ["row", "img/s", "calls", "guided", "status"])


def trainer_check_lines(data: dict) -> None:
    failed = [name for name, ok in data["checks"].items() if not ok]
    print(f"\n== trainer check ({data['preset']} on {data['device']}): "
          + ("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
          + f"; trainer {_f(data.get('train_img_per_s_median'), '.0f')} img/s; seconds {data['seconds']}")
    phases = data.get("img_per_s_median_by_phase")
    if phases:
        print("  img/s by phase (median window): " + ", ".join(f"{k} {_f(v, '.0f')}" for k, v in phases.items()))
    accuracy = data.get("fp8_teacher_accuracy") or {}
    if "fp8_bf16_autocast" in accuracy:
        fp8, bf16 = accuracy["fp8_bf16_autocast"]["all"], accuracy["bf16_autocast"]["all"]
        print(f"  fp8 teacher targets vs fp32 on the trained model: relative error {fp8['relative_error']:.4f} "
              f"(bf16 {bf16['relative_error']:.4f}), token cosine {fp8['cosine_mean']:.5f}")
    elif accuracy:
        print(f"  fp8 teacher accuracy: {accuracy.get('status')}")
    for record in data.get("eval_records", [])[-1:]:
        print("  last evaluation: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in record.items() if k != "kind"))


def other_lines(path: Path, data: dict) -> None:
    flat = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None}
    print(f"\n== {path.name}: " + ", ".join(f"{k}={v}" for k, v in list(flat.items())[:12]))


def main(argv=None) -> int:
    paths = []
    for arg in (argv if argv is not None else sys.argv[1:]) or ["benchmarks/results"]:
        p = Path(arg)
        paths += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not paths:
        print("no benchmark JSON found")
        return 1
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"\n== {path}: unreadable ({err})")
            continue
        kind = data.get("benchmark")
        if kind == "train_step":
            train_step_lines(data)
        elif kind == "sampling":
            sampling_lines(data)
        elif kind == "trainer_check":
            trainer_check_lines(data)
        else:
            other_lines(path, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
