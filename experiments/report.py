"""Summary table and plots of the runs under a results folder.

``report(DIR)`` finds every run below ``DIR`` (a folder with ``config.json`` and
``metrics.jsonl``), groups the runs of an experiment whose configurations are equal once the
seed and the execution-only keys (``config.NOT_IN_NAMES``: device, threads, log and
checkpoint periods, evaluation batch) are removed, and writes to ``DIR``:

``summary.md``
    per configuration: seeds, steps done, final and best loss, final accuracy (and final and
    best test accuracy), final constraint error, time per step -- each the mean ± standard deviation
    over seeds -- and the task's baseline loss;
``loss.png``
    loss against step per configuration (mean over seeds, min-max band), baseline dashed;
``constraint_error.png``
    constraint error against step (log scale);
``time_per_step.png``
    milliseconds per training step per configuration.

A diverged run (its log ends in a ``diverged`` record or a non-finite loss) shows as
``diverged at step N``: its last finite values are not averaged into the final columns.
Groups sharing a label (e.g. a file edited between runs) get the differing keys appended;
groups whose members differ in execution-only keys or labels are flagged below the table.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import read_jsonl, write_text
from .config import NOT_IN_NAMES
from .tasks import baseline_of
from .train import flat_config

__all__ = ["report", "load_runs", "RunResult", "mean_std"]


@dataclass
class RunResult:
    directory: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def experiment(self) -> str:
        return self.config.get("name", self.directory.parent.name)

    @property
    def group(self) -> str:
        return self.config.get("run", {}).get("group", "default")

    @property
    def diverged(self) -> int | None:
        """The step at which the run diverged (a ``diverged`` record or a non-finite loss)."""
        for r in self.records:
            loss = r.get("loss", 0.0)
            finite = isinstance(loss, int | float) and math.isfinite(loss)
            if "diverged" in r or ("loss" in r and not finite):
                return r.get("step")
        return None

    def comparable(self) -> dict[str, Any]:
        """The config without seed, execution-only keys, run label and output folder."""
        skip = {"train.seed", "task.path", *NOT_IN_NAMES}  # the data's location: not the run
        return {k: v for k, v in flat_config(self.config).items() if k not in skip}

    def execution(self) -> dict[str, Any]:
        """The execution-only keys of the config (they do not change what a run computes)."""
        flat = flat_config(self.config)
        return {key: flat.get(key) for key in NOT_IN_NAMES}

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], float(r[key])) for r in self.records
                if isinstance(r.get(key), int | float)]

    def final(self, key: str) -> float | None:
        vals = self.values(key)
        return vals[-1][1] if vals else None

    def best(self, key: str, largest: bool = False) -> float | None:
        vals = [v for _, v in self.values(key) if math.isfinite(v)]
        if not vals:
            return None
        return max(vals) if largest else min(vals)

    def time_per_step(self) -> float | None:
        vals = self.values("seconds")
        return vals[-1][1] / vals[-1][0] if vals and vals[-1][0] > 0 else None


@dataclass
class Group:
    experiment: str
    name: str
    runs: list[RunResult] = field(default_factory=list)
    suffix: str = ""

    @property
    def label(self) -> str:
        return self.name + self.suffix

    @property
    def finished(self) -> list[RunResult]:
        """The runs that did not diverge."""
        return [r for r in self.runs if r.diverged is None]

    def warnings(self) -> list[str]:
        """How the members differ beyond their seed (labels, execution-only keys)."""
        notes = []
        labels = sorted({r.group for r in self.runs})
        if len(labels) > 1:
            notes.append(f"run labels {', '.join(labels)}")
        executions = [r.execution() for r in self.runs]
        for key in NOT_IN_NAMES:
            values = sorted({json.dumps(e[key]) for e in executions})
            if len(values) > 1:
                notes.append(f"{key} {', '.join(values)}")
        return notes

    def baseline(self) -> tuple[float, str]:
        return baseline_of(self.runs[0].config["task"])


def _natural(path: Path) -> list:
    """Sort key that orders ``K=2`` before ``K=10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t)
            for t in re.split(r"(\d+)", path.as_posix())]


