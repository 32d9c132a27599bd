"""The training loop of one run: logs, checkpoints, exact resume, optional DDP.

A run writes to ``<output>/<name>/<run>/``:

``config.json``
    the resolved configuration (every default filled in, the sweep values applied);
``metrics.jsonl``
    one record every ``log_every`` steps: ``step``, ``loss`` and ``accuracy`` (means over
    the steps since the previous record), ``constraint_error`` (largest distance of a
    constrained weight to its manifold), ``seconds`` (training time so far), and for the
    pixel tasks ``test_loss``/``test_accuracy`` at evaluation steps;
``checkpoint.pt``
    every ``checkpoint_every`` steps and at the end: model, optimizer (wrapper) state,
    the data streams and RNG states, the partial log averages;
``final.json``
    the last record, the best loss and the time per step, once the run has finished.

``resume=True`` restarts from the checkpoint, first truncating ``metrics.jsonl`` back to
its step, and reproduces the metrics of an uninterrupted run exactly (same device, seed
and thread count). The configuration must be the saved one except for ``RESUMABLE_KEYS``
(more steps, threads, device, checkpoint period, evaluation batch, data path); any other
change is a :class:`ResumeConfigError` listing each changed key, raised before anything is
written.
All files are written atomically (see :mod:`experiments.checkpoint`).

Without a checkpoint, ``resume=True`` starts the run over, which rewrites ``metrics.jsonl``.
It does so only where that loses nothing the restart does not compute again: a run killed
before its first checkpoint (no ``final.json``, no record past the first checkpoint step,
``min(checkpoint_every, steps)`` of its ``config.json``), whose log is truncated to step 0
as a resume truncates it back to its checkpoint's step. A folder whose log shows that a
checkpoint was written (or that has a log but no ``config.json``) has lost its checkpoint:
:class:`CheckpointMissingError`, raised before anything is written, names the folder and the
logged steps; ``overwrite=True`` starts such a run over.

While a run trains, its folder holds a ``.lock`` file (the writer's pid and host) locked
with ``flock``: a second process writing the same run (a ``--resume`` while an orphaned
sweep worker still trains it) stops with :class:`RunLockedError`. The operating system
drops the lock when its process dies, so a lock left by a killed run is simply taken over.

A run whose loss, gradients or weights become NaN or inf stops with :class:`DivergedError`
(naming the step and what went non-finite) and appends a record ``{"step", "diverged"}`` to
``metrics.jsonl``; weights are checked before every checkpoint write, so the last checkpoint
always holds finite weights.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import backend, distributed
from .checkpoint import (
    MetricsLog,
    jsonable,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
    write_json,
)
from .config import RESUMABLE_KEYS, ConfigError, Run
from .models import build_model
from .progress import ProgressBar
from .tasks import Task, build_task

__all__ = ["train", "RunExistsError", "CheckpointMissingError", "RunLockedError",
           "ResumeConfigError", "DivergedError", "config_changes", "resolve_device", "RUN_FILES",
           "RESUMABLE_KEYS"]

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "final.json")
LOCK_FILE = ".lock"
CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("format", "step", "finished", "config", "model", "optimizer", "ranks", "rng",
                   "elapsed", "best")


class RunExistsError(RuntimeError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


class CheckpointMissingError(RunExistsError):
    """``--resume`` on a run whose checkpoint is gone while its log shows one was written."""


class RunLockedError(RuntimeError):
    """Another live process is writing the same run folder."""


class ResumeConfigError(ConfigError):
    """``--resume`` with a configuration that differs from the saved one where it matters."""


class DivergedError(FloatingPointError):
    """The loss, a gradient or a weight became NaN or inf; the last checkpoint is finite.

    ``step`` is the step at which it was detected, ``what`` says what went non-finite.
    """

    def __init__(self, directory: Path, step: int, what: str, checkpoint_step: int | None):
        self.directory, self.step, self.what = directory, step, what
        kept = (f"the last checkpoint (step {checkpoint_step}) holds finite weights"
                if checkpoint_step is not None else "no checkpoint was written")
        super().__init__(f"{directory}: diverged at step {step}: {what}; {kept}")


# Top-level keys that say where a run lives and how its config was given, not what it is.
PROVENANCE = ("output", "run")


def flat_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``{"table.key": value}`` of a resolved config without its :data:`PROVENANCE` keys, in
    JSON form (``inf`` as ``"inf"``, as ``config.json`` and checkpoints hold it)."""
    cfg = json.loads(json.dumps(jsonable(cfg)))
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in PROVENANCE:
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


