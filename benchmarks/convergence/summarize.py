"""Tables, JSON and a plot from the convergence runs' ``metrics.jsonl`` (eval records of the trainer).

    python benchmarks/convergence/summarize.py runs/convergence-cpu benchmarks/convergence/results
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))   # a bare checkout works too
from selfalign.training.metrics import read_metrics  # noqa: E402

METRICS = ("fd", "accuracy", "precision", "recall")
MAIN_ARMS = ("vanilla", "sra", "repa")
# ablation arm -> (its reference arm, the SRA paper's ordering with its SiT-B/2 FIDs at 400K iterations)
ABLATION_REFERENCES = {
    "sra_layers": ("sra", "3->8 better than 3->3 (29.10 vs 37.08)"),
    "sra_no_head": ("sra", "head better than no head (29.10 vs 34.23)"),
    "sra_interval_0": ("sra", "U[0,0.2) better than fixed 0 (29.10 vs 31.07)"),
    "sra_teacher_fraction_0.5": ("sra", "not in the paper: selfalign's below-the-floor option, the teacher "
                                        "on half the batch (1.11x faster on SiT-XL/2, 1.16x on cpu-tiny)"),
    "sra_teacher_fp8": ("sra", "not in the paper: selfalign's fp8 teacher (e4m3 block linears); "
                               "should change nothing"),
    "sra_ema_0": ("vanilla_ema_0", "EMA 0.9999 better than EMA 0 (29.10 vs 35.71); here EMA 0 also "
                                   "changes the evaluated model, so its reference is vanilla with EMA 0"),
}


def read_run(run_dir: Path) -> dict:
    evals, speeds = {}, []
    for record in read_metrics(run_dir):          # a line cut by a kill is skipped there
        if record.get("kind") == "eval":
            evals[round(record["kimg"], 3)] = {k: record[k] for k in METRICS if k in record}
        elif record.get("kind") == "train" and record.get("img_per_s"):
            speeds.append(record["img_per_s"])
    fid, heldout = run_dir / "fid.json", run_dir / "heldout.json"
    return {"evals": evals, "img_per_s_median": statistics.median(speeds) if speeds else None,
            "fid": json.loads(fid.read_text()).get("fid") if fid.is_file() else None,
            "heldout": json.loads(heldout.read_text())["mean"] if heldout.is_file() else None}


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first kimg at which a (kimg, FD) curve is <= target, linearly interpolated."""
    previous = None
    for kimg, fd in curve:
        if fd <= target:
            if previous is None or previous[1] == fd:
                return kimg
            k0, f0 = previous
            return k0 + (kimg - k0) * (f0 - target) / (f0 - fd)
        previous = (kimg, fd)
    return None


def paired_final(runs: dict, arm: str, reference: str, key: str) -> dict:
    """``arm - reference`` of a final per-run number, over the seeds both have (seeds pair up)."""
    return mean_std([runs[arm][s][key] - runs[reference][s][key] for s in runs[arm]
                     if s in runs[reference] and runs[arm][s][key] is not None
                     and runs[reference][s][key] is not None])


