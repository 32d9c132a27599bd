"""Parallel sweeps: Ctrl-C stops them promptly, without starting the queued runs."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import sweep as sweep_mod
from experiments import train as train_mod
from experiments.config import expand_sweep

ROOT = Path(__file__).resolve().parents[2]


def _default_sigint() -> None:
    """Give the sweep a terminal's Ctrl-C even when this suite runs with SIGINT ignored (a
    shell starts background jobs so), since Python keeps an inherited SIG_IGN."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_sweep(write_config, **popen) -> tuple[list, subprocess.Popen]:
    """A six-run ``sweep --jobs 2`` of long runs in a subprocess (its own session), started
    and waited for until a run has written its first checkpoint: ``(runs, process)``."""
    path = write_config(sweep={"train.seed": [0, 1, 2, 3, 4, 5]},
                        train={"steps": 3000, "log_every": 5, "checkpoint_every": 50})
    runs = expand_sweep(path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments", "sweep", str(path), "--jobs", "2", "--no-report"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **popen)
    try:
        deadline = time.monotonic() + 120
        while not any((r.directory / "checkpoint.pt").exists() for r in runs):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return runs, proc


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="POSIX signals")
def test_ctrl_c_stops_a_parallel_sweep_and_cancels_the_queued_runs(write_config):
    runs, proc = _start_sweep(write_config, preexec_fn=_default_sigint)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and took < 15, err[-3000:]
    assert "--resume" in err and "Traceback" not in err
    started = [r for r in runs if r.directory.exists()]
    assert not any((r.directory / "final.json").exists() for r in runs)
    assert len(started) <= 3  # two running (one more may have been dispatched), none queued
    assert not any((r.directory / ".lock").exists() for r in started)


def _orphaned_worker(run) -> None:
    sweep_mod._orphaned.set()  # as _watch_parent leaves it (the SIGINT came while idle)
    sweep_mod._worker(run, False, False, 1, in_pool=True)
    os._exit(0)  # not reached when the worker stops the run


@pytest.mark.skipif(os.name != "posix", reason="fork")
def test_a_worker_orphaned_before_its_run_started_does_not_train_it(write_config):
    """A pool worker whose main process died while it was idle or importing torch for its run
    (it ignores SIGINT then, so the orphan watch's interrupt is lost) stops that run before
    training it (exit 130, no final.json), as a running one does. Before, it trained the run
    to the end: a sweep killed with SIGKILL right after it started finished a run."""
    path = write_config(train={"steps": 3000, "log_every": 5, "checkpoint_every": 50})
    run = expand_sweep(path)[0]
    proc = multiprocessing.get_context("fork").Process(target=_orphaned_worker, args=(run,))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 130
    assert not (run.directory / "final.json").exists()
    assert not (run.directory / "checkpoint.pt").exists()


def test_a_parallel_sweep_returns_its_results_in_the_order_of_its_runs(write_config,
                                                                        monkeypatch):
    """``run_all`` with several jobs collects results as runs finish, and returns them in the
    order of the runs (what the sweep's summary and its failure list follow), not that one."""
    path = write_config(sweep={"train.seed": [0, 1]}, train={"steps": 5})
    runs = expand_sweep(path)
    real_train = train_mod.train

    def first_run_finishes_last(run, **kwargs):
        if run.name == runs[0].name:  # wait for the second run's final.json
            deadline = time.monotonic() + 30
            while not (runs[1].directory / "final.json").exists() and \
                    time.monotonic() < deadline:
                time.sleep(0.01)
        return real_train(run, **kwargs)

    # forked workers (not spawned: no torch import per worker) inherit the patched train
    monkeypatch.setattr(train_mod, "train", first_run_finishes_last)
    fork = multiprocessing.get_context("fork")
    monkeypatch.setattr(sweep_mod.multiprocessing, "get_context", lambda method=None: fork)
    stream = io.StringIO()
    results = sweep_mod.run_all(runs, jobs=2, progress=False, stream=stream)
    printed = [line.split(":")[0].strip() for line in stream.getvalue().splitlines()]
    assert printed == [runs[1].name, runs[0].name]  # precondition: finished in that order
    assert [r["run"] for r in results] == [runs[0].name, runs[1].name]
    assert [r["final"]["step"] for r in results] == [5, 5]
    assert results[0]["final"]["loss"] != results[1]["final"]["loss"]  # two seeds


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(os.name != "posix" or not Path("/proc/self/stat").exists(),
                    reason="POSIX signals and /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_sweep_whose_main_process_is_stopped_leaves_no_worker(write_config, sig):
    """A signal to the main process alone: SIGTERM is handled as Ctrl-C (exit 143 and the
    --resume command); after SIGKILL the workers notice they are orphaned. Either way the
    workers stop their runs (no lock left) and exit without taking a queued run. Before, they
    trained every queued run and then waited forever."""
    runs, proc = _start_sweep(write_config)
    workers: list[int] = []
    try:
        workers = [p for p in _children(proc.pid)
                   if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 2
        os.kill(proc.pid, getattr(signal, sig))  # the main process only, not its group
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers)
    finally:
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if sig == "SIGTERM":
        assert proc.returncode == 143, err[-3000:]
        assert err.startswith("terminated; continue with: ") and "--resume" in err
    started = [r for r in runs if r.directory.exists()]
    assert len(started) <= 3  # two running (one more may have been dispatched), none queued
    assert not any((r.directory / "final.json").exists() for r in runs)
    assert not any((r.directory / ".lock").exists() for r in started)
