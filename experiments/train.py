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
and thread count). All files are written atomically (see :mod:`experiments.checkpoint`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import backend, distributed
from .checkpoint import MetricsLog, load_checkpoint, save_checkpoint, write_json
from .config import Run
from .models import build_model
from .progress import ProgressBar
from .tasks import Task, build_task

__all__ = ["train", "RunExistsError", "resolve_device", "RUN_FILES"]

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "final.json")
CHECKPOINT_FORMAT = 1


class RunExistsError(RuntimeError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


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


def _prepare_folder(directory: Path, resume: bool, overwrite: bool) -> bool:
    """Whether a checkpoint to resume from exists; clears the folder when overwriting."""
    existing = [directory / f for f in RUN_FILES if (directory / f).exists()]
    if overwrite:
        shutil.rmtree(directory, ignore_errors=True)
        return False
    if resume:
        return (directory / "checkpoint.pt").exists()
    if any(p.name != "config.json" for p in existing):
        raise RunExistsError(
            f"{directory} already holds a run; pass --resume to continue it or --overwrite "
            "to start it over"
        )
    return False


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
        result = _train(run, cfg, tcfg, directory, device, info, resume, overwrite, progress,
                        callback)
    except BaseException:
        distributed.teardown(info)
        raise
    distributed.teardown(info, finished=True)
    return result


def _train(run, cfg, tcfg, directory, device, info, resume, overwrite, progress, callback):
    if tcfg["threads"]:
        torch.set_num_threads(tcfg["threads"])
    seed, steps = tcfg["seed"], tcfg["steps"]
    task = build_task(cfg["task"], seed + 7919 * info.rank, device)  # data errors first
    has_checkpoint = False
    if info.is_main:
        has_checkpoint = _prepare_folder(directory, resume, overwrite)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "config.json", cfg)
    has_checkpoint = info.all_gather(has_checkpoint)[0]
    info.barrier()

    torch.manual_seed(seed)
    model = build_model(cfg["model"], cfg["optim"], task,
                        torch.Generator().manual_seed(seed)).to(device)
    optimizer = backend.build_optimizer(cfg["optim"], model, cfg["model"]["retraction"])
    net: nn.Module = model
    if info.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    local_batch = max(1, math.ceil(tcfg["batch"] / info.world_size))
    log = MetricsLog(directory / "metrics.jsonl", enabled=info.is_main)

    step, elapsed, best = 0, 0.0, math.inf
    acc = {"loss": 0.0, "accuracy": 0.0, "n": 0}
    if not has_checkpoint:
        log.truncate(0)  # --resume before the first checkpoint: start the log over
    if has_checkpoint:
        ckpt = load_checkpoint(directory / "checkpoint.pt", map_location=device)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{directory / 'checkpoint.pt'}: unknown checkpoint format "
                             f"{ckpt.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        saved = json.loads(ckpt["config"])
        if saved["run"]["name"] != cfg["run"]["name"] or saved["train"]["seed"] != seed:
            raise ValueError(f"{directory}: the checkpoint belongs to run "
                             f"{saved['run']['name']!r}, not {cfg['run']['name']!r}")
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
        log.truncate(step)
        if ckpt["finished"] and step >= steps:  # nothing left to do
            if not info.is_main:
                return {}
            if (directory / "final.json").exists():
                return json.loads((directory / "final.json").read_text())
            return {**_final(log, best, elapsed, step), "baseline": task.baseline}

    def save(finished: bool) -> None:
        ranks = info.all_gather({"task": task.state_dict(), "acc": dict(acc)})
        if info.is_main:
            save_checkpoint(directory / "checkpoint.pt", {
                "format": CHECKPOINT_FORMAT, "step": step, "finished": finished,
                "config": json.dumps(cfg), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "ranks": ranks,
                "rng": _rng_state(device), "elapsed": elapsed, "best": best,
            })

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
            if cfg["optim"]["clip_grad"] > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg["optim"]["clip_grad"])
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - t0
            step += 1
            acc["loss"] += loss.item()
            acc["accuracy"] += accuracy if accuracy is not None else 0.0
            acc["n"] += 1

            evaluate_now = task.has_test_set and (
                step == steps or (tcfg["eval_every"] and step % tcfg["eval_every"] == 0))
            if step % tcfg["log_every"] == 0 or step == steps or evaluate_now:
                mean_loss, mean_acc = info.all_reduce_mean(
                    [acc["loss"] / acc["n"], acc["accuracy"] / acc["n"]])
                record = {"step": step, "loss": mean_loss,
                          "accuracy": mean_acc if accuracy is not None else None,
                          "constraint_error": backend.constraint_error(model),
                          "seconds": elapsed}
                if evaluate_now:
                    record["test_loss"], record["test_accuracy"] = evaluate(
                        model, task, tcfg["eval_batch"])
                if math.isfinite(mean_loss):
                    best = min(best, mean_loss)
                log.append(record)
                acc = {"loss": 0.0, "accuracy": 0.0, "n": 0}
                bar.update(step, loss=mean_loss, baseline=task.baseline,
                           acc=record["accuracy"], err=record["constraint_error"])
                if not math.isfinite(mean_loss):  # the last checkpoint stays the good one
                    raise FloatingPointError(f"{directory}: loss {mean_loss} at step {step}")
            if step % tcfg["checkpoint_every"] == 0 and step < steps:
                save(finished=False)
            if callback is not None:
                callback(step)
        save(finished=True)
    final = _final(log, best, elapsed, step)
    if info.is_main:
        final["baseline"] = task.baseline
        write_json(directory / "final.json", final)
    return final


def _final(log: MetricsLog, best: float, elapsed: float, step: int) -> dict[str, Any]:
    records = log.records()
    last = records[-1] if records else {"step": step}
    return {**last, "best_loss": best, "time_per_step": elapsed / max(step, 1)}