def load_runs(directory: str | Path) -> list[RunResult]:
    """Every run below ``directory`` (itself included), in natural order of their paths."""
    directory = Path(directory)
    runs = []
    for cfg_path in sorted(directory.rglob("config.json"), key=_natural):
        metrics = cfg_path.parent / "metrics.jsonl"
        if not metrics.exists():
            continue
        config = json.loads(cfg_path.read_text())
        runs.append(RunResult(cfg_path.parent, config, read_jsonl(metrics)))
    return runs


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value) of the non-missing values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(ms: tuple[float, float] | None, scale: float = 1.0, digits: int = 4) -> str:
    if ms is None:
        return "–"
    m, s = ms[0] * scale, ms[1] * scale
    return f"{m:.{digits}g} ± {s:.2g}"


def _groups(runs: list[RunResult]) -> list[Group]:
    """Runs of one experiment with equal configs but for the seed (``comparable``)."""
    groups: dict[tuple[str, str], Group] = {}
    for r in runs:
        key = (r.experiment, json.dumps(r.comparable(), sort_keys=True))
        groups.setdefault(key, Group(r.experiment, r.group)).runs.append(r)
    out = list(groups.values())
    by_label: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in out:
        by_label[(g.experiment, g.name)].append(g)
    for same in by_label.values():  # one label, different configs: name what differs
        if len(same) > 1:
            configs = [g.runs[0].comparable() for g in same]
            keys = [k for k in configs[0] if len({json.dumps(c.get(k)) for c in configs}) > 1]
            keys += [k for c in configs for k in c if k not in configs[0] and k not in keys]
            for g, c in zip(same, configs):
                g.suffix = " [" + ", ".join(f"{k}={c.get(k)}" for k in keys) + "]"
    return out


def _final_loss(g: Group) -> tuple[str, tuple[float, float] | None]:
    """The final-loss cell (diverged runs named, not averaged) and the finite mean ± std."""
    final_ms = mean_std([r.final("loss") for r in g.finished])
    steps = sorted(r.diverged for r in g.runs if r.diverged is not None)
    if not steps:
        return _fmt(final_ms), final_ms
    at = "/".join(map(str, steps))
    if len(steps) == len(g.runs):
        return f"diverged at step {at}", None
    return f"{_fmt(final_ms)}; {len(steps)}/{len(g.runs)} diverged (step {at})", final_ms


def _task_line(g: Group) -> str:
    """``Task: copying, length 10. Baseline loss: **0.6931** (...)`` for a group's task."""
    task = g.runs[0].config["task"]
    base, base_name = g.baseline()
    size = f", length {task['length']}" if task.get("length") else ""
    return f"Task: {task['name']}{size}. Baseline loss: **{base:.4f}** ({base_name})"


def _ratio(value: float) -> str:
    """A loss ratio: three decimals, or three significant digits in scientific notation
    beyond 1000 (a diverging run's ratio would otherwise print dozens of digits)."""
    return f"{value:.3f}x" if abs(value) < 1e3 else f"{value:.3g}x"


def summary_table(groups: list[Group]) -> str:
    """The markdown of ``summary.md``."""
    lines = ["# Summary", ""]
    by_exp: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        by_exp[g.experiment].append(g)
    for exp, gs in by_exp.items():
        tasks = [_task_line(g) for g in gs]
        shared = len(set(tasks)) == 1  # one task and length, so one baseline
        header = (f"{tasks[0]}." if shared else
                  "The task or its length differs between configurations: each ratio is to "
                  "the configuration's own baseline (column baseline).")
        lines += [f"## {exp}", "", header, "",
                  "| configuration | seeds | steps | final loss | best loss | final accuracy "
                  "| test accuracy | best test accuracy | constraint error | ms / step "
                  + ("" if shared else "| baseline ") + "| vs baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|---|" + ("" if shared else "---|")]
        notes = []
        for g in gs:
            base, _ = g.baseline()
            final_cell, final_ms = _final_loss(g)
            ok = g.finished  # a diverged run's last finite values would mislead
            ratio = _ratio(final_ms[0] / base) if final_ms and base > 0 else "–"
            steps = sorted({r.records[-1]["step"] for r in g.runs if r.records})
            warnings = g.warnings()
            flag = " (*)" if warnings else ""
            silent = sum(1 for r in g.runs if not r.records)  # failed or killed before a log
            seeds = f"{len(g.runs) - silent}" + (f" (+{silent} with no logged step)"
                                                  if silent else "")
            lines.append(
                f"| {g.label}{flag} | {seeds} | {'/'.join(map(str, steps)) or 0} "
                f"| {final_cell} | {_fmt(mean_std([r.best('loss') for r in g.runs]))} "
                f"| {_fmt(mean_std([r.final('accuracy') for r in ok]))} "
                f"| {_fmt(mean_std([r.final('test_accuracy') for r in ok]))} "
                f"| {_fmt(mean_std([r.best('test_accuracy', largest=True) for r in g.runs]))} "
                f"| {_fmt(mean_std([r.final('constraint_error') for r in ok]), digits=2)} "
                f"| {_fmt(mean_std([r.time_per_step() for r in g.runs]), scale=1e3, digits=3)} "
                + ("" if shared else f"| {base:.4f} ")
                + f"| {ratio} |"
            )
            if warnings:
                notes.append(f"(*) {g.label}: members differ in {'; '.join(warnings)}")
        lines += ["", *notes, ""] if notes else [""]
    lines += ["Mean ± standard deviation over seeds; final = last logged record (the mean "
              "training loss over its logging interval); ratio = final loss / baseline.", ""]
    return "\n".join(lines)


