"""Sweeps: the runs of a ``[sweep]`` table, run in parallel processes or printed as commands.

Every run of a sweep is independent, so a sweep is nothing but a list of
``python -m experiments run CONFIG --set key=value ...`` commands (:func:`commands`, for a
cluster scheduler), or the same runs executed here by a pool of ``jobs`` processes, each
limited to ``cpu_count // jobs`` torch threads so that they do not oversubscribe the CPU.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from .config import Run

__all__ = ["commands", "run_all"]


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v == float("inf"):
        return "inf"
    return repr(v)


def commands(runs: list[Run], config_path: str, extra: list[str] | None = None) -> list[str]:
    """One shell command per run, reproducing it exactly (same name, folder and values)."""
    out = []
    for run in runs:
        args = [sys.executable, "-m", "experiments", "run", config_path, *(extra or [])]
        for key, value in run.overrides.items():
            args += ["--set", f"{key}={_value(value)}"]
        out.append(shlex.join(args))
    return out


def _worker(run: Run, resume: bool, overwrite: bool, threads: int,
            progress: bool = False) -> dict[str, Any]:
    import torch

    from .train import train

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        final = train(run, resume=resume, overwrite=overwrite, progress=progress)
    except Exception:
        return {"run": run.name, "error": traceback.format_exc()}
    return {"run": run.name, "final": final, "wall": time.perf_counter() - t0}


def _line(result: dict[str, Any]) -> str:
    if "error" in result:
        last = result["error"].strip().splitlines()[-1]
        return f"  {result['run']}: FAILED: {last}"
    f = result["final"]
    parts = [f"  {result['run']}: step {f.get('step')}", f"loss {f.get('loss', float('nan')):.4f}"]
    if f.get("baseline") is not None:
        parts.append(f"(baseline {f['baseline']:.4f})")
    if f.get("accuracy") is not None:
        parts.append(f"acc {f['accuracy']:.3f}")
    if f.get("test_accuracy") is not None:
        parts.append(f"test acc {f['test_accuracy']:.3f}")
    if f.get("constraint_error") is not None:
        parts.append(f"constraint error {f['constraint_error']:.1e}")
    parts.append(f"{1e3 * f.get('time_per_step', 0.0):.1f} ms/step, {result['wall']:.1f} s")
    return " ".join(parts)


def run_all(runs: list[Run], jobs: int = 1, resume: bool = False, overwrite: bool = False,
            progress: bool = True, stream=None) -> list[dict[str, Any]]:
    """Run every run (``jobs`` at a time) and return ``{"run", "final" | "error"}`` per run.

    Failures are reported and do not stop the other runs.
    """
    stream = stream if stream is not None else sys.stdout
    jobs = max(1, min(jobs, len(runs)))
    results: list[dict[str, Any]] = []
    if jobs == 1:
        for run in runs:
            result = _worker(run, resume, overwrite, run.config["train"]["threads"], progress)
            print(_line(result), file=stream, flush=True)
            results.append(result)
        return results
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_worker, run, resume, overwrite,
                               run.config["train"]["threads"] or threads): run
                   for run in runs}
        for fut in as_completed(futures):
            result = fut.result()
            print(_line(result), file=stream, flush=True)
            results.append(result)
    order = {run.name: i for i, run in enumerate(runs)}
    return sorted(results, key=lambda r: order[r["run"]])
