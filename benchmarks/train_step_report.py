"""Ratios, targets and the printed table of a train_step result (kept apart from the timing code)."""
from __future__ import annotations

from selfalign.models.flops import head_flops, sra_floor_ratio, training_step_flops

FLOOR_TARGET = 0.05          # SRA step within 5 % of vanilla + teacher-only forward
RELEASED_TARGET = 1.5        # selfalign SRA >= 1.5x the released recipe's images/s (GPU, XL/2)
MFU_TARGET = 0.55            # SiT-XL/2 bf16 on an H100
# rows that run exactly the selfalign SRA step, only faster or slower (same math, same loss)
SAME_SRA_ROWS = ("sra", "sra_compile", "sra_compile_student", "sra_sdpa_flash", "sra_sdpa_efficient",
                 "sra_sdpa_cudnn", "sra_sdpa_math", "sra_adam_fused", "sra_adam_foreach")


def _ms(rows, name):
    row = rows.get(name) or {}
    return row.get("median_ms") if row.get("status") == "ok" else None


def _rate(rows, name):
    """Images/s of an ok row: what compares rows with different images per step (accumulation)."""
    row = rows.get(name) or {}
    return row.get("images_per_s") if row.get("status") == "ok" else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def analyse(result: dict, config, teacher_layer: int) -> dict:
    rows, settings, rate = result["rows"], result["settings"], result["matmul_rate"]
    vanilla, sra, released, teacher = (_ms(rows, n) for n in ("vanilla", "sra", "sra_released", "teacher_only"))
    floor = vanilla + teacher if vanilla and teacher else None
    flops = training_step_flops(config, teacher_layer=teacher_layer)
    vanilla_flops = flops["student"]
    out = {
        "sra_over_vanilla": _ratio(sra, vanilla),
        "teacher_only_over_vanilla": _ratio(teacher, vanilla),
        "floor_over_vanilla": _ratio(floor, vanilla),
        "sra_over_floor_minus_1": _ratio(sra, floor) - 1 if sra and floor else None,
        "released_over_vanilla": _ratio(released, vanilla),
        "released_over_selfalign": _ratio(released, sra),
        "released_over_compiled": _ratio(released, _ms(rows, "sra_compile")),
        "analytic_floor_over_vanilla": sra_floor_ratio(config, teacher_layer),
        "analytic_sra_flops_over_vanilla": flops["total"] / vanilla_flops,
        "head_share_of_vanilla_flops": 3 * head_flops(config) / vanilla_flops,
        "teacher_share_of_sra_flops": flops["teacher"] / flops["total"],
    }
    # The floor leaves out the projection head (forward + backward on the student's block-m
    # tokens). Its time, estimated at the vanilla step's FLOP rate, is the part of the gap
    # that only a cheaper head could remove.
    if sra and floor:
        head_ms = vanilla * out["head_share_of_vanilla_flops"]
        out["head_estimate_ms"] = head_ms
        out["sra_over_floor_plus_head_minus_1"] = sra / (floor + head_ms) - 1
    toggles = {}
    for name, row in rows.items():
        base = row["variant"].get("base")
        if base and _rate(rows, name) and _rate(rows, base):
            toggles[name] = {"base": base, "speedup_vs_base": _rate(rows, name) / _rate(rows, base)}
    out["toggles"] = toggles
    # the fp8 teacher (a cheaper teacher, not the same math: its quality is the convergence benchmark's)
    out["fp8_teacher_speedup"] = {name: toggles[name]["speedup_vs_base"] for name in
                                  ("sra_teacher_fp8", "teacher_only_fp8", "sra_compile_fp8", "teacher_only_compile_fp8")
                                  if name in toggles}
    peak = rate["tflops_best"]     # the best of the timed matmuls: least disturbed by neighbours
    spec = result["environment"].get("spec_bf16_tflops")
    out["mfu"] = {name: {"vs_measured_matmul": row["achieved_tflops"] / peak,
                         "vs_spec_sheet": row["achieved_tflops"] / spec if spec else None}
                  for name, row in rows.items() if row.get("achieved_tflops")}
    best_name = min((n for n in SAME_SRA_ROWS if _ms(rows, n)), key=lambda n: _ms(rows, n), default=None)
    out["fastest_selfalign_sra_row"] = best_name
    out["released_over_fastest_selfalign"] = _ratio(released, _ms(rows, best_name)) if best_name else None
    out["targets"] = targets(out, settings, result["environment"])
    out["lines"] = summary_lines(out)
    return out


