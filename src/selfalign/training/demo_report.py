"""The demo's ``report.md``: comparison table, curves, sample grids, and what the numbers show.

The closing sentence is computed from the numbers: a difference in held-out loss counts only
when it exceeds twice its paired standard error; metrics without an error estimate (one seed)
are reported as they are, with that caveat.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..evaluation.figures import pyplot, save_figure
from .heldout import DEFAULT_TIMES, paired_difference

# metric key in the eval records: (label, higher is better)
EVAL_METRICS = {"fd": ("Frechet distance (classifier features)", False),
                "accuracy": ("class accuracy", True), "precision": ("precision", True),
                "recall": ("recall", True)}


def _fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _last(records, key):
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else None


def _plot_curves(path: Path, results, series, ylabel_map) -> Path:
    fig, axes = pyplot().subplots(1, len(series), figsize=(4.2 * len(series), 3.3), squeeze=False)
    for ax, (source, key) in zip(axes[0], series):
        for result in results:
            points = [(r["kimg"], r[key]) for r in result[source]
                      if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 12 else None, label=result["run"].label)
        ax.set_xlabel("kimg")
        ax.set_title(ylabel_map.get(key, key), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def _side_by_side(path: Path, results) -> Path:
    grids = [Image.open(r["grid"]).convert("RGB") for r in results]
    gap, title = 12, 18
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, max(g.height for g in grids) + title), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for grid, result in zip(grids, results):
        canvas.paste(grid, (x, title))
        draw.text((x + 2, 2), result["run"].label, fill="black")
        x += grid.width + gap
    canvas.save(path)
    return path


def conclusion(plan, results) -> str:
    """One honest paragraph from the numbers (first run is the baseline)."""
    base, parts = results[0], []
    for other in results[1:]:
        diff, se = paired_difference(base["heldout_losses"], other["heldout_losses"])
        rel = diff / float(base["heldout_losses"].mean()) * 100
        significant = abs(diff) > 2 * se
        parts.append(f"{other['run'].label} has a {'lower' if diff < 0 else 'higher'} held-out denoising loss "
                     f"than {base['run'].label} by {abs(rel):.3g} % (difference {diff:+.3g}, paired standard "
                     f"error over the test images {se:.3g}: {'more than' if significant else 'within'} two "
                     f"standard errors)")
        for key, (label, higher_better) in EVAL_METRICS.items():
            a, b = _last(base["eval"], key), _last(other["eval"], key)
            if a is None or b is None:
                continue
            better = (b > a) if higher_better else (b < a)
            parts.append(f"its final {label} is {_fmt(b)} against {_fmt(a)} ({'better' if better else 'worse' if a != b else 'equal'})")
        if "fid" in other and "fid" in base:
            parts.append(f"Inception FID {other['fid']:.2f} against {base['fid']:.2f}")
    any_significant = any(abs(paired_difference(base["heldout_losses"], o["heldout_losses"])[0])
                          > 2 * paired_difference(base["heldout_losses"], o["heldout_losses"])[1]
                          for o in results[1:])
    scale = (f"At this scale ({plan.model}, {plan.steps} steps of {plan.batch} images = "
             f"{plan.steps * plan.batch / 1000:g} kimg, one seed), ")
    verdict = ("the held-out loss difference is larger than the test-set noise, but that error bar does not "
               "include the spread between training seeds, and one short run of a tiny model says little "
               "about the paper's claim" if any_significant else
               "the held-out loss difference is within noise, so these numbers neither confirm nor refute "
               "the paper's claim")
    return (scale + "; ".join(parts) + ". The classifier metrics come from one seed without an error "
            "estimate. Overall " + verdict + " (faster convergence measured on ImageNet at 400K iterations, "
            "e.g. SiT-B/2 FID 33.0 -> 29.1).")


def write_report(out: Path, plan, results, wall_seconds: float, estimate: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    names = {"loss/gen": "training generative loss", "loss/sra": "SRA alignment loss",
             "heldout": "held-out denoising loss (EMA)", **{k: v[0] for k, v in EVAL_METRICS.items()}}
    loss_png = _plot_curves(out / "loss_curves.png", results,
                            [("train", "loss/gen")] + ([("train", "loss/sra")]
                                                       if any(_last(r["train"], "loss/sra") is not None for r in results) else []),
                            names)
    metric_series = [("heldout_curve", "heldout")] + [("eval", k) for k in ("fd", "accuracy")
                                                        if any(_last(r["eval"], k) is not None for r in results)]
    metrics_png = _plot_curves(out / "metrics_vs_kimg.png", results, metric_series, names)
    grids_png = _side_by_side(out / "samples_side_by_side.png", results)

    lines = [f"# selfalign demo: {' vs '.join(r['run'].label for r in results)} on Fashion-MNIST", "",
             f"Plan `{plan.name}`: {plan.model}, global batch {plan.batch}, {plan.steps} steps "
             f"({plan.steps * plan.batch / 1000:g} kimg) per run, same seed (0), data order and budget; "
             f"only the regularizers differ. Wall time {wall_seconds / 60:.1f} min "
             f"(estimated {estimate / 60:.1f} min before starting). "
             + (f"Inception FID (TF-FID weights) on {plan.fid_samples} class-balanced samples per run "
                f"against as many test images." if plan.fid_samples else
                "Inception FID is not computed in this plan: on a CPU the Inception network runs at a few "
                "images/s, too slow for the time budget, so the in-domain classifier's metrics stand in; "
                "`selfalign demo --longer` adds FID on 1000 samples per run."), "",
             "| run | train gen loss | held-out loss | " + " | ".join(v[0] for v in EVAL_METRICS.values())
             + (" | Inception FID" if any("fid" in r for r in results) else "") + " | img/s | train time |",
             "|---" * (5 + len(EVAL_METRICS) + (1 if any("fid" in r for r in results) else 0)) + "|"]
    for r in results:
        row = [r["run"].label, _fmt(_last(r["train"], "loss/gen")), _fmt(float(r["heldout_losses"].mean()))]
        row += [_fmt(_last(r["eval"], k)) for k in EVAL_METRICS]
        if any("fid" in x for x in results):
            row.append(_fmt(r.get("fid")))
        speeds = [x["img_per_s"] for x in r["train"][1:] if isinstance(x.get("img_per_s"), (int, float))]
        row += [_fmt(float(np.median(speeds)) if speeds else None, 3), f"{r['train_seconds'] / 60:.1f} min"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Held-out denoising loss of the final EMA on {plan.heldout} test images, per time t "
              "(same images, labels and noise for every run):", "",
              "| run | " + " | ".join(f"t={t}" for t in DEFAULT_TIMES) + " |", "|---" * (1 + len(DEFAULT_TIMES)) + "|"]
    for r in results:
        per_t = r["heldout_losses"].mean(1).tolist()
        lines.append(f"| {r['run'].label} | " + " | ".join(_fmt(v) for v in per_t) + " |")
    lines += ["", "## What the numbers show", "", conclusion(plan, results), "",
              "## Curves", "", f"![loss curves]({loss_png.name})", "", f"![metrics vs kimg]({metrics_png.name})", "",
              f"## Class-conditional samples (EMA, Euler {plan.grid_steps} steps, same noise; one column per class)", "",
              f"![samples]({grids_png.name})", "",
              "Runs: " + ", ".join(f"`{r['run_dir']}`" for r in results) + ". Metrics in each run's "
              "`metrics.jsonl`; reproduce with `selfalign demo" + ("" if plan.name == "default" else f" --{plan.name}") + "`.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