def _mean_curve(runs: list[RunResult], key: str):
    per_step: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for s, v in r.values(key):
            if math.isfinite(v):
                per_step[s].append(v)
    steps = sorted(per_step)
    return (steps, [statistics.fmean(per_step[s]) for s in steps],
            [min(per_step[s]) for s in steps], [max(per_step[s]) for s in steps])


def _plots(groups: list[Group], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experiments = list(dict.fromkeys(g.experiment for g in groups))
    written = []

    def figure(title: str):
        fig, axes = plt.subplots(len(experiments), 1, squeeze=False,
                                 figsize=(7, 3.6 * len(experiments)))
        fig.suptitle(title)
        return fig, {e: axes[i][0] for i, e in enumerate(experiments)}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = directory / name
        tmp = directory / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)

    fig, axes = figure("training loss")
    for g in groups:
        ax = axes[g.experiment]
        steps, mean, lo, hi = _mean_curve(g.runs, "loss")
        (line,) = ax.plot(steps, mean, label=g.label)
        if len(g.runs) > 1:
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    for exp, ax in axes.items():
        # each configuration's own baseline (they differ when the task or its length does)
        bases = dict.fromkeys(g.baseline()[0] for g in groups if g.experiment == exp)
        for base in bases:
            ax.axhline(base, color="k", linestyle="--", linewidth=1,
                       label=f"baseline ({base:.3g})")
        ax.set(title=exp, xlabel="step", ylabel="loss")
        ax.legend(fontsize="small")
    save(fig, "loss.png")

    fig, axes = figure("constraint error max|W^T W - I|")
    for g in groups:
        steps, mean, _, _ = _mean_curve(g.runs, "constraint_error")
        if steps:
            axes[g.experiment].plot(steps, [max(v, 1e-18) for v in mean], label=g.label)
    for exp, ax in axes.items():
        ax.set(title=exp, xlabel="step", ylabel="constraint error")
        if ax.lines:
            ax.set_yscale("log")
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no constrained weights", ha="center", transform=ax.transAxes)
    save(fig, "constraint_error.png")

    fig, axes = figure("time per step")
    for exp, ax in axes.items():
        gs = [g for g in groups if g.experiment == exp]
        stats = [mean_std([r.time_per_step() for r in g.runs]) or (0.0, 0.0) for g in gs]
        ax.bar(range(len(gs)), [m * 1e3 for m, _ in stats],
               yerr=[s * 1e3 for _, s in stats], capsize=3)
        ax.set_xticks(range(len(gs)), [g.label for g in gs], rotation=30, ha="right",
                      fontsize="small")
        ax.set(title=exp, ylabel="ms / step")
    save(fig, "time_per_step.png")
    return written


def report(directory: str | Path, plots: bool = True) -> tuple[Path, list[Path]]:
    """Write ``summary.md`` (and the plots) for the runs below ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"report: {directory} is not a folder")
    runs = load_runs(directory)
    if not runs:
        raise FileNotFoundError(f"report: no runs (config.json + metrics.jsonl) below {directory}")
    groups = _groups(runs)
    summary = directory / "summary.md"
    write_text(summary, summary_table(groups))
    return summary, (_plots(groups, directory) if plots else [])