def targets(a: dict, settings: dict, env: dict) -> list[dict]:
    gap = a["sra_over_floor_minus_1"]
    found = [{
        "target": f"SRA step / vanilla within {FLOOR_TARGET:.0%} of the floor (vanilla + teacher-only)",
        "value": gap, "met": gap is not None and gap <= FLOOR_TARGET,
        "miss_by": max(0.0, gap - FLOOR_TARGET) if gap is not None else None,
        "bound": ("the floor leaves out the projection head: analytic "
                  f"{a['head_share_of_vanilla_flops']:.1%} of a vanilla step's FLOPs; gap with the head "
                  f"counted in: {a.get('sra_over_floor_plus_head_minus_1', float('nan')):+.1%}"),
    }]
    xl_gpu = settings["preset"] == "gpu-xl2"
    # selfalign's GPU presets set train.compile (student and teacher compiled: the sra_compile
    # row); the eager row is the same step without it
    shipped = "sra_compile" if a["released_over_compiled"] is not None else "sra"
    speedup = a["released_over_compiled"] if shipped == "sra_compile" else a["released_over_selfalign"]
    found.append({
        "target": f"selfalign SRA >= {RELEASED_TARGET}x the released recipe's images/s on GPU at SiT-XL/2",
        "applies": xl_gpu, "value": speedup, "row": shipped, "value_eager": a["released_over_selfalign"],
        "value_fastest_row": a["released_over_fastest_selfalign"],
        "met": bool(xl_gpu and speedup is not None and speedup >= RELEASED_TARGET),
        "miss_by": max(0.0, RELEASED_TARGET - speedup) if speedup is not None else None,
        "bound": ("the released step is vanilla + a full teacher forward (all blocks, fp32/TF32); "
                  "eager selfalign cannot be cheaper than its floor, so without compilation the speedup "
                  "is at most released / floor" + (f" = {a['released_over_vanilla'] / a['floor_over_vanilla']:.2f}x here"
                                                   if a["released_over_vanilla"] and a["floor_over_vanilla"] else "")),
    })
    # The H200 is the H100's chip (same SMs, clocks and bf16 tensor-core rate) with more, faster
    # memory; MFU is taken against the matmul rate measured on the card itself, so both count.
    hopper = any(name in env.get("device", "") for name in ("H100", "H200"))
    mfu = {k: v["vs_measured_matmul"] for k, v in a["mfu"].items()
           if k in ("vanilla", "sra", "vanilla_compile", "sra_compile", "vanilla_compile_accum2",
                    "vanilla_compile_max_autotune")}
    best = max(mfu.values()) if mfu else None
    found.append({
        "target": f"SiT-XL/2 bf16 training on an H100 (or H200): model FLOPs utilisation >= {MFU_TARGET:.0%}",
        "applies": xl_gpu and hopper, "device": env.get("device"), "value": best, "by_row": mfu,
        "met": bool(xl_gpu and hopper and best is not None and best >= MFU_TARGET),
        "miss_by": max(0.0, MFU_TARGET - best) if best is not None else None,
        "bound": "MFU counts only matmul FLOPs; norms, adaLN modulation, GELU and the optimizer are "
                 "memory-bound time with no model FLOPs (compare the *_compile rows, which fuse them)",
    })
    return found


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def summary_lines(a: dict) -> list[str]:
    lines = [
        f"SRA/vanilla {_fmt(a['sra_over_vanilla'])}x; floor/vanilla {_fmt(a['floor_over_vanilla'])}x "
        f"(analytic {a['analytic_floor_over_vanilla']:.3f}); SRA/floor - 1 = {_fmt(a['sra_over_floor_minus_1'], '+.1%')} "
        f"(head estimate counted in: {_fmt(a.get('sra_over_floor_plus_head_minus_1'), '+.1%')})",
        f"released/vanilla {_fmt(a['released_over_vanilla'])}x; released/selfalign {_fmt(a['released_over_selfalign'])}x "
        f"(fastest selfalign row {a['fastest_selfalign_sra_row']}: {_fmt(a['released_over_fastest_selfalign'])}x)",
    ]
    if a.get("fp8_teacher_speedup"):
        lines.append("fp8 teacher, speed-up over the same row with the autocast teacher: " + ", ".join(
            f"{name} {value:.2f}x" for name, value in a["fp8_teacher_speedup"].items()))
    for t in a["targets"]:
        if t.get("applies", True):
            state = "met" if t["met"] else f"MISSED by {_fmt(t['miss_by'], '.3f')}"
            lines.append(f"target: {t['target']}: {_fmt(t['value'], '.3f')} -> {state}")
    return lines


def table_rows(result: dict) -> tuple[list[str], list[list]]:
    rows, analysis = result["rows"], result["analysis"]
    header = ["row", "ms/step", "p25-p75", "img/s", "x vanilla", "vs base", "peak GiB", "MFU", "status"]
    table = []
    for name, row in rows.items():
        ms = _ms(rows, name)
        toggle = analysis["toggles"].get(name)
        mfu = analysis["mfu"].get(name, {}).get("vs_measured_matmul")
        table.append([
            name, _fmt(ms, ".1f"),
            f"{row['p25_ms']:.1f}-{row['p75_ms']:.1f}" if ms else "-",
            _fmt(row.get("images_per_s"), ".1f"), _fmt(_ratio(_rate(rows, "vanilla"), _rate(rows, name)), ".3f"),
            f"{toggle['speedup_vs_base']:.2f}x" if toggle else "-",
            _fmt(row.get("peak_gib"), ".1f"), _fmt(mfu, ".1%"), row["status"][:60],
        ])
    return header, table
