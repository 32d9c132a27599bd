"""Report: summary.md numbers (mean ± std over seeds, baseline) and the PNG plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib import image

from experiments.checkpoint import MetricsLog, write_json
from experiments.cli import main
from experiments.config import expand_sweep, load_config
from experiments.report import _ratio, mean_std, report
from experiments.sweep import run_all

PNGS = ("loss.png", "constraint_error.png", "time_per_step.png")


def fake_runs(write_config):
    """Runs with known metrics: final loss = 0.1 * (K index + 1) + 0.01 * seed."""
    path = write_config(sweep={"optim.K": [1, 100], "train.seed": [0, 1, 2]},
                        task={"length": 10})
    runs = expand_sweep(path)
    expected = {}
    for run in runs:
        k_index = [1, 100].index(run.config["optim"]["K"])
        seed = run.config["train"]["seed"]
        run.directory.mkdir(parents=True)
        write_json(run.directory / "config.json", run.config)
        log = MetricsLog(run.directory / "metrics.jsonl")
        final = 0.1 * (k_index + 1) + 0.01 * seed
        for step, loss in ((10, 2.0), (20, 0.05 + final), (30, final)):
            log.append({"step": step, "loss": loss, "accuracy": 0.5,
                        "constraint_error": 1e-7 * (seed + 1), "seconds": step * 0.002})
        expected.setdefault(run.config["run"]["group"], []).append(final)
    return runs, expected


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)
    assert mean_std([None, float("nan")]) is None


def test_loss_ratios_stay_short():
    """The "vs baseline" cell: three decimals, or three significant digits beyond 1000 (a
    diverging run's ratio printed 34 digits)."""
    assert _ratio(0.5) == "0.500x" and _ratio(999.9) == "999.900x"
    assert _ratio(8495278144364539457913975996416.0) == "8.5e+30x"
    assert _ratio(1234.5) == "1.23e+03x"


def test_report_summary_and_plots(write_config):
    runs, expected = fake_runs(write_config)
    folder = runs[0].directory.parent
    summary, plots = report(folder)
    text = summary.read_text()
    baseline = 10 * math.log(8) / 30
    assert f"Baseline loss: **{baseline:.4f}**" in text
    for group, finals in expected.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {group} |"))
        mean, std = np.mean(finals), np.std(finals, ddof=1)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "3" and cells[2] == "30"
        assert cells[3] == f"{mean:.4g} ± {std:.2g}"  # final loss
        assert cells[4] == cells[3]  # the best logged loss is the final one here
        assert cells[6] == cells[7] == "–"  # no test set
        assert cells[9] == "2 ± 0"  # ms per step = 0.06 s / 30 steps
        assert cells[10] == f"{mean / baseline:.3f}x"
    assert [p.name for p in plots] == list(PNGS)
    for name in PNGS:
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert image.imread(folder / name).shape[0] > 100


def test_each_configuration_is_compared_with_its_own_baseline(write_config):
    # a sweep over the copying length: the baseline 10 log 8 / (L + 20) differs per row
    path = write_config(sweep={"task.length": [5, 100]})
    runs = expand_sweep(path)
    for run in runs:
        run.directory.mkdir(parents=True)
        write_json(run.directory / "config.json", run.config)
        MetricsLog(run.directory / "metrics.jsonl").append(
            {"step": 30, "loss": 0.1, "accuracy": 0.5, "seconds": 0.1})
    summary, _ = report(runs[0].directory.parent)
    text = summary.read_text()
    assert "Baseline loss" not in text and "own baseline" in text
    for L in (5, 100):
        baseline = 10 * math.log(8) / (L + 20)
        cells = _row(text, f"length={L} |")
        assert cells[10] == f"{baseline:.4f}" and cells[11] == f"{0.1 / baseline:.3f}x"


def test_runs_without_a_logged_step_are_not_counted_as_seeds(write_config):
    runs, expected = fake_runs(write_config)
    (runs[0].directory / "metrics.jsonl").write_text("")  # failed before its first log
    summary, _ = report(runs[0].directory.parent)
    cells = _row(summary.read_text(), f"{runs[0].config['run']['group']} |")
    assert cells[1] == "2 (+1 with no logged step)"
    finals = expected[runs[0].config["run"]["group"]][1:]
    assert cells[3] == f"{np.mean(finals):.4g} ± {np.std(finals, ddof=1):.2g}"


def test_report_cli_and_errors(write_config, tmp_path, capsys):
    runs, _ = fake_runs(write_config)
    folder = runs[0].directory.parent.parent  # the results root also works
    assert main(["report", str(folder)]) == 0
    assert "| K=1 |" in capsys.readouterr().out
    assert (folder / "summary.md").exists()
    assert main(["report", str(tmp_path / "empty")]) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no runs"):
        report(tmp_path / "empty")


def test_sweep_runs_and_reports(write_config, capsys):
    path = write_config(sweep={"model.retraction": ["expm", "cayley"]},
                        train={"steps": 10, "log_every": 5})
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and "retraction=cayley_seed=3: step 10" in out
    assert "| retraction=expm |" in out and "Baseline loss" in out
    folder = expand_sweep(path)[0].directory.parent
    assert all((folder / name).exists() for name in ("summary.md", *PNGS))
    # a failing run is reported and does not stop the others
    runs = expand_sweep(path)
    results = run_all(runs, jobs=1, progress=False)  # they exist: both fail, cleanly
    assert all("RunExistsError" in r["error"] for r in results)


def _row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.parametrize("marker", [
    {"step": 40, "diverged": "loss is nan", "loss": None},  # written by train
    {"step": 40, "loss": "inf", "accuracy": 0.1, "constraint_error": 1e-7, "seconds": 0.1},
])
def test_a_diverged_run_is_shown_as_diverged(write_config, marker):
    runs, expected = fake_runs(write_config)
    bad = runs[0]  # K=1, seed 0: its last finite loss 0.1 must not count as its final loss
    MetricsLog(bad.directory / "metrics.jsonl").append(marker)
    text = report(runs[0].directory.parent, plots=False)[0].read_text()
    cells = _row(text, "K=1 |")
    finals = expected["K=1"][1:]
    assert cells[3] == (f"{np.mean(finals):.4g} ± {np.std(finals, ddof=1):.2g}; "
                        "1/3 diverged (step 40)")
    for run in runs[1:3]:  # all of the group diverged: no number at all
        MetricsLog(run.directory / "metrics.jsonl").append(marker)
    text = report(runs[0].directory.parent, plots=False)[0].read_text()
    cells = _row(text, "K=1 |")
    assert cells[3] == "diverged at step 40/40/40" and cells[10] == "–"
    assert cells[5] == "–" and cells[8] == "–"  # no final accuracy / constraint error


def test_report_groups_by_config_not_by_label(write_config):
    """Two runs labelled "seed=N" from a file edited in between are not seeds of one config."""
    for seed, lr in ((0, 0.01), (1, 0.02), (2, 0.02)):
        run = load_config(write_config(optim={"lr": lr}, train={"seed": seed}))
        assert run.config["run"]["group"] == "default"
        run.directory.mkdir(parents=True)
        write_json(run.directory / "config.json", run.config)
        MetricsLog(run.directory / "metrics.jsonl").append(
            {"step": 30, "loss": lr * 10, "accuracy": 0.5, "constraint_error": 1e-7,
             "seconds": 0.06})
    text = report(run.directory.parent, plots=False)[0].read_text()
    assert _row(text, "default [optim.lr=0.01]")[1:4] == ["1", "30", "0.1 ± 0"]
    assert _row(text, "default [optim.lr=0.02]")[1:4] == ["2", "30", "0.2 ± 0"]


def test_report_flags_members_that_differ_beyond_the_seed(write_config):
    for seed, threads in ((0, 1), (1, 2)):
        run = load_config(write_config(train={"seed": seed, "threads": threads}))
        run.directory.mkdir(parents=True)
        write_json(run.directory / "config.json", run.config)
        MetricsLog(run.directory / "metrics.jsonl").append({"step": 30, "loss": 1.0})
    text = report(run.directory.parent, plots=False)[0].read_text()
    assert _row(text, "default (*)")[1] == "2"
    assert "(*) default: members differ in train.threads 1, 2" in text