_ABSENT = "<absent>"


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key outside ``RESUMABLE_KEYS`` that differs."""
    old, cur = flat_config(saved), flat_config(new)
    keys = list(cur) + [k for k in old if k not in cur]
    return [(k, old.get(k, _ABSENT), cur.get(k, _ABSENT)) for k in keys
            if k not in RESUMABLE_KEYS and old.get(k, _ABSENT) != cur.get(k, _ABSENT)]


def _check_resume_config(directory: Path, saved: dict[str, Any], cfg: dict[str, Any],
                         where: str) -> None:
    """``ResumeConfigError`` listing each key of ``cfg`` that differs from the ``saved`` one."""
    changes = config_changes(saved, cfg)
    if changes:
        listed = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in changes)
        raise ResumeConfigError(
            f"{directory}: --resume with a configuration that differs from the one in its "
            f"{where}: {listed}. Only {', '.join(RESUMABLE_KEYS)} may change on --resume; "
            "restore the other keys, or pass --overwrite to start the run over")


@contextmanager
def _run_lock(directory: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``directory/.lock`` (``flock``, with ``pid@host`` inside) while the run writes.

    ``RunLockedError`` if a live process holds it. The lock dies with its process, so a lock
    file left by a killed run is taken over; the file is removed on a normal exit. A no-op
    where ``fcntl`` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        enabled = False
    if not enabled:
        yield
        return
    # the folders this call creates, deepest first (the run's, and the experiment's when new)
    created = [folder for folder in (directory, *directory.parents) if not folder.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 200).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunLockedError(
                f"{directory} is being written by another process (pid@host: {owner}); "
                "stop it first (e.g. a sweep worker left running), then run again") from None
        try:  # the holder may have removed the file between our open and flock: retry
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
        yield
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)
        # a run that wrote nothing (a data error, say) leaves no empty folder
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run's files, or another run's folder
                break


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; a cuda device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: expected an available device, got {name!r} "
                         "(no CUDA device here; use 'cpu' or 'auto')")
    return device


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch: int) -> tuple[float, float | None]:
    """Mean test loss and accuracy over the task's test set."""
    model.eval()
    total, correct, count = 0.0, 0.0, 0
    for x, y in task.test_batches(batch):
        loss, acc = task.loss(model(x), y)
        total += loss.item() * len(y)
        correct += (acc or 0.0) * len(y)
        count += len(y)
    model.train()
    return total / count, correct / count


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _run_file(name: str) -> bool:
    """Whether ``name`` is a file a run writes: one of :data:`RUN_FILES`, or a temporary
    one of theirs that a kill left behind (``.<name>.*.tmp``)."""
    return name in RUN_FILES or any(
        name.startswith(f".{f}.") and name.endswith(".tmp") for f in RUN_FILES)


def _prepare_folder(directory: Path, resume: bool, overwrite: bool) -> bool:
    """Whether a checkpoint to resume from exists; when overwriting, deletes the run's own
    files (:func:`_run_file`), and only those: anything else kept in the folder stays."""
    existing = [directory / f for f in RUN_FILES if (directory / f).exists()]
    if overwrite:
        for entry in directory.iterdir() if directory.is_dir() else []:
            if _run_file(entry.name) and not entry.is_dir():
                entry.unlink(missing_ok=True)
        return False
    if resume:
        return (directory / "checkpoint.pt").exists()
    if any(p.name != "config.json" for p in existing):
        raise RunExistsError(
            f"{directory} already holds a run; pass --resume to continue it or --overwrite "
            "to start it over"
        )
    return False


