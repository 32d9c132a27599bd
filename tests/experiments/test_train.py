"""Runs: the files they write, exact resume after an interruption, crash-safe writes."""

from __future__ import annotations

import datetime
import io
import json
import os
import shlex
import signal
import sys

import pytest
import torch

from experiments import backend, distributed
from experiments import checkpoint as ckpt_mod
from experiments import train as train_mod
from experiments.checkpoint import MetricsLog, load_checkpoint, read_jsonl, save_checkpoint
from experiments.cli import _resume_command, build_parser, main
from experiments.config import ConfigError, load_config
from experiments.distributed import DistInfo, from_env, gloo_interface, loopback_interface
from experiments.progress import ProgressBar, format_duration
from experiments.train import (
    DivergedError,
    ResumeConfigError,
    RunExistsError,
    RunLockedError,
    train,
)

METRICS = ("step", "loss", "accuracy", "constraint_error", "test_loss", "test_accuracy")


class Crash(Exception):
    pass


def crash_at(step_to_crash: int):
    def callback(step: int) -> None:
        if step == step_to_crash:
            raise Crash(step)
    return callback


def metrics(directory):
    return [{k: r.get(k) for k in METRICS} for r in read_jsonl(directory / "metrics.jsonl")]


def test_tiny_run_writes_its_files(write_config):
    run = load_config(write_config())
    final = train(run, progress=False)
    d = run.directory
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint.pt", "config.json", "final.json",
                                                   "metrics.jsonl"]
    assert json.loads((d / "config.json").read_text()) == json.loads(json.dumps(run.config))
    records = read_jsonl(d / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for r in records:
        assert set(r) == {"step", "loss", "accuracy", "constraint_error", "seconds"}
        assert r["loss"] > 0 and 0 <= r["accuracy"] <= 1 and r["constraint_error"] < 1e-5
    assert all(a["seconds"] < b["seconds"] for a, b in zip(records, records[1:]))
    state = load_checkpoint(d / "checkpoint.pt")  # weights_only=True
    assert state["step"] == 30 and state["finished"] is True
    assert {"model", "optimizer", "ranks", "rng"} <= set(state)
    assert final["step"] == 30 and final["loss"] == records[-1]["loss"]
    assert final["baseline"] == pytest.approx(10 * torch.log(torch.tensor(8.0)).item() / 25)
    assert final["best_loss"] == min(r["loss"] for r in records)
    with pytest.raises(RunExistsError, match="--resume"):
        train(run, progress=False)
    assert train(run, resume=True, progress=False)["loss"] == final["loss"]  # already done


@pytest.mark.parametrize("changes", [
    {},  # copying, dynamic trivialization K = 7 (refreshes between checkpoints)
    {"optim": {"K": "inf"}, "model": {"retraction": "cayley", "init": "cayley"}},
    {"task": {"name": "adding", "length": 6}, "optim": {"name": "riemannian_adam"}},
    {"task": {"name": "digits", "permuted": True},
     "train": {"steps": 30, "eval_every": 10, "eval_batch": 512, "batch": 4}},
])
def test_resume_reproduces_the_uninterrupted_run(write_config, tmp_path, changes):
    if changes.get("task", {}).get("name") == "digits":
        base = {k: v for k, v in load_config(write_config()).config.items()
                if k in ("model", "optim", "train")}
        path = write_config(base=base, **changes)
    else:
        path = write_config(**changes)
    reference = load_config(path, output=str(tmp_path / "a"))
    final_ref = train(reference, progress=False)

    run = load_config(path, output=str(tmp_path / "b"))
    with pytest.raises(Crash):
        train(run, progress=False, callback=crash_at(24))  # last checkpoint at step 20
    assert [r["step"] for r in metrics(run.directory)][-1] == 20
    assert load_checkpoint(run.directory / "checkpoint.pt")["step"] == 20
    final = train(run, resume=True, progress=False)

    assert metrics(run.directory) == metrics(reference.directory)
    assert final["loss"] == final_ref["loss"]
    a = load_checkpoint(reference.directory / "checkpoint.pt")["model"]
    b = load_checkpoint(run.directory / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(write_config, monkeypatch):
    run = load_config(write_config())
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        if obj.get("step") == 20:  # write half the bytes of the step-20 checkpoint, then die
            import io

            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            raise Crash("killed mid-write")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", torn_save)
    with pytest.raises(Crash):
        train(run, progress=False)
    d = run.directory
    assert load_checkpoint(d / "checkpoint.pt")["step"] == 10  # the previous one, intact
    assert not [p for p in os.listdir(d) if p.endswith(".tmp")]
    monkeypatch.undo()
    final = train(run, resume=True, progress=False)
    reference = train(load_config(write_config(), output=str(d.parent.parent / "ref")),
                      progress=False)
    assert final["loss"] == reference["loss"] and final["step"] == 30


def test_torn_log_line_is_ignored_and_dropped_on_resume(write_config):
    run = load_config(write_config())
    with pytest.raises(Crash):
        train(run, progress=False, callback=crash_at(12))
    log = run.directory / "metrics.jsonl"
    with open(log, "ab") as f:  # a write cut short by a kill
        f.write(b'{"step": 15, "loss": 0.12')
    steps = [r["step"] for r in read_jsonl(log)]
    assert steps == [5, 10]
    train(run, resume=True, progress=False)
    assert [r["step"] for r in read_jsonl(log)] == [5, 10, 15, 20, 25, 30]
    assert log.read_bytes().endswith(b"}\n")


def test_log_and_checkpoint_primitives(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for s in (1, 2, 3):
        log.append({"step": s, "loss": float("nan") if s == 2 else 1.0 / s})
    assert [r["loss"] for r in log] == [1.0, None, 1 / 3]
    log.truncate(2)
    assert [r["step"] for r in log] == [1, 2]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(tmp_path / "bad.jsonl")
    save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(2), "n": 3, "s": "x"})
    assert load_checkpoint(tmp_path / "c.pt")["n"] == 3

    torch.save({"obj": datetime.date(2020, 1, 1)}, tmp_path / "evil.pt")  # arbitrary pickles
    with pytest.raises(Exception, match="(?i)weights_only"):
        load_checkpoint(tmp_path / "evil.pt")


def test_cli_run_and_resume(write_config, capsys):
    path = write_config()
    assert main(["run", str(path), "--no-progress", "--set", "train.steps=10"]) == 0
    out = capsys.readouterr().out
    assert "step 10" in out and "baseline 0.8318" in out and "constraint error" in out
    assert main(["run", str(path), "--no-progress", "--set", "train.steps=10"]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["run", str(path), "--no-progress", "--set", "train.steps=10",
                 "--overwrite"]) == 0


def test_torchrun_environment():
    assert from_env({}) == (0, 1, 0)
    assert from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ValueError, match="RANK"):
        from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_gloo_stays_on_loopback_when_all_ranks_are_on_this_host():
    lo = loopback_interface()
    assert lo.startswith("lo")
    for addr in ("127.0.0.1", "127.3.2.1", "localhost", "::1", "[::1]"):
        assert gloo_interface({"MASTER_ADDR": addr}) == lo, addr
    for env in ({"MASTER_ADDR": "10.0.0.5"}, {"MASTER_ADDR": "node-3"}, {},
                {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "eth1"}):
        assert gloo_interface(env) is None, env  # another host, unknown, or the user's choice


