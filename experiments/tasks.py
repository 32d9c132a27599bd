"""The benchmark tasks of the orthogonal-RNN literature, as seeded batch generators.

Every task draws its batches from its own ``torch.Generator`` (seeded from the run's seed),
so a run is reproducible and its data stream can be checkpointed (:meth:`Task.state_dict`).

* :class:`CopyingTask` (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016; expRNN):
  input ``s_1..s_10, 0 x L, 9, 0 x 9`` with ``s_i ~ U{1..8}``; target ``0 x (L+10), s_1..s_10``;
  length ``L + 20``; cross-entropy over all positions. A memoryless model predicts blanks
  and then a uniform guess over 8 symbols: loss ``10 log 8 / (L + 20)``.
* :class:`AddingTask` (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016): ``T`` steps of
  ``(value ~ U(0, 1), mark)``, one mark in each half; target the sum of the two marked
  values; MSE. Predicting 1 always gives ``Var(u_1 + u_2) = 1/6 ~ 0.167``.
* :class:`PixelTask`: sequential pixel classification (one pixel per step, label at the
  end), optionally with a fixed seeded permutation of the pixels (permuted MNIST);
  chance level ``log 10``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Task",
    "CopyingTask",
    "AddingTask",
    "PixelTask",
    "copying_batch",
    "adding_batch",
    "copying_baseline",
    "ADDING_BASELINE",
    "build_task",
    "baseline_of",
]

ADDING_BASELINE = 1.0 / 6.0


def copying_baseline(length: int, n_symbols: int = 8, n_recall: int = 10) -> float:
    """Cross-entropy of the memoryless strategy: ``n_recall log(n_symbols) / (L + 2 n_recall)``."""
    return n_recall * math.log(n_symbols) / (length + 2 * n_recall)


def copying_batch(batch: int, length: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Token sequences ``(x, y)`` of the copying task, both ``(batch, L + 20)`` int64.

    ``x = s_1..s_10, 0 x L, 9, 0 x 9`` and ``y = 0 x (L + 10), s_1..s_10`` with
    ``s_i ~ U{1..8}`` drawn from ``generator``.
    """
    symbols = torch.randint(1, 9, (batch, 10), generator=generator)
    x = torch.zeros(batch, length + 20, dtype=torch.int64)
    y = torch.zeros(batch, length + 20, dtype=torch.int64)
    x[:, :10] = symbols
    x[:, length + 10] = 9
    y[:, length + 10:] = symbols
    return x.to(device), y.to(device)


