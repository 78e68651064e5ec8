"""``selfalign demo --smoke``: both runs train and the report has its tables, plots and grids."""
from __future__ import annotations

from PIL import Image

from selfalign.cli import main
from selfalign.commands.demo import PLANS, RUNS, run_configs


def test_demo_runs_differ_only_in_their_regularizers():
    configs = run_configs(PLANS["default"], "cpu", progress_bar=False)
    dicts = [config.to_dict() for _, config in configs]
    for d in dicts:
        d.pop("regularizers")
        d.pop("name")
    assert all(d == dicts[0] for d in dicts)
    from selfalign.config.experiment import load_config
    assert set(configs[0][1].regularizers) == set() and "sra" in configs[1][1].regularizers
    for run, config in configs:       # each run's regularizers are exactly its preset's
        assert config.regularizers == load_config(run.preset).regularizers
    assert dicts[0]["train"]["total_kimg"] == PLANS["default"].steps * PLANS["default"].batch / 1000


def test_demo_smoke_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "estimated total" in printed.splitlines()[2]           # plan and ETA come first
    report = (out / "report.md").read_text()
    for run in RUNS:
        assert f"| {run.label} |" in report
        assert (out / "runs" / f"smoke-{run.key}" / "metrics.jsonl").is_file()
    assert "## What the numbers show" in report and "standard error" in report
    assert "Inception FID is not computed in this plan" in report     # smoke skips FID and says so
    for name in ("loss_curves.png", "metrics_vs_kimg.png", "samples_side_by_side.png"):
        assert f"({name})" in report
        with Image.open(out / name) as image:
            assert image.width > 100