def summarize(work: Path, results: Path, manifest: dict | None = None) -> dict:
    manifest = manifest or json.loads((work / "manifest.json").read_text())
    runs = defaultdict(dict)      # arm -> seed -> run data
    for record in manifest["runs"]:
        runs[record["arm"]][record["seed"]] = {**read_run(Path(record["run_dir"])),
                                               "returncode": record["returncode"]}
    arms = {}
    for arm, seeds in runs.items():
        kimgs = sorted({k for r in seeds.values() for k in r["evals"]})
        curve = {}
        for k in kimgs:
            curve[k] = {m: mean_std([r["evals"].get(k, {}).get(m) for r in seeds.values()]) for m in METRICS}
        arms[arm] = {"seeds": sorted(seeds), "curve": curve,
                     "img_per_s": mean_std([r["img_per_s_median"] for r in seeds.values()]),
                     "inception_fid_final": mean_std([r["fid"] for r in seeds.values()]),
                     "heldout_final": mean_std([r["heldout"] for r in seeds.values()]),
                     "failed_seeds": [s for s, r in seeds.items() if r["returncode"] != 0]}
    claim = {}
    if "vanilla" in arms and arms["vanilla"]["curve"]:
        last = max(arms["vanilla"]["curve"])
        target = arms["vanilla"]["curve"][last]["fd"].get("mean")
        fds = [v["fd"]["mean"] for _, v in sorted(arms["vanilla"]["curve"].items()) if v["fd"].get("n")]
        # "reaches vanilla's final FD sooner" only means something where vanilla's FD falls to its end
        testable = bool(fds) and fds[-1] == min(fds)
        claim = {"vanilla_final_kimg": last, "vanilla_final_fd": target, "testable": testable,
                 "vanilla_fd_curve": fds, "arms": {}}
        for arm, data in arms.items():
            curve = [(k, v["fd"]["mean"]) for k, v in sorted(data["curve"].items()) if v["fd"].get("n")]
            reach = first_reach(curve, target) if target is not None else None
            paired = {}
            for k in data["curve"]:
                diffs = [runs[arm][s]["evals"].get(k, {}).get("fd") - runs["vanilla"][s]["evals"][k]["fd"]
                         for s in runs[arm] if s in runs["vanilla"] and k in runs["vanilla"][s]["evals"]
                         and runs[arm][s]["evals"].get(k, {}).get("fd") is not None]
                paired[k] = mean_std(diffs)
            claim["arms"][arm] = {"kimg_to_reach_vanilla_final_fd": reach,
                                  "images_saved_factor": last / reach if reach else None,
                                  "fd_minus_vanilla_same_seed": paired,
                                  "heldout_minus_vanilla_same_seed": paired_final(runs, arm, "vanilla", "heldout")}
    ablation = {}
    for arm in runs:
        reference, paper = ABLATION_REFERENCES.get(arm.split("_layers_")[0] + "_layers" if "_layers_" in arm
                                                   else arm, (None, None))
        if reference is None or reference not in runs:
            continue
        final = lambda name, seed: (runs[name][seed]["evals"][max(runs[name][seed]["evals"])]["fd"]
                                    if runs[name].get(seed, {}).get("evals") else None)
        seeds = [s for s in runs[arm] if final(arm, s) is not None and final(reference, s) is not None]
        ablation[arm] = {"reference": reference, "paper": paper, "seeds": seeds,
                         "fd": mean_std([final(arm, s) for s in seeds]),
                         "reference_fd": mean_std([final(reference, s) for s in seeds]),
                         "difference": mean_std([final(arm, s) - final(reference, s) for s in seeds]),
                         "heldout_difference": paired_final(runs, arm, reference, "heldout")}
    summary = {"budget": manifest.get("budget"), "command": manifest.get("command"),
               "started": manifest.get("started"), "seconds": manifest.get("seconds"),
               # a resumed benchmark skips finished runs: their own records hold their time
               "run_seconds_total": round(sum(r.get("seconds", 0) for r in manifest["runs"]), 1),
               "load_average": [manifest.get("load_average_start"), manifest.get("load_average_end")],
               "threads": manifest.get("threads"), "classifier_sha256": manifest.get("classifier_sha256"),
               "warning": manifest.get("warning"),
               "runs": [{k: r[k] for k in ("arm", "seed", "preset", "overrides", "returncode", "seconds")}
                        for r in manifest["runs"]],
               "arms": arms, "claim": claim, "ablation": ablation}
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / "table.md").write_text(markdown(summary))
    plot(summary, results / "fd_vs_kimg.png")
    print((results / "table.md").read_text())
    return summary


def _ms(stat: dict, spec: str = ".2f") -> str:
    if not stat.get("n"):
        return "-"
    return f"{stat['mean']:{spec}} ± {stat['std']:{spec.lstrip('+')}}" + (f" (n={stat['n']})" if stat["n"] < 3 else "")