def _missing_checkpoint(directory: Path, saved: dict[str, Any] | None) -> str | None:
    """Why ``--resume`` must not start a run without a checkpoint over; ``None`` if it may.

    It may when the log holds no step, or no more than a run killed before its first
    checkpoint logs: ``config.json`` (``saved``) present, no ``final.json``, and no record
    past its first checkpoint step ``min(checkpoint_every, steps)`` (a record at that step:
    killed while the checkpoint was written). Those records are computed again. Otherwise a
    checkpoint was written and is gone, and starting over would rewrite ``metrics.jsonl``.
    """
    steps = [r["step"] for r in read_jsonl(directory / "metrics.jsonl")
             if isinstance(r.get("step"), int)]
    if not steps:
        return None
    try:
        first = min(int(saved["train"]["checkpoint_every"]), int(saved["train"]["steps"]))
    except (TypeError, KeyError, ValueError):
        first = None
    if (directory / "final.json").exists():
        why = "final.json says the run finished, so it wrote a checkpoint"
    elif first is None:
        why = "config.json is missing or incomplete"
    elif max(steps) > first:
        why = f"its first checkpoint was due at step {first}"
    else:
        return None
    return (f"{directory}: --resume: checkpoint.pt is missing, but metrics.jsonl holds "
            f"{len(steps)} logged steps (up to step {max(steps)}) and {why}; starting over "
            "would rewrite that log, so nothing was changed. Restore checkpoint.pt to continue "
            "the run, or pass --overwrite to start it over (this deletes the run's files: "
            "copy metrics.jsonl elsewhere first to keep it)")


def train(run: Run, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          callback: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``run`` to its last step and return its final record (see the module docstring).

    ``callback(step)`` is called after every step has been logged and checkpointed (tests use
    it to interrupt a run).
    """
    cfg = run.config
    tcfg = cfg["train"]
    directory = run.directory
    device = resolve_device(tcfg["device"])
    info = distributed.setup(device)
    if info.active and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        with _run_lock(directory, enabled=info.is_main):
            result = _train(run, cfg, tcfg, directory, device, info, resume, overwrite,
                            progress, callback)
    except BaseException:
        distributed.teardown(info)
        raise
    distributed.teardown(info, finished=True)
    return result


def _load_run_checkpoint(directory: Path) -> dict[str, Any]:
    """The run's checkpoint, checked for its format and keys (a clear error, not a KeyError)."""
    path = directory / "checkpoint.pt"
    # to the CPU, where it was written from: the random-number states (torch's, the task's
    # generator, CUDA's) must be CPU byte tensors, and load_state_dict moves the model's and
    # the optimizer's tensors to their parameters' device (mapped to a GPU, the states made
    # set_state raise a TypeError on every resumed GPU run)
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except (EOFError, pickle.UnpicklingError, RuntimeError) as e:  # empty, truncated, garbage
        raise ValueError(f"{path}: cannot read the checkpoint ({type(e).__name__}): the file "
                         "is empty, truncated or not one this harness wrote; remove it to start "
                         "the run over, or restore it") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: unknown checkpoint format {found!r}, "
                         f"expected {CHECKPOINT_FORMAT}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: expected a run checkpoint with the keys "
                         f"{', '.join(CHECKPOINT_KEYS)}; missing {', '.join(missing)}")
    return ckpt


def _nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers holding NaN or inf."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors
            if t.is_floating_point() or t.is_complex()
            if not bool(torch.isfinite(t).all())]


def _agree(info, bad: bool) -> bool:
    """Whether any rank saw ``bad`` (every rank gets the same answer, so all stop together)."""
    if not info.active:
        return bad
    return info.all_reduce_mean([1.0 if bad else 0.0])[0] > 0


