"""Recurrent models: the orthogonal RNN of expRNN and the tanh-RNN and LSTM baselines.

Orthogonal RNN (Lezcano-Casado & Martinez-Rubio 2019, "Cheap orthogonal constraints in
neural networks")::

    h_{t+1} = modReLU(W h_t + U x_t),      y_t = V h_t + c,
    modReLU(z) = sign(z) relu(|z| + b),    b ~ U(-0.01, 0.01),

with unconstrained input map ``U`` (Kaiming-normal init, no bias) and readout ``V, c``,
and ``W`` kept on the orthogonal group by a dtriv trivialization (or a Riemannian
optimizer). The cell reads ``W`` at every step (``self.recurrent(h)``), with no caching code:
dtriv's trivializations compute their value once per forward by default (their memo is
dropped when backward consumes it or a step changes the parameter), so the map (``expm``,
``cayley``, ...) is evaluated once per sequence, not once per step.
Cost per step: one ``n x n`` matrix-vector product per sequence in the batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import backend

__all__ = ["ModReLU", "OrthogonalRNN", "BaselineRNN", "build_model", "MODELS"]

MODELS = ("orthogonal", "rnn", "lstm")


class ModReLU(nn.Module):
    """``modReLU(z) = sign(z) relu(|z| + b)`` with a learned bias ``b ~ U(-0.01, 0.01)``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.empty(features))
        nn.init.uniform_(self.b, -0.01, 0.01)

    def forward(self, z: Tensor) -> Tensor:
        return torch.sign(z) * torch.relu(z.abs() + self.b)


class OrthogonalRNN(nn.Module):
    """``h_{t+1} = modReLU(W h_t + U x_t)`` with a readout per step or at the end.

    ``output="sequence"`` returns ``(batch, T, output_size)``, ``"last"`` ``(batch, output_size)``.
    ``self.recurrent.weight`` is ``W``; constrain it with :func:`backend.constrain_kernel`.
    """

    def __init__(self, input_size: int, hidden: int, output_size: int,
                 output: str = "sequence") -> None:
        super().__init__()
        if output not in ("sequence", "last"):
            raise ValueError(f"output: expected 'sequence' or 'last', got {output!r}")
        self.hidden, self.output = hidden, output
        self.input_kernel = nn.Linear(input_size, hidden, bias=False)
        nn.init.kaiming_normal_(self.input_kernel.weight, nonlinearity="relu")
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        self.nonlinearity = ModReLU(hidden)
        self.readout = nn.Linear(hidden, output_size)

    def forward(self, x: Tensor) -> Tensor:
        # all steps' inputs at once; unbind gives one backward node for all of them (indexing
        # inputs[:, t] would allocate a full (batch, T, hidden) gradient at every step)
        inputs = self.input_kernel(x).unbind(1)
        h = x.new_zeros(x.shape[0], self.hidden)
        states = []
        for u_t in inputs:
            # reads W at every step; the trivialization computes it once per forward
            h = self.nonlinearity(u_t + self.recurrent(h))
            if self.output == "sequence":
                states.append(h)
        if self.output == "sequence":
            return self.readout(torch.stack(states, dim=1))
        return self.readout(h)


class BaselineRNN(nn.Module):
    """A ``torch.nn.RNN`` (tanh) or ``torch.nn.LSTM`` with a linear readout."""

    def __init__(self, kind: str, input_size: int, hidden: int, output_size: int,
                 output: str = "sequence") -> None:
        super().__init__()
        cells = {"rnn": nn.RNN, "lstm": nn.LSTM}
        if kind not in cells:
            raise ValueError(f"kind: expected 'rnn' or 'lstm', got {kind!r}")
        kwargs = {"nonlinearity": "tanh"} if kind == "rnn" else {}
        self.rnn = cells[kind](input_size, hidden, batch_first=True, **kwargs)
        self.output = output
        self.readout = nn.Linear(hidden, output_size)

    def forward(self, x: Tensor) -> Tensor:
        states, _ = self.rnn(x)
        return self.readout(states if self.output == "sequence" else states[:, -1])


def build_model(model_cfg: dict[str, Any], optim_cfg: dict[str, Any], task,
                generator: torch.Generator) -> nn.Module:
    """The model of a validated config for ``task``; the orthogonal kernel is constrained here.

    With a torch optimizer the kernel is a trivialization (dynamic when ``optim.K`` is
    finite, static when it is ``inf``); with a Riemannian optimizer it is a
    ``ManifoldParameter``. ``generator`` draws the kernel's initialisation.
    """
    name = model_cfg["name"]
    if name in ("rnn", "lstm"):
        return BaselineRNN(name, task.input_size, model_cfg["hidden"], task.output_size,
                           task.output)
    if name != "orthogonal":
        raise ValueError(f"model.name: expected one of {', '.join(MODELS)}, got {name!r}")
    model = OrthogonalRNN(task.input_size, model_cfg["hidden"], task.output_size, task.output)
    manifold = backend.make_manifold(model_cfg["manifold"], model_cfg["hidden"])
    if optim_cfg["name"].startswith("riemannian"):
        backend.manifold_kernel(model.recurrent, manifold, model_cfg["init"], generator)
    else:
        backend.constrain_kernel(model.recurrent, manifold, model_cfg["retraction"],
                                 dynamic=not math.isinf(optim_cfg["K"]),
                                 init=model_cfg["init"], generator=generator)
    return model