def adding_batch(batch: int, length: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Adding-problem batch: ``x`` ``(batch, T, 2)`` (value, mark) and ``y`` ``(batch, 1)``.

    Values ``~ U(0, 1)``; one mark at ``i ~ U{0..T/2-1}``, one at ``j ~ U{T/2..T-1}``
    (``T/2`` rounded down); ``y = x[i, 0] + x[j, 0]``.
    """
    if length < 2:
        raise ValueError(f"task.length: expected >= 2 for the adding problem, got {length}")
    half = length // 2
    values = torch.rand(batch, length, generator=generator)
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, length, (batch,), generator=generator)
    marks = torch.zeros(batch, length)
    rows = torch.arange(batch)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    x = torch.stack([values, marks], dim=-1)
    y = (values[rows, first] + values[rows, second]).unsqueeze(-1)
    return x.to(device), y.to(device)


class Task:
    """A batch generator with a loss, an accuracy, a baseline and a checkpointable state.

    ``input_size``/``output_size`` size the model; ``output`` is ``"sequence"`` (one
    prediction per step) or ``"last"`` (one at the end).
    """

    name: str = "task"
    input_size: int
    output_size: int
    output: str
    seq_len: int
    baseline: float
    baseline_name: str
    has_test_set: bool = False
    #: whether :meth:`loss` returns an accuracy (``None`` otherwise: a regression)
    has_accuracy: bool = True

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(int(seed))

    def batch(self, batch: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> tuple[Tensor, float | None]:
        """``(loss, accuracy)`` of a model ``output`` against ``target``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


class CopyingTask(Task):
    """Copying memory with ``L`` blanks (see the module docstring); one-hot inputs (10 tokens)."""

    name = "copying"
    input_size = 10
    output_size = 9
    output = "sequence"
    baseline_name = "memoryless 10 log 8 / (L + 20)"

    def __init__(self, length: int, seed: int, device: torch.device | str = "cpu") -> None:
        super().__init__(seed, device)
        self.length = int(length)
        self.seq_len = self.length + 20
        self.baseline = copying_baseline(self.length)

    def batch(self, batch: int) -> tuple[Tensor, Tensor]:
        x, y = copying_batch(batch, self.length, self.generator)
        return F.one_hot(x, self.input_size).float().to(self.device), y.to(self.device)

    def loss(self, output: Tensor, target: Tensor) -> tuple[Tensor, float | None]:
        loss = F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
        recall = output[:, -10:].argmax(-1) == target[:, -10:]
        return loss, recall.float().mean().item()


class AddingTask(Task):
    """Adding problem of length ``T`` (see the module docstring)."""

    name = "adding"
    input_size = 2
    output_size = 1
    output = "last"
    baseline = ADDING_BASELINE
    baseline_name = "predict 1: Var = 1/6"
    has_accuracy = False

    def __init__(self, length: int, seed: int, device: torch.device | str = "cpu") -> None:
        super().__init__(seed, device)
        self.length = int(length)
        self.seq_len = self.length

    def batch(self, batch: int) -> tuple[Tensor, Tensor]:
        x, y = adding_batch(batch, self.length, self.generator)
        return x.to(self.device), y.to(self.device)

    def loss(self, output: Tensor, target: Tensor) -> tuple[Tensor, float | None]:
        return F.mse_loss(output, target), None


class PixelTask(Task):
    """Sequential (optionally permuted) pixel classification, one pixel per step.

    Training batches walk through seeded random permutations of the training set (epochs);
    the permutation and position are part of the checkpointed state.
    """

    input_size = 1
    output_size = 10
    output = "last"
    baseline = math.log(10)
    baseline_name = "chance log 10"
    has_test_set = True

    def __init__(self, data: dict[str, Tensor], seed: int, permuted: bool = False,
                 permute_seed: int = 0, device: torch.device | str = "cpu",
                 name: str = "digits") -> None:
        super().__init__(seed, device)
        self.name = name + ("-permuted" if permuted else "")
        self.x_train, self.y_train = data["x_train"], data["y_train"]
        self.x_test, self.y_test = data["x_test"], data["y_test"]
        self.seq_len = self.x_train.shape[1]
        self.pixel_order: Tensor | None = None
        if permuted:
            self.pixel_order = torch.randperm(
                self.seq_len, generator=torch.Generator().manual_seed(int(permute_seed))
            )
        self._order = torch.randperm(len(self.x_train), generator=self.generator)
        self._pos = 0

    def _prepare(self, x: Tensor) -> Tensor:
        if self.pixel_order is not None:
            x = x[:, self.pixel_order]
        return x.unsqueeze(-1).to(self.device)

    def batch(self, batch: int) -> tuple[Tensor, Tensor]:
        idx = []
        need = batch
        while need > 0:
            if self._pos >= len(self._order):
                self._order = torch.randperm(len(self.x_train), generator=self.generator)
                self._pos = 0
            take = self._order[self._pos:self._pos + need]
            self._pos += len(take)
            need -= len(take)
            idx.append(take)
        index = torch.cat(idx)
        return self._prepare(self.x_train[index]), self.y_train[index].to(self.device)

    def test_batches(self, batch: int):
        """The test set in order, in batches of ``batch``."""
        for start in range(0, len(self.x_test), batch):
            yield (self._prepare(self.x_test[start:start + batch]),
                   self.y_test[start:start + batch].to(self.device))

    def loss(self, output: Tensor, target: Tensor) -> tuple[Tensor, float | None]:
        loss = F.cross_entropy(output, target)
        return loss, (output.argmax(-1) == target).float().mean().item()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self._order.clone(),
                "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._order = state["order"].clone()
        self._pos = int(state["pos"])


def baseline_of(task_cfg: dict[str, Any]) -> tuple[float, str]:
    """``(value, description)`` of the baseline loss of a ``[task]`` table."""
    name = task_cfg["name"]
    if name == "copying":
        return copying_baseline(task_cfg["length"]), CopyingTask.baseline_name
    if name == "adding":
        return ADDING_BASELINE, AddingTask.baseline_name
    return PixelTask.baseline, PixelTask.baseline_name


def build_task(cfg: dict[str, Any], seed: int, device: torch.device | str = "cpu") -> Task:
    """The task a validated ``[task]`` table describes."""
    from . import data

    name = cfg["name"]
    if name == "copying":
        return CopyingTask(cfg["length"], seed, device)
    if name == "adding":
        return AddingTask(cfg["length"], seed, device)
    if name == "digits":
        loaded = data.load_sklearn_digits()
    elif name == "mnist":
        loaded = data.load_mnist(cfg["path"])
    else:  # validated earlier; kept for direct callers
        raise ValueError(f"task.name: expected copying, adding, digits or mnist, got {name!r}")
    return PixelTask(loaded, seed, permuted=cfg["permuted"], permute_seed=cfg["permute_seed"],
                     device=device, name=name)
