"""Shared timing and reporting for the benchmark scripts.

Every script times dtriv beside its peers in one process, **interleaved**: each round runs
every implementation once, in an order shuffled from round to round, so load changes on
a shared machine hit all of them alike. A measurement is the median over rounds with its
interquartile spread; the figures that count are the ratios ``peer / dtriv`` (above 1: dtriv
is faster) taken from one such run, each the median of the per-round ratios
(:func:`paired_ratio`).

A script builds its command line with :func:`parser`, applies it with :func:`setup`, times
with :func:`measure` and prints each result table with :func:`emit`, which also appends it
to a markdown file (``--markdown PATH``) that ``benchmarks/run_all.py`` collects.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import itertools
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "Timing",
    "emit",
    "emit_summary",
    "environment",
    "environment_md",
    "matmul_case",
    "md_table",
    "measure",
    "paired_ratio",
    "parser",
    "ratio",
    "setup",
]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and quartiles over ``n`` timed rounds."""

    median: float
    q1: float
    q3: float
    n: int
    #: the times in round order
    samples: tuple[float, ...] = field(default=(), repr=False)
    #: which :func:`measure` call took them (0: none); rounds pair only within one call
    run: int = field(default=0, repr=False)

    @classmethod
    def of(cls, samples: list[float], run: int = 0) -> Timing:
        if not samples:
            raise ValueError("samples: expected at least one time, got none")
        s = sorted(samples)
        if len(s) >= 4:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1, q3 = s[0], s[-1]
        return cls(statistics.median(s), q1, q3, len(s), tuple(samples), run)

    @property
    def ms(self) -> float:
        return 1e3 * self.median

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (min–max below 4 samples)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    def per_call(self, inner: int) -> Timing:
        """The timing of one of the ``inner`` calls that each timed round made."""
        return Timing(self.median / inner, self.q1 / inner, self.q3 / inner, self.n,
                      tuple(x / inner for x in self.samples), self.run)

    def __str__(self) -> str:
        return f"{fmt_seconds(self.median)} ±{100 * self.spread / 2:.0f}%"


def fmt_seconds(t: float) -> str:
    """``t`` seconds with 3 significant digits in a readable unit."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        # the value as printed decides the unit (999.6 µs is "1 ms", not "1e+03 µs")
        if float(f"{t:.3g}") >= scale or unit == "µs":
            v = t / scale
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    raise AssertionError  # unreachable


_RUNS = itertools.count(1)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    cases: dict[str, Callable[[], object]],
    *,
    repeats: int = 10,
    warmup: int = 2,
    budget_s: float = 20.0,
    device: torch.device | str | None = None,
    min_repeats: int = 3,
) -> dict[str, Timing]:
    """Time each zero-argument callable, interleaved; ``{name: Timing}``.

    ``warmup`` untimed rounds, then up to ``repeats`` timed rounds; each round calls every
    case once, in an order shuffled from round to round (a fixed seed, so runs repeat), so
    that every case follows every other one about equally often: a case that leaves the
    machine in a bad state (caches, freed memory the allocator gives back) slows its
    successors, which must not always be the same. (A rotation of one order would not do
    this: it keeps each case's neighbours.) Stops early once ``budget_s`` seconds have
    passed and ``min_repeats`` rounds are timed. CUDA work is synchronised around each call.
    """
    if not cases:
        raise ValueError("cases: expected at least one callable, got none")
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    dev = torch.device(device) if isinstance(device, str) else device
    order = list(cases.items())
    shuffle = random.Random(len(order)).shuffle
    times: dict[str, list[float]] = {name: [] for name in cases}
    start = time.perf_counter()
    for i in range(warmup + repeats):
        shuffle(order)
        for name, fn in order:
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
        timed = i + 1 - warmup
        if timed >= min(min_repeats, repeats) and time.perf_counter() - start > budget_s:
            break
    run = next(_RUNS)
    return {name: Timing.of(ts, run) for name, ts in times.items()}


def matmul_case(n: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Callable[[], object]:
    """One ``n x n @ n x n`` product: the unit of "matmul equivalents" (time it alongside)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g, dtype=dtype).to(device)
    B = torch.randn(n, n, generator=g, dtype=dtype).to(device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    return lambda: torch.matmul(A, B, out=out)


def paired_ratio(peer: Timing, ours: Timing) -> float:
    """``peer / ours``: the median over rounds of the per-round ratios.

    :func:`measure` runs every case once per round, back to back, so the two times of a round
    share the machine's state; their ratio cancels the slow drifts of a shared machine (its
    speed moves by tens of percent over minutes) that a ratio of two medians keeps. Timings
    not from one :func:`measure` call (different numbers of rounds) fall back to the ratio of
    the medians.
    """
    a, b = peer.samples, ours.samples
    if peer.run and peer.run == ours.run and len(a) == len(b) and all(t > 0 for t in b):
        return statistics.median(x / y for x, y in zip(a, b))
    return peer.median / ours.median


def ratio(peer: Timing | None, ours: Timing | None) -> str:
    """:func:`paired_ratio` as ``"2.31x"`` (above 1: ours is faster); ``"-"`` if either is
    missing."""
    if peer is None or ours is None or ours.median <= 0:
        return "-"
    r = paired_ratio(peer, ours)
    return f"{r:.3g}x" if r < 1000 else f"{r:,.0f}x"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"rows[{i}]: expected {len(headers)} cells, got {len(row)}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except ImportError:
        return "not installed"


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    """Machine, thread count and library versions of this process."""
    dev = torch.device(device)
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} logical CPUs",
        "device": (torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"),
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }
    for name in ("torch", "dtriv", "geotorch", "geoopt"):
        env[name] = _version(name)
    return env


def environment_md(device: torch.device | str = "cpu") -> str:
    env = environment(device)
    return md_table(list(env), [list(env.values())])


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script shares (see the module docstring)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a small subset (about 10 s)")
    p.add_argument("--markdown", type=Path, default=None,
                   help="append the result tables to this markdown file")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per measurement before fewer rounds are timed")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, check ``--device``, ``--repeats``, ``--warmup`` and ``--budget``;
    print the environment line."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    # (the scripts read a missing value as their default: a 0 would silently become it)
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"--repeats: expected >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        raise SystemExit(f"--warmup: expected >= 0, got {args.warmup}")
    if args.budget is not None and not args.budget > 0:
        raise SystemExit(f"--budget: expected a positive number of seconds, got {args.budget}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: cuda requested, but torch sees no CUDA device")
    env = environment(device)
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    return device


def emit(args: argparse.Namespace, title: str, table: str, notes: str = "") -> None:
    """Print a result table and append it to ``args.markdown`` (if set) as a section."""
    text = f"### {title}\n\n" + (f"{notes.strip()}\n\n" if notes.strip() else "") + table + "\n"
    print("\n" + text, flush=True)
    path = getattr(args, "markdown", None)
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")


def emit_summary(args: argparse.Namespace, topic: str,
                 rows: list[tuple[str, str, str, bool | None]]) -> None:
    """A "Summary" section: one row per target, ``(target, goal, measured, met)``.

    ``run_all.py --readme`` copies the summary sections into the README. ``met`` is
    ``None`` when the run did not measure what the target needs (e.g. under ``--quick``).
    """
    mark = {True: "yes", False: "**no**", None: "not measured"}
    table = md_table(["target", "goal", "measured", "met"],
                     [[t, g, m, mark[ok]] for t, g, m, ok in rows])
    emit(args, f"Summary: {topic}", table)