def _train(run, cfg, tcfg, directory, device, info, resume, overwrite, progress, callback):
    if tcfg["threads"]:
        torch.set_num_threads(tcfg["threads"])
    seed, steps = tcfg["seed"], tcfg["steps"]
    task = build_task(cfg["task"], seed + 7919 * info.rank, device)  # data errors first
    # then model errors (an initial kernel outside a static map's image): before the folder
    # is touched, so that a run that cannot start writes or deletes nothing
    torch.manual_seed(seed)
    model = build_model(cfg["model"], cfg["optim"], task,
                        torch.Generator().manual_seed(seed)).to(device)
    optimizer = backend.build_optimizer(cfg["optim"], model, cfg["model"]["retraction"])
    has_checkpoint, saved_json, missing = False, None, None
    if info.is_main:
        has_checkpoint = _prepare_folder(directory, resume, overwrite)
        if resume and not has_checkpoint:
            if (directory / "config.json").exists():
                saved_json = json.loads((directory / "config.json").read_text())
            missing = _missing_checkpoint(directory, saved_json)
    has_checkpoint, saved_json, missing = info.all_gather(
        (has_checkpoint, saved_json, missing))[0]
    if missing is not None:  # every rank stops, before anything is written
        raise CheckpointMissingError(missing)
    ckpt = _load_run_checkpoint(directory) if has_checkpoint else None
    # --resume continues the saved run: check the config before writing anything
    if ckpt is not None:
        _check_resume_config(directory, json.loads(ckpt["config"]), cfg, "checkpoint")
        if int(ckpt["step"]) > steps:
            raise ResumeConfigError(
                f"{directory}: train.steps: expected at least {int(ckpt['step'])} (the step "
                f"of its checkpoint) on --resume, got {steps}")
    elif saved_json is not None:
        _check_resume_config(directory, saved_json, cfg, "config.json")
    if info.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "config.json", cfg)
    info.barrier()

    net: nn.Module = model
    if info.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    local_batch = max(1, math.ceil(tcfg["batch"] / info.world_size))
    log = MetricsLog(directory / "metrics.jsonl", enabled=info.is_main)

    step, elapsed, best = 0, 0.0, math.inf
    checkpoint_step: int | None = None
    acc = {"loss": 0.0, "accuracy": 0.0, "n": 0}
    if ckpt is None:
        log.truncate(0)  # --resume before the first checkpoint (_missing_checkpoint: None)
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        ranks = ckpt["ranks"]
        if len(ranks) != info.world_size:
            raise ValueError(f"{directory}: checkpoint written by {len(ranks)} processes, "
                             f"resumed with {info.world_size}")
        task.load_state_dict(ranks[info.rank]["task"])
        acc = dict(ranks[info.rank]["acc"])
        _set_rng_state(ckpt["rng"], device)
        step, elapsed, best = int(ckpt["step"]), float(ckpt["elapsed"]), float(ckpt["best"])
        checkpoint_step = step
        log.truncate(step)
        if ckpt["finished"] and step >= steps:  # nothing left to do
            if not info.is_main:
                return {}
            if (directory / "final.json").exists():
                return json.loads((directory / "final.json").read_text())
            final = {**_final(log, best, elapsed, step), "baseline": task.baseline}
            write_json(directory / "final.json", final)  # killed before it was written
            return final
        del ckpt

    def diverged(at: int, what: str, loss: float | None = None) -> DivergedError:
        """Mark the divergence in the log and return the error to raise."""
        record: dict[str, Any] = {"step": at, "diverged": what}
        if loss is not None:
            record["loss"] = loss
        log.append(record)
        return DivergedError(directory, at, what, checkpoint_step)

    def save(finished: bool) -> None:
        nonlocal checkpoint_step
        bad = _nonfinite_tensors(model)
        if _agree(info, bool(bad)):  # never replace a good checkpoint by a diverged one
            raise diverged(step, "non-finite weights (NaN or inf) in "
                           f"{', '.join(bad[:5]) or 'another process'}")
        ranks = info.all_gather({"task": task.state_dict(), "acc": dict(acc)})
        if info.is_main:
            save_checkpoint(directory / "checkpoint.pt", {
                "format": CHECKPOINT_FORMAT, "step": step, "finished": finished,
                "config": json.dumps(cfg), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "ranks": ranks,
                "rng": _rng_state(device), "elapsed": elapsed, "best": best,
            })
        checkpoint_step = step

    def log_record(evaluate_now: bool) -> None:
        """Log the mean loss (and accuracy) since the last record, the constraint error and
        the time at ``step``, with the test metrics when ``evaluate_now``."""
        nonlocal acc, best, record
        mean_loss, mean_acc = info.all_reduce_mean(
            [acc["loss"] / acc["n"], acc["accuracy"] / acc["n"]])
        if not math.isfinite(mean_loss):  # a rank's loss (torchrun; see below)
            raise diverged(step, f"mean loss is {mean_loss}", mean_loss)
        record = {"step": step, "loss": mean_loss,
                  "accuracy": mean_acc if task.has_accuracy else None,
                  "constraint_error": backend.constraint_error(model),
                  "seconds": elapsed}
        if evaluate_now:
            record["test_loss"], record["test_accuracy"] = evaluate(
                model, task, tcfg["eval_batch"])
        best = min(best, mean_loss)  # finite: checked above
        log.append(record)
        acc = {"loss": 0.0, "accuracy": 0.0, "n": 0}
        bar.update(step, loss=mean_loss, baseline=task.baseline,
                   acc=record["accuracy"], err=record["constraint_error"])

    bar = ProgressBar(steps, desc=f"{cfg['name']}/{run.name}", start=step,
                      enabled=progress and info.is_main)
    record: dict[str, Any] = {}
    with bar:
        while step < steps:
            t0 = time.perf_counter()
            x, y = task.batch(local_batch)
            loss, accuracy = task.loss(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = loss.item()
            # one process: stop before stepping on a non-finite loss. Under torchrun no
            # collective per step: the ranks agree at the log steps (the logged mean loss)
            # and before each checkpoint (the weights), which are the same on every rank
            if not info.active and not math.isfinite(loss_value):
                raise diverged(step + 1, f"loss is {loss_value}", loss_value)
            if cfg["optim"]["clip_grad"] > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg["optim"]["clip_grad"])
            try:
                optimizer.step()
            except FloatingPointError as e:  # dtriv's NonFiniteGradientError
                what = re.sub(r" (at|after) step \d+", "", str(e).split(";")[0])
                raise diverged(step + 1, what) from e
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - t0
            step += 1
            acc["loss"] += loss_value
            acc["accuracy"] += accuracy if accuracy is not None else 0.0
            acc["n"] += 1

            evaluate_now = task.has_test_set and (
                step == steps or (tcfg["eval_every"] and step % tcfg["eval_every"] == 0))
            if step % tcfg["log_every"] == 0 or step == steps or evaluate_now:
                log_record(evaluate_now)
            if step % tcfg["checkpoint_every"] == 0 and step < steps:
                save(finished=False)
            if callback is not None:
                callback(step)
        if acc["n"]:
            # resumed from a checkpoint at the last step (train.steps lowered to its step on
            # --resume) that fell between two log steps: the end-of-run record and test
            # evaluation of an uninterrupted run to this step, from the saved accumulators
            log_record(task.has_test_set)
        save(finished=True)
    if not info.is_main:  # rank 0 alone logs, and reports the final record
        return {}
    final = {**_final(log, best, elapsed, step), "baseline": task.baseline}
    write_json(directory / "final.json", final)
    return final


def _final(log: MetricsLog, best: float, elapsed: float, step: int) -> dict[str, Any]:
    records = log.records()
    last = records[-1] if records else {"step": step}
    return {**last, "best_loss": best, "time_per_step": elapsed / max(step, 1)}
