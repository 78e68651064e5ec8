"""A comparison report of training runs: ``report.md`` with a table, curves, metric-vs-kimg plots,
sample grids side by side, and what the numbers show.

Written by ``selfalign report RUN [RUN ...]`` and by ``selfalign demo``; each run is a
:class:`RunSummary` (gathered by :mod:`selfalign.commands.report`). The closing paragraph is
computed from the numbers: a difference in denoising loss counts only when it exceeds twice its
paired standard error (every run is scored on the same images, labels, noise and times); metrics
without an error estimate (one seed) are reported as they are, with that caveat.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .figures import pyplot, save_figure
from .heldout import DEFAULT_TIMES, paired_difference

# metric key in the eval records of metrics.jsonl: (label, higher is better)
EVAL_METRICS = {"fid": ("FID (Inception, against the training images)", False),
                "fd": ("Frechet distance (classifier features)", False),
                "accuracy": ("class accuracy", True), "precision": ("precision", True),
                "recall": ("recall", True)}


@dataclass
class RunSummary:
    """What the report shows of one run."""

    label: str
    run_dir: Path
    description: str                     # model, regularizers, steps and kimg, data
    data_key: tuple                      # runs with equal keys were scored on the same images
    train: list[dict]                    # the run's "train" records
    eval: list[dict]                     # its "eval" records
    loss_curve: list[dict]               # {"kimg", "loss"} of every kept checkpoint's EMA
    losses: torch.Tensor                 # (times, images) per-example losses of the final EMA
    grid: Path
    train_seconds: float | None = None
    extra: dict[str, float] = field(default_factory=dict)     # more columns, e.g. a final FID


def _fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _last(records, key):
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return float(values[-1]) if values else None


def step_seconds(train_records: list[dict]) -> float | None:
    """Seconds spent in training steps, from each log window's images and rate."""
    total, previous = 0.0, None
    for record in train_records:
        rate, images = record.get("img_per_s"), record.get("images")
        if isinstance(rate, (int, float)) and rate > 0 and images is not None and previous is not None:
            total += (images - previous) / rate
        previous = images
    return total or None