def markdown(s: dict) -> str:
    arms = s["arms"]
    kimgs = sorted({k for a in arms.values() for k in a["curve"]})
    lines = [f"# Convergence on Fashion-MNIST ({s['budget']} budget)", "",
             f"Command: `{s['command']}`  ", f"Started {s['started']}, {s['seconds']} s (training runs: "
             f"{s['run_seconds_total']} s in all), load average "
             f"start/end {s['load_average'][0]} / {s['load_average'][1]}; {s['threads']} thread(s) per run; "
             f"FD judge: the committed classifier, sha256 {s['classifier_sha256']}.", "",
             *([f"**{s['warning']}**", ""] if s.get("warning") else []),
             "In-domain FD (classifier features, lower is better), mean ± std over seeds, at each kimg:", "",
             "| arm | " + " | ".join(f"{k:g} kimg" for k in kimgs) + " | img/s |",
             "|---|" + "---|" * (len(kimgs) + 1)]
    for arm, data in arms.items():
        cells = [_ms(data["curve"][k]["fd"]) if k in data["curve"] else "-" for k in kimgs]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {_ms(data['img_per_s'], '.0f')} |")
    last = kimgs[-1] if kimgs else None
    if last is not None:
        lines += ["", f"At {last:g} kimg: accuracy / precision / recall", "",
                  "| arm | accuracy | precision | recall | Inception FID |", "|---|---|---|---|---|"]
        for arm, data in arms.items():
            point = data["curve"].get(last, {})
            lines.append(f"| {arm} | " + " | ".join(_ms(point.get(m, {}), ".3f") for m in METRICS[1:])
                         + f" | {_ms(data['inception_fid_final'])} |")
    if any(a["heldout_final"].get("n") for a in arms.values()):
        lines += ["", "Held-out denoising loss of the final EMA (500 Fashion-MNIST test images, t = 0.1, 0.3, "
                      "0.5, 0.7, 0.9, the same noise for every run; lower is better). Paired by seed:", "",
                  "| arm | held-out loss | − vanilla, same seed |", "|---|---|---|"]
        for arm, data in arms.items():
            diff = s["claim"].get("arms", {}).get(arm, {}).get("heldout_minus_vanilla_same_seed", {})
            lines.append(f"| {arm} | {_ms(data['heldout_final'], '.4f')} | {_ms(diff, '+.4f')} |")
    claim = s["claim"]
    if claim:
        lines += ["", f"Claim: an arm reaches vanilla's final FD ({claim['vanilla_final_fd']:.2f} at "
                      f"{claim['vanilla_final_kimg']:g} kimg) in fewer images.", "",
                  *([] if claim.get("testable", True) else [
                      "**Not testable at this budget:** vanilla's mean FD does not fall to its last checkpoint "
                      f"({', '.join(f'{x:.1f}' for x in claim['vanilla_fd_curve'])}), so every arm 'reaches' "
                      "it at the first checkpoint; read the same-seed differences and the held-out loss instead.",
                      ""]),
                  "| arm | kimg to reach it (mean curve) | FD − vanilla, same seed, final |", "|---|---|---|"]
        for arm, c in claim["arms"].items():
            reach = c["kimg_to_reach_vanilla_final_fd"]
            paired = c["fd_minus_vanilla_same_seed"].get(claim["vanilla_final_kimg"], {})
            lines.append(f"| {arm} | {'not reached' if reach is None else f'{reach:.2f}'} | {_ms(paired)} |")
    if s.get("ablation"):
        lines += ["", "Ablation, final FD, each against its reference on the same seeds "
                      "(the paper's expectation in the last column):", "",
                  "| arm | FD | reference | reference FD | difference | held-out loss difference | paper |",
                  "|---|---|---|---|---|---|---|"]
        for arm, a in s["ablation"].items():
            lines.append(f"| {arm} | {_ms(a['fd'])} | {a['reference']} | {_ms(a['reference_fd'])} | "
                         f"{_ms(a['difference'])} | {_ms(a['heldout_difference'], '+.4f')} | {a['paper']} |")
    failed = [f"{r['arm']} seed {r['seed']}" for r in s["runs"] if r["returncode"] != 0]
    if failed:
        lines += ["", "Failed runs: " + ", ".join(failed)]
    return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [([a for a in s["arms"] if a in MAIN_ARMS], "main arms")]
    if any(a not in MAIN_ARMS for a in s["arms"]):
        panels.append(([a for a in s["arms"] if a not in MAIN_ARMS or a in ("vanilla", "sra")], "SRA ablation"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (names, title) in zip(axes, panels):
        for arm in names:
            points = [(k, v["fd"]) for k, v in sorted(s["arms"][arm]["curve"].items()) if v["fd"].get("n")]
            if not points:
                continue
            k = [p[0] for p in points]
            mean = [p[1]["mean"] for p in points]
            std = [p[1]["std"] for p in points]
            n = points[-1][1]["n"]
            ax.plot(k, mean, marker="o", label=f"{arm} (n={n})")
            ax.fill_between(k, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("training images (kimg)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("in-domain FD (lower is better)")
    fig.suptitle(f"Fashion-MNIST convergence ({s['budget']} budget), mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: summarize.py WORK_DIR RESULTS_DIR")
    summarize(Path(sys.argv[1]), Path(sys.argv[2]))