@pytest.fixture
def group_calls(monkeypatch):
    """A process group that this process owns, recording barrier and destroy calls."""
    calls: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group",
                        lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed, "setup", lambda device: DistInfo(owns_group=True))
    return calls


def test_ranks_meet_at_a_barrier_before_the_group_is_destroyed(write_config, group_calls):
    run = load_config(write_config())
    train(run, progress=False)
    assert group_calls == ["barrier", "destroy"]


def test_after_an_error_the_group_is_destroyed_without_a_barrier(write_config, group_calls):
    run = load_config(write_config())
    with pytest.raises(Crash):  # another rank may never reach a barrier
        train(run, progress=False, callback=crash_at(3))
    assert group_calls == ["destroy"]


def test_resume_before_the_first_checkpoint_starts_over(write_config, tmp_path):
    path = write_config()
    run = load_config(path)
    with pytest.raises(Crash):
        train(run, progress=False, callback=crash_at(7))  # logged step 5, no checkpoint yet
    assert [r["step"] for r in read_jsonl(run.directory / "metrics.jsonl")] == [5]
    assert not (run.directory / "checkpoint.pt").exists()
    resumed_matches_a_clean_run(run, path, tmp_path)


def resumed_matches_a_clean_run(run, path, tmp_path):
    """``--resume`` of ``run`` logs what a run from scratch of the same config logs."""
    train(run, resume=True, progress=False)
    reference = load_config(path, output=str(tmp_path / "ref"))
    train(reference, progress=False)
    assert metrics(run.directory) == metrics(reference.directory)


