"""Scale-out paths that start processes: torchrun (DDP over gloo) and parallel sweeps (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.checkpoint import load_checkpoint, read_jsonl
from experiments.cli import main
from experiments.config import expand_sweep, load_config

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_torchrun_ddp_two_processes(write_config, tmp_path):
    path = write_config(train={"steps": 12, "batch": 8, "checkpoint_every": 6, "log_every": 3})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", "-m", "experiments", "run", str(path), "--no-progress"]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = load_config(path)
    finals = [line for line in done.stdout.splitlines() if line.startswith(f"{run.directory}:")]
    assert len(finals) == 1 and "(baseline " in finals[0]  # rank 0 alone reports
    records = read_jsonl(run.directory / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6, 9, 12]  # rank 0 alone writes
    assert all(r["constraint_error"] < 1e-5 for r in records)
    state = load_checkpoint(run.directory / "checkpoint.pt")
    assert len(state["ranks"]) == 2  # both data streams are checkpointed
    assert not state["ranks"][0]["task"]["generator"].equal(state["ranks"][1]["task"]["generator"])


def test_parallel_sweep_matches_sequential(write_config, tmp_path):
    path = write_config(sweep={"model.retraction": ["expm", "cayley"]},
                        train={"steps": 10, "log_every": 5})
    assert main(["sweep", str(path), "--jobs", "2", "--no-report"]) == 0
    assert main(["sweep", str(path), "--jobs", "1", "--no-report",
                 "--output", str(tmp_path / "seq")]) == 0
    for run in expand_sweep(path):
        other = tmp_path / "seq" / run.config["name"] / run.name
        a = [(r["step"], r["loss"]) for r in read_jsonl(run.directory / "metrics.jsonl")]
        b = [(r["step"], r["loss"]) for r in read_jsonl(other / "metrics.jsonl")]
        assert a == b and len(a) == 2