def _plot_curves(path: Path, runs: list[RunSummary], series, titles) -> Path:
    fig, axes = pyplot().subplots(1, len(series), figsize=(4.2 * len(series), 3.3), squeeze=False)
    for ax, (source, key) in zip(axes[0], series):
        for run in runs:
            points = [(r["kimg"], r[key]) for r in getattr(run, source)
                      if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 12 else None, label=run.label)
        ax.set_xlabel("kimg")
        ax.set_title(titles.get(key, key), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def _side_by_side(path: Path, runs: list[RunSummary]) -> Path:
    grids = [Image.open(run.grid).convert("RGB") for run in runs]
    gap, title = 12, 18
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (max(width, 200), max(g.height for g in grids) + title), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for grid, run in zip(grids, runs):
        canvas.paste(grid, (x, title))
        draw.text((x + 2, 2), run.label, fill="black")
        x += grid.width + gap
    canvas.save(path)
    return path


def conclusion(runs: list[RunSummary], loss_label: str) -> str:
    """One honest paragraph from the numbers (the first run is the baseline)."""
    base, parts, significant = runs[0], [], []
    for other in runs[1:]:
        if other.data_key == base.data_key and other.losses.shape == base.losses.shape:
            diff, se = paired_difference(base.losses, other.losses)
            rel = diff / float(base.losses.mean()) * 100
            significant.append(abs(diff) > 2 * se)
            parts.append(f"{other.label} has a {'lower' if diff < 0 else 'higher'} {loss_label} than "
                         f"{base.label} by {abs(rel):.3g} % (difference {diff:+.3g}, paired standard error "
                         f"over the images {se:.3g}: {'more than' if significant[-1] else 'within'} two "
                         f"standard errors)")
        else:
            parts.append(f"{other.label} was trained on other data than {base.label}, so their losses are "
                         f"not compared")
        for key, (label, higher_better) in EVAL_METRICS.items():
            a, b = _last(base.eval, key), _last(other.eval, key)
            if a is None or b is None:
                continue
            better = (b > a) if higher_better else (b < a)
            parts.append(f"its final {label} is {_fmt(b)} against {_fmt(a)} "
                         f"({'better' if better else 'worse' if a != b else 'equal'})")
        for name in other.extra.keys() & base.extra.keys():
            parts.append(f"{name} {_fmt(other.extra[name])} against {_fmt(base.extra[name])}")
    if not parts:
        return f"One run: {base.label}; its numbers are in the table."
    verdict = ("the loss difference is larger than the noise over the scored images, but that error bar "
               "does not include the spread between training seeds" if any(significant) else
               "the loss difference is within noise" if significant else
               "no loss difference can be judged")
    return ("; ".join(parts) + ". The sample metrics come from one seed without an error estimate. "
            "Overall " + verdict + ".")


def write_report(out: Path, runs: list[RunSummary], *, title: str, intro: list[str], loss_label: str,
                 grid_caption: str, footer: list[str] = ()) -> Path:
    """``out/report.md`` with ``loss_curves.png``, ``metrics_vs_kimg.png`` and
    ``samples_side_by_side.png``; ``loss_label`` names the scored denoising loss."""
    out.mkdir(parents=True, exist_ok=True)
    titles = {"loss/gen": "training generative loss", "loss/sra": "SRA alignment loss", "loss": loss_label,
              **{k: v[0] for k, v in EVAL_METRICS.items()}}
    loss_series = [("train", "loss/gen")]
    if any(_last(r.train, "loss/sra") is not None for r in runs):
        loss_series.append(("train", "loss/sra"))
    loss_png = _plot_curves(out / "loss_curves.png", runs, loss_series, titles)
    shown = [k for k in EVAL_METRICS if any(_last(r.eval, k) is not None for r in runs)]
    metrics_png = _plot_curves(out / "metrics_vs_kimg.png", runs,
                               [("loss_curve", "loss")] + [("eval", k) for k in shown], titles)
    grids_png = _side_by_side(out / "samples_side_by_side.png", runs)
    extras = list(dict.fromkeys(name for r in runs for name in r.extra))

    header = (["run", "train gen loss", loss_label] + [EVAL_METRICS[k][0] for k in shown] + extras
              + ["img/s", "train time"])
    lines = [f"# {title}", "", *intro, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in runs:
        speeds = [x["img_per_s"] for x in r.train[1:] if isinstance(x.get("img_per_s"), (int, float))]
        seconds = r.train_seconds if r.train_seconds is not None else step_seconds(r.train)
        row = [r.label, _fmt(_last(r.train, "loss/gen")), _fmt(float(r.losses.mean()))]
        row += [_fmt(_last(r.eval, k)) for k in shown] + [_fmt(r.extra.get(name)) for name in extras]
        row += [_fmt(float(np.median(speeds)) if speeds else None, 3),
                "-" if seconds is None else f"{seconds / 60:.1f} min"]
        lines.append("| " + " | ".join(row) + " |")
    if shown:
        counts = sorted({int(x["eval_samples"]) for r in runs for x in r.eval if "eval_samples" in x})
        lines += ["", "Sample metrics: the last evaluation during training"
                  + (f" ({' / '.join(map(str, counts))} samples)" if counts else "") + "; curves below."]
    else:
        lines += ["", "No sample metrics: the runs recorded no evaluations (train.eval_every_kimg=0 or "
                      "train.eval_metrics=none)."]
    lines += ["", f"{loss_label[0].upper()}{loss_label[1:]} of the final EMA, per time t (same images, "
              "labels and noise for every run):", "",
              "| run | " + " | ".join(f"t={t}" for t in DEFAULT_TIMES) + " |", "|---" * (1 + len(DEFAULT_TIMES)) + "|"]
    for r in runs:
        lines.append(f"| {r.label} | " + " | ".join(_fmt(v) for v in r.losses.mean(1).tolist()) + " |")
    lines += ["", "## What the numbers show", "", conclusion(runs, loss_label), "",
              "## Curves", "", f"![loss curves]({loss_png.name})", "", f"![metrics vs kimg]({metrics_png.name})", "",
              f"## Samples ({grid_caption})", "", f"![samples]({grids_png.name})", "",
              "Runs: " + ", ".join(f"`{r.run_dir}` ({r.description})" for r in runs)
              + ". Metrics in each run's `metrics.jsonl`.", *footer, ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