def test_resume_refuses_a_run_whose_checkpoint_is_gone(write_config, capsys):
    # the log shows that a checkpoint was written (steps past the first checkpoint period):
    # starting over would rewrite metrics.jsonl, so --resume stops and changes nothing
    path = write_config()
    run = load_config(path)
    with pytest.raises(Crash):
        train(run, progress=False, callback=crash_at(24))  # checkpoints at 10 and 20
    (run.directory / "checkpoint.pt").unlink()
    saved = {name: (run.directory / name).read_bytes() for name in ("config.json",
                                                                    "metrics.jsonl")}
    with pytest.raises(RunExistsError) as info:
        train(run, resume=True, progress=False)
    msg = str(info.value)
    assert type(info.value).__name__ == "CheckpointMissingError"
    assert msg.startswith(f"{run.directory}: ")
    assert "checkpoint.pt is missing" in msg and "4 logged steps (up to step 20)" in msg
    assert "--overwrite" in msg
    assert sorted(p.name for p in run.directory.iterdir()) == ["config.json", "metrics.jsonl"]
    assert {name: (run.directory / name).read_bytes() for name in saved} == saved
    assert main(["run", str(path), "--resume", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "checkpoint.pt" in err
    assert (run.directory / "metrics.jsonl").read_bytes() == saved["metrics.jsonl"]
    assert main(["run", str(path), "--overwrite", "--no-progress"]) == 0  # starting over
    assert [r["step"] for r in metrics(run.directory)] == [5, 10, 15, 20, 25, 30]


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04 truncated"])
def test_resume_refuses_an_unreadable_checkpoint_in_one_line(write_config, capsys, content):
    """An empty, garbage or truncated checkpoint.pt (replaced from outside: the harness writes
    it atomically) is named in a one-line error and nothing is changed (a raw EOFError or
    UnpicklingError traceback before)."""
    path = write_config()
    run = load_config(path)
    with pytest.raises(Crash):
        train(run, progress=False, callback=crash_at(24))
    (run.directory / "checkpoint.pt").write_bytes(content)
    saved = {p.name: p.read_bytes() for p in run.directory.iterdir()}
    assert main(["run", str(path), "--resume", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "checkpoint.pt: cannot read the checkpoint" in err
    assert {p.name: p.read_bytes() for p in run.directory.iterdir()} == saved


def test_resume_refuses_a_finished_run_whose_checkpoint_is_gone(write_config):
    # one checkpoint period longer than the run: the final checkpoint was its only one, and
    # final.json says that it was written
    run = load_config(write_config(train={"checkpoint_every": 200}))
    train(run, progress=False)
    (run.directory / "checkpoint.pt").unlink()
    log = (run.directory / "metrics.jsonl").read_bytes()
    with pytest.raises(RunExistsError, match=r"checkpoint\.pt is missing.*6 logged steps "
                                             r"\(up to step 30\).*final\.json"):
        train(run, resume=True, progress=False)
    assert (run.directory / "metrics.jsonl").read_bytes() == log


def test_resume_while_the_first_checkpoint_was_written_starts_over(write_config, tmp_path):
    # killed between logging step 10 and its checkpoint landing: no checkpoint, and a log
    # that holds no more than a run before its first checkpoint writes
    path = write_config()
    run = load_config(path)
    with pytest.raises(Crash):
        train(run, progress=False, callback=crash_at(10))
    (run.directory / "checkpoint.pt").unlink()
    assert [r["step"] for r in read_jsonl(run.directory / "metrics.jsonl")] == [5, 10]
    resumed_matches_a_clean_run(run, path, tmp_path)


def test_resume_with_set_steps_extends_the_run_in_place(write_config, tmp_path):
    path = write_config()
    assert main(["run", str(path), "--no-progress", "--set", "train.steps=10"]) == 0
    short = load_config(path, ["train.steps=10"])
    assert main(["run", str(path), "--no-progress", "--resume", "--set", "train.steps=20"]) == 0
    longer = load_config(path, ["train.steps=20"])
    assert longer.directory == short.directory == load_config(path).directory
    assert sorted(p.name for p in short.directory.parent.iterdir()) == [short.name]
    reference = load_config(write_config(train={"steps": 20}), output=str(tmp_path / "ref"))
    train(reference, progress=False)
    assert metrics(longer.directory) == metrics(reference.directory)
    assert [r["step"] for r in metrics(longer.directory)] == [5, 10, 15, 20]


@pytest.mark.parametrize("task", ["copying", "digits"])
def test_resume_with_steps_lowered_to_the_checkpoint_ends_the_run_there(write_config, tmp_path,
                                                                        task):
    """A run killed after a checkpoint that fell between two log steps, resumed with
    ``train.steps`` lowered to the checkpoint's step: the log and ``final.json`` end as those
    of a run of that many steps (the end-of-run record from the saved accumulators, and the
    final test evaluation); the loop ran no step, so they were missing."""
    changes = {"train": {"log_every": 7, "checkpoint_every": 10}}
    if task == "digits":
        base = {k: v for k, v in load_config(write_config()).config.items()
                if k in ("model", "optim", "train")}
        path = write_config(base=base, task={"name": "digits", "permuted": True},
                            train={"log_every": 7, "checkpoint_every": 10, "eval_batch": 512,
                                   "batch": 4})
    else:
        path = write_config(**changes)
    run = load_config(path, output=str(tmp_path / "a"))
    with pytest.raises(Crash):
        train(run, progress=False, callback=crash_at(12))  # checkpoint at 10, log at 7
    resumed = load_config(path, ["train.steps=10"], output=str(tmp_path / "a"))
    final = train(resumed, resume=True, progress=False)
    reference = load_config(path, ["train.steps=10"], output=str(tmp_path / "ref"))
    final_ref = train(reference, progress=False)
    assert metrics(resumed.directory) == metrics(reference.directory)
    assert [r["step"] for r in metrics(resumed.directory)] == [7, 10]
    if task == "digits":
        assert metrics(resumed.directory)[-1]["test_accuracy"] is not None
    for key in ("step", "loss", "best_loss", "test_accuracy"):
        assert final.get(key) == final_ref.get(key), key


def test_progress_bar_shows_step_loss_and_constraint_error(write_config):
    stream = io.StringIO()
    bar = ProgressBar(40, desc="demo", stream=stream, interval=0.0)
    bar.update(10, loss=1.2345, baseline=0.69, err=3.2e-6)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("demo [######------------------] 10/40")
    assert "loss=1.23 baseline=0.69 err=3.2e-06" in lines[0]
    assert format_duration(3725) == "1:02:05" and format_duration(75.3) == "1:15"


def test_resume_extends_a_finished_run(write_config, tmp_path):
    short = load_config(write_config(train={"steps": 10}))
    train(short, progress=False)
    longer = load_config(write_config(train={"steps": 20}))  # same file, more steps
    assert longer.directory == short.directory
    train(longer, resume=True, progress=False)
    reference = load_config(write_config(train={"steps": 20}), output=str(tmp_path / "ref"))
    train(reference, progress=False)
    assert metrics(longer.directory) == metrics(reference.directory)
    assert [r["step"] for r in metrics(longer.directory)] == [5, 10, 15, 20]


# --- resume safety, divergence, final.json, file modes, the run lock ---------------------

def test_resume_refuses_a_changed_config_and_leaves_config_json(write_config):
    run = load_config(write_config(train={"steps": 10}))
    train(run, progress=False)
    saved = (run.directory / "config.json").read_bytes()
    changed = load_config(write_config(train={"steps": 20}, optim={"lr": 0.02},
                                       model={"hidden": 16}))
    assert changed.directory == run.directory
    with pytest.raises(ResumeConfigError) as info:
        train(changed, resume=True, progress=False)
    msg = str(info.value)
    assert "optim.lr: saved 0.01, now 0.02" in msg and "model.hidden: saved 8, now 16" in msg
    assert "train.steps" not in msg.split(". Only")[0]  # more steps is allowed
    assert (run.directory / "config.json").read_bytes() == saved
    assert main(["run", str(write_config(optim={"lr": 0.02})), "--resume", "--no-progress"]) == 2
    # execution-only keys may change
    same = load_config(write_config(train={"steps": 10, "threads": 2, "checkpoint_every": 3}))
    assert train(same, resume=True, progress=False)["step"] == 10


def test_resume_before_a_checkpoint_checks_config_json(write_config):
    run = load_config(write_config())
    with pytest.raises(Crash):
        train(run, progress=False, callback=crash_at(3))  # no checkpoint yet
    with pytest.raises(ResumeConfigError, match=r"optim\.K: saved 7, now 9"):
        train(load_config(write_config(optim={"K": 9})), resume=True, progress=False)


def _poison_after(step_to_poison: int, monkeypatch):
    """Make the optimizer write NaN into the readout weights after step ``step_to_poison``."""
    real = backend.build_optimizer

    def build(cfg, model, retraction=None):
        opt = real(cfg, model, retraction)
        count = {"n": 0}
        step = opt.step

        def poisoned_step(*args, **kwargs):
            out = step(*args, **kwargs)
            count["n"] += 1
            if count["n"] == step_to_poison:
                with torch.no_grad():
                    model.readout.weight.fill_(float("nan"))
            return out
        opt.step = poisoned_step
        return opt
    monkeypatch.setattr(backend, "build_optimizer", build)


def test_the_last_checkpoint_always_holds_finite_weights(write_config, monkeypatch):
    run = load_config(write_config())
    _poison_after(20, monkeypatch)  # finite loss at step 20, NaN weights at its checkpoint
    with pytest.raises(DivergedError, match="diverged at step 20: non-finite weights") as info:
        train(run, progress=False)
    assert info.value.step == 20 and "readout.weight" in info.value.what
    state = load_checkpoint(run.directory / "checkpoint.pt")
    assert state["step"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())
    last = read_jsonl(run.directory / "metrics.jsonl")[-1]
    assert last["step"] == 20 and "readout.weight" in last["diverged"]


def test_a_diverged_run_ends_with_one_line_and_exit_1(write_config, capsys):
    path = write_config()
    code = main(["run", str(path), "--no-progress", "--set", "optim.lr=1e6",
                 "--set", "optim.lr_orth=1e6"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "diverged at step 2: loss is nan" in err


def test_final_json_is_written_when_resumed_after_the_final_checkpoint(write_config,
                                                                       monkeypatch):
    run = load_config(write_config())
    real = train_mod.write_json

    def killed(path, obj):
        if path.name == "final.json":
            raise Crash("killed before final.json")
        real(path, obj)
    monkeypatch.setattr(train_mod, "write_json", killed)
    with pytest.raises(Crash):
        train(run, progress=False)
    monkeypatch.undo()
    assert load_checkpoint(run.directory / "checkpoint.pt")["finished"] is True
    final = train(run, resume=True, progress=False)
    saved = json.loads((run.directory / "final.json").read_text())
    assert saved["step"] == final["step"] == 30 and saved["baseline"] == final["baseline"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        ckpt_mod.write_json(tmp_path / "a.json", {"x": 1})
        save_checkpoint(tmp_path / "c.pt", {"n": 1})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == expected
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == expected
    os.chmod(tmp_path / "a.json", 0o640)  # an existing file keeps its mode, as with open()
    ckpt_mod.write_json(tmp_path / "a.json", {"x": 2})
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_overwrite_deletes_the_run_files_only(write_config):
    # what else the folder holds is the user's: notes, plots, a subfolder
    run = load_config(write_config(train={"steps": 10}))
    train(run, progress=False)
    (run.directory / "notes.txt").write_text("mine")
    (run.directory / "plots").mkdir()
    (run.directory / "plots" / "a.png").write_bytes(b"png")
    (run.directory / ".checkpoint.pt.x1y2.tmp").write_bytes(b"partial")  # left by a kill
    assert train(run, progress=False, overwrite=True)["step"] == 10
    assert sorted(p.name for p in run.directory.iterdir()) == [
        "checkpoint.pt", "config.json", "final.json", "metrics.jsonl", "notes.txt", "plots"]
    assert (run.directory / "notes.txt").read_text() == "mine"
    assert (run.directory / "plots" / "a.png").read_bytes() == b"png"


def test_demo_keeps_earlier_results(tmp_path, capsys):
    # a second demo continues the first one's runs (finished: kept as they are) instead of
    # deleting them
    args = ["demo", "--output", str(tmp_path), "--jobs", "1", "--set", "train.steps=10",
            "--set", "train.log_every=5", "--set", "model.hidden=8"]
    assert main(args) == 0
    run_dir = sorted((tmp_path / "demo").glob("retraction=*"))[0]
    (run_dir / "notes.txt").write_text("mine")
    log = (run_dir / "metrics.jsonl").read_bytes()
    assert main(args) == 0
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert (run_dir / "metrics.jsonl").read_bytes() == log
    assert "| retraction=" in capsys.readouterr().out


def test_a_run_folder_has_one_writer(write_config):
    run = load_config(write_config(train={"steps": 10}))
    with train_mod._run_lock(run.directory):  # another live writer (here: this process)
        lock = (run.directory / ".lock").read_text()
        assert lock.startswith(f"{os.getpid()}@")
        with pytest.raises(RunLockedError, match=rf"pid@host: {os.getpid()}@"):
            train(run, progress=False)
    assert not run.directory.exists()  # nothing written: the folder it made is gone too
    run.directory.mkdir(parents=True)
    (run.directory / ".lock").write_text("999999999@gone\n")  # left by a killed run
    assert train(run, progress=False, overwrite=True)["step"] == 10
    assert not (run.directory / ".lock").exists()


def test_a_data_error_leaves_no_empty_run_folder(write_config, tmp_path):
    base = {k: v for k, v in load_config(write_config()).config.items()
            if k in ("model", "optim", "train")}
    run = load_config(write_config(base=base, task={"name": "mnist",
                                                    "path": str(tmp_path / "absent")}))
    assert not run.directory.parent.exists()
    with pytest.raises((FileNotFoundError, ValueError)):
        train(run, progress=False)
    assert not run.directory.exists()
    assert not run.directory.parent.exists()  # nor the experiment's folder it would have made
    main(["run", str(write_config(base=base, task={"name": "mnist",
                                                   "path": str(tmp_path / "absent")})),
          "--no-progress"])
    assert not run.directory.parent.exists()


def test_the_data_path_may_change_on_resume():
    # where the data lives is not what the run computes (a preempted job on another node)
    saved = {"task": {"name": "mnist", "path": "/a/mnist"}, "train": {"seed": 0}}
    moved = {"task": {"name": "mnist", "path": "/b/mnist"}, "train": {"seed": 0}}
    assert train_mod.config_changes(saved, moved) == []
    reseeded = {"task": {"name": "mnist", "path": "/b/mnist"}, "train": {"seed": 1}}
    assert train_mod.config_changes(saved, reseeded) == [("train.seed", 0, 1)]


def test_a_model_that_cannot_be_built_leaves_the_run_folder_alone(write_config):
    # henaff's kernel (rotation angles up to pi) is outside the image of the static QR map at
    # the identity (angles below pi/2): the build fails, before anything is written or deleted
    path = write_config(optim={"K": "inf"}, model={"retraction": "qr"})
    run = load_config(path)
    with pytest.raises(ConfigError, match="not in the map's image"):
        train(run, progress=False)
    assert not run.directory.exists()
    assert main(["run", str(path), "--no-progress"]) == 2  # a config error, in one line
    run.directory.mkdir(parents=True)
    (run.directory / "notes.txt").write_text("mine")
    (run.directory / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="not in the map's image"):
        train(run, overwrite=True, progress=False)
    assert sorted(p.name for p in run.directory.iterdir()) == ["metrics.jsonl", "notes.txt"]


# --- the best loss across a resume, an infinite loss, the --resume command -----------------

def _patch_task_loss(monkeypatch, change):
    """Make every task that ``train`` builds return ``change(loss, call)`` as its loss
    (``call``: 1 for the first training step of this ``train`` call)."""
    real = train_mod.build_task

    def build(*args, **kwargs):
        task = real(*args, **kwargs)
        loss_of, calls = task.loss, {"n": 0}

        def loss(output, target):
            value, accuracy = loss_of(output, target)
            calls["n"] += 1
            return change(value, calls["n"]), accuracy
        task.loss = loss
        return task
    monkeypatch.setattr(train_mod, "build_task", build)


def test_resume_keeps_a_best_loss_logged_before_the_checkpoint(write_config, tmp_path,
                                                                monkeypatch):
    """The checkpoint carries the best loss so far: a resumed run whose loss never again gets
    as low as before its checkpoint reports that earlier best, as the uninterrupted run does
    (not the best of the steps after the resume)."""
    # gradient ascent (value of the loss, gradient of minus the loss): the loss rises
    _patch_task_loss(monkeypatch, lambda loss, call: 2 * loss.detach() - loss)
    path = write_config()
    reference = load_config(path, output=str(tmp_path / "ref"))
    final_ref = train(reference, progress=False)

    run = load_config(path)
    with pytest.raises(Crash):
        train(run, progress=False, callback=crash_at(14))  # checkpoint at step 10
    assert load_checkpoint(run.directory / "checkpoint.pt")["step"] == 10
    final = train(run, resume=True, progress=False)
    losses = {r["step"]: r["loss"] for r in read_jsonl(run.directory / "metrics.jsonl")}
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    # precondition: the lowest loss was logged before the checkpoint the run resumed from
    assert min(losses[5], losses[10]) < min(losses[s] for s in (15, 20, 25, 30))
    assert final["best_loss"] == min(losses.values()) == final_ref["best_loss"]
    assert json.loads((run.directory / "final.json").read_text())["best_loss"] == \
        final["best_loss"]


def test_an_infinite_loss_stops_the_run_before_its_step(write_config, monkeypatch):
    """An inf loss (finite gradients: loss + inf) is non-finite like NaN: the run stops at that
    step, before the optimizer steps on it, and logs the divergence with the loss."""
    _patch_task_loss(monkeypatch,
                     lambda loss, call: loss + float("inf") if call == 3 else loss)
    run = load_config(write_config())
    with pytest.raises(DivergedError, match="diverged at step 3: loss is inf") as info:
        train(run, progress=False)
    assert info.value.step == 3 and info.value.what == "loss is inf"
    records = read_jsonl(run.directory / "metrics.jsonl")
    assert records == [{"step": 3, "diverged": "loss is inf", "loss": "inf"}]  # JSON: "inf"
    assert not (run.directory / "checkpoint.pt").exists()


def test_the_resume_command_keeps_the_output_folder_and_the_other_arguments():
    """The command printed after Ctrl-C continues the same runs: same config, ``--set`` keys,
    results folder (``--output``: without it, --resume looks in the config's folder) and
    jobs."""
    parser = build_parser()

    def command(argv):
        return shlex.split(_resume_command(parser.parse_args(argv)))

    head = [sys.executable, "-m", "experiments"]
    assert command(["run", "c.toml", "--output", "o"]) == [
        *head, "run", "c.toml", "--output", "o", "--resume"]
    assert command(["sweep", "c.toml", "--jobs", "3", "--set", "optim.K=10", "--output",
                    "my results"]) == [*head, "sweep", "c.toml", "--set", "optim.K=10",
                                       "--output", "my results", "--jobs", "3", "--resume"]
    assert command(["run", "c.toml", "--resume"]) == [*head, "run", "c.toml", "--resume"]
    assert _resume_command(parser.parse_args(["report", "results"])) == ""


def test_ctrl_c_prints_a_command_that_resumes_the_run_in_its_output_folder(
        write_config, tmp_path, capsys, monkeypatch):
    """After Ctrl-C in ``run --output DIR``, the printed command continues the run in DIR
    (its log then matches an uninterrupted run's) and writes nothing to the config's
    folder."""
    path = write_config()
    out = tmp_path / "elsewhere"
    real_train = train_mod.train

    def interrupted(run, **kwargs):
        def ctrl_c(step):
            if step == 12:  # after the checkpoint at step 10
                raise KeyboardInterrupt
        return real_train(run, callback=ctrl_c, **kwargs)

    monkeypatch.setattr(train_mod, "train", interrupted)
    assert main(["run", str(path), "--no-progress", "--output", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted; continue with: ")
    argv = shlex.split(err.split("continue with: ", 1)[1])
    assert argv[:3] == [sys.executable, "-m", "experiments"]
    monkeypatch.undo()
    assert main(argv[3:]) == 0
    run = load_config(path, output=str(out))
    assert (run.directory / "final.json").exists()
    assert not (tmp_path / "results").exists()  # the config's own output folder
    reference = load_config(path, output=str(tmp_path / "ref"))
    train(reference, progress=False)
    assert metrics(run.directory) == metrics(reference.directory)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
def test_sigterm_stops_a_run_as_ctrl_c_does(write_config, tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler's, or ``kill``) ends ``run`` like Ctrl-C, with status 143: the
    printed command continues it, and its log then matches an uninterrupted run's. Before,
    the process died at once, its lock held until exit."""
    path = write_config()
    real_train = train_mod.train

    def terminated(run, **kwargs):
        def sigterm(step):
            if step == 12:  # after the checkpoint at step 10
                os.kill(os.getpid(), signal.SIGTERM)
        return real_train(run, callback=sigterm, **kwargs)

    monkeypatch.setattr(train_mod, "train", terminated)

    def unhandled(signum, frame):  # reached only if main does not handle SIGTERM itself
        raise AssertionError("SIGTERM reached the handler main() replaced")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert main(["run", str(path), "--no-progress"]) == 143
        assert signal.getsignal(signal.SIGTERM) is unhandled  # main restores the handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert err.startswith("terminated; continue with: ") and "--resume" in err
    run = load_config(path)
    assert not (run.directory / ".lock").exists() and not (run.directory / "final.json").exists()
    monkeypatch.undo()
    assert main(shlex.split(err.split("continue with: ", 1)[1])[3:]) == 0
    reference = load_config(path, output=str(tmp_path / "ref"))
    train(reference, progress=False)
    assert metrics(run.directory) == metrics(reference.directory)
