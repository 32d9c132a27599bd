"""Sweeps: the runs of a ``[sweep]`` table, run in parallel processes or printed as commands.

Every run of a sweep is independent, so a sweep is nothing but a list of
``python -m experiments run CONFIG --set key=value ...`` commands (:func:`commands`, for a
cluster scheduler), or the same runs executed here by a pool of ``jobs`` processes, each
limited to ``cpu_count // jobs`` torch threads so that they do not oversubscribe the CPU.

Ctrl-C (SIGINT) stops a parallel sweep promptly: the queued runs are cancelled, the running
ones are interrupted like a single run (their checkpoints and logs stay consistent) and
:func:`run_all` raises ``KeyboardInterrupt``; ``--resume`` continues every run. The command
line treats SIGTERM the same way (:class:`Terminated`). A worker whose main process dies
without stopping it (SIGKILL) notices within a second that it was orphaned: a running run
stops as on Ctrl-C, and the worker exits instead of taking the queued runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .config import Run, read_override_value

__all__ = ["Terminated", "commands", "run_all", "terminate_as_interrupt"]

#: how often a pool worker checks that its main process is alive (seconds), and how long a
#: run interrupted because it was orphaned has to clean up before the worker exits anyway
ORPHAN_POLL_S, ORPHAN_GRACE_S = 1.0, 30.0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interruption (see :func:`terminate_as_interrupt`): a run stops as
    on Ctrl-C, with its checkpoint and log consistent."""


def terminate_as_interrupt() -> Any:
    """Make SIGTERM raise :class:`Terminated` in the main thread; returns the previous
    handler (``None`` off the main thread, where no handler can be set)."""
    try:
        return signal.signal(signal.SIGTERM, _interrupt_once)
    except ValueError:  # not the main thread
        return None


def _value(v: Any) -> str:
    """``v`` as ``--set`` reads it back: a string that would read as another TOML value
    (``2024``, ``true``, ``inf``, a date) as a quoted TOML string, other strings as they are."""
    if isinstance(v, str):
        if read_override_value(v) == v:
            return v  # read back as the string itself
        return json.dumps(v)  # a TOML basic string (JSON's escapes are TOML's)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v == float("inf"):
        return "inf"
    return repr(v)


def commands(runs: list[Run], config_path: str, extra: list[str] | None = None) -> list[str]:
    """One shell command per run: the same name, folder and values. Its metrics are those of
    the run in ``sweep --jobs 1`` bit for bit; a parallel sweep gives each run with
    ``train.threads = 0`` ``cpu_count // jobs`` threads, which changes the rounding of the
    products (pin ``train.threads`` to compare runs across the two bit for bit)."""
    out = []
    for run in runs:
        args = [sys.executable, "-m", "experiments", "run", config_path, *(extra or [])]
        for key, value in run.overrides.items():
            args += ["--set", f"{key}={_value(value)}"]
        out.append(shlex.join(args))
    return out


def _worker(run: Run, resume: bool, overwrite: bool, threads: int,
            progress: bool = False, in_pool: bool = False) -> dict[str, Any]:
    """Train ``run``; ``{"run", "final", "wall"}`` or ``{"run", "error"}``.

    Expected failures (divergence, a config or folder problem) give a one-line error,
    anything else its traceback. In a pool worker (``in_pool``) Ctrl-C ends the worker
    process once the run has cleaned up, so that it takes no further queued run.
    """
    import torch

    from .config import ConfigError
    from .train import RunExistsError, RunLockedError, train

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        if in_pool:  # idle workers ignore SIGINT (see _init_pool_worker); a running one stops
            signal.signal(signal.SIGINT, _interrupt_once)
            signal.signal(signal.SIGTERM, _interrupt_once)
            if _orphaned.is_set():  # orphaned while idle (its SIGINT was ignored then)
                raise KeyboardInterrupt
        final = train(run, resume=resume, overwrite=overwrite, progress=progress)
    except (ConfigError, FloatingPointError, RunExistsError, RunLockedError) as e:
        return {"run": run.name, "error": "".join(traceback.format_exception_only(e))}
    except Exception:
        return {"run": run.name, "error": traceback.format_exc()}
    except KeyboardInterrupt:
        if in_pool:
            os._exit(130)
        raise
    finally:
        if in_pool:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return {"run": run.name, "final": final, "wall": time.perf_counter() - t0}


def _interrupt_once(signum: int, frame: Any) -> None:
    """SIGINT or SIGTERM handler: ``KeyboardInterrupt`` (:class:`Terminated` for SIGTERM)
    once, then that signal is ignored so that cleanup can finish."""
    signal.signal(signum, signal.SIG_IGN)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _init_pool_worker() -> None:
    """Pool-worker initializer: an idle worker ignores Ctrl-C (the main process stops it), and
    a thread watches for the main process to die (:func:`_watch_parent`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True,
                     name="orphan-watch").start()


#: set in a pool worker once its main process has died (:func:`_watch_parent`)
_orphaned = threading.Event()


def _watch_parent(parent: int) -> None:
    """Once this process is orphaned (its parent id changes: the main process died without
    stopping the pool, e.g. by SIGKILL), interrupt a running run as Ctrl-C does, then exit:
    the pool's queued runs are not taken. A worker that is idle then (it ignores SIGINT), or
    still starting its run, stops the run it takes before training (:data:`_orphaned`).
    Without this the workers ran every queued run and then waited forever; without the flag a
    worker orphaned while it imported torch for its first run trained that run to the end."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    _orphaned.set()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(ORPHAN_GRACE_S)  # a running run's cleanup: it exits with 130 before this ends
    os._exit(1)


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
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_pool_worker)
    try:
        futures = {pool.submit(_worker, run, resume, overwrite,
                               run.config["train"]["threads"] or threads, False, True): run
                   for run in runs}
        for fut in as_completed(futures):
            try:
                result = fut.result()
            except BrokenProcessPool:  # a worker was killed or interrupted on its own
                result = {"run": futures[fut].name,
                          "error": "its worker process stopped (killed or interrupted); "
                                   "continue it with --resume"}
            print(_line(result), file=stream, flush=True)
            results.append(result)
    except KeyboardInterrupt:
        try:  # a second Ctrl-C must not cut the cleanup short
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            previous = None
        try:
            _stop(pool)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        raise
    pool.shutdown()
    order = {run.name: i for i, run in enumerate(runs)}
    return sorted(results, key=lambda r: order[r["run"]])


def _stop(pool: ProcessPoolExecutor, grace: float = 10.0) -> None:
    """Cancel the queued runs, interrupt the running ones (SIGINT) and wait for them.

    SIGINT is repeated every half second (a worker may pick up an already-dispatched run
    after the first); a worker still alive after ``grace`` seconds is terminated. A
    terminal's Ctrl-C reaches the workers too; this covers a signal sent to this process only.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown clears it
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        for p in processes:
            if p.is_alive() and p.pid is not None:
                try:
                    os.kill(p.pid, signal.SIGINT)
                except OSError:
                    pass
        for p in processes:
            p.join(0.5 / max(1, len(processes)))
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join()
    pool.shutdown(wait=True)
