"""Every use of the ``dtriv`` library by the harness, in one place.

The rest of ``experiments`` builds plain PyTorch modules and calls only the functions
below to constrain a recurrent kernel, build the optimizer and measure constraint
errors, so a change of a library name touches this file alone.

dtriv names used: ``dtriv.manifolds.{Orthogonal, SpecialOrthogonal, generator_init}``,
``Manifold.{retractions, distance, sample}``, ``dtriv.parametrize.{constrain,
trivializations, Trivialization, is_parametrized, cached}``,
``dtriv.optim.{DynamicTrivialization, ManifoldParameter, RiemannianSGD,
RiemannianAdam}``; the once-per-forward cache is
``dtriv.parametrize.cached`` (torch's ``torch.nn.utils.parametrize.cached``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from .config import ConfigError

__all__ = [
    "MANIFOLDS",
    "INITS",
    "make_manifold",
    "retractions_of",
    "once_per_forward",
    "constrain_kernel",
    "manifold_kernel",
    "constrained_parameters",
    "dynamic_trivializations",
    "constraint_error",
    "kernel_initial_value",
    "build_optimizer",
]

MANIFOLDS = ("orthogonal", "special_orthogonal")
INITS = ("henaff", "cayley", "haar")
OPTIMIZERS = ("rmsprop", "adam", "sgd", "riemannian_sgd", "riemannian_adam")


def make_manifold(name: str, n: int):
    """The square manifold ``name`` (``MANIFOLDS``) of ``n x n`` matrices."""
    from dtriv.manifolds import Orthogonal, SpecialOrthogonal

    if name == "orthogonal":
        return Orthogonal(n)
    if name == "special_orthogonal":
        return SpecialOrthogonal(n)
    raise ValueError(f"manifold: expected one of {', '.join(MANIFOLDS)}, got {name!r}")


def retractions_of(name: str, n: int = 4) -> tuple[str, ...]:
    """The retraction names the manifold ``name`` accepts (``Manifold.retractions``)."""
    return tuple(make_manifold(name, n).retractions)


def once_per_forward() -> AbstractContextManager:
    """Context in which each parametrized weight is computed once and then reused."""
    from dtriv.parametrize import cached

    return cached()


def kernel_initial_value(manifold, init: str, generator: torch.Generator,
                         dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
    """``(W, A)``: the initial kernel and, for the Lie-algebra inits, its skew generator.

    ``henaff``/``cayley``: ``A = generator_init(n, init)`` (2x2 blocks ``[[0, s], [-s, 0]]``)
    and ``W = expm(A)`` (computed in float64); ``haar``: ``W = manifold.sample()``, ``A = None``.
    """
    from dtriv.manifolds import generator_init

    n = manifold.shape[-1]
    if init == "haar":
        return manifold.sample(generator=generator, dtype=dtype), None
    if init not in INITS:
        raise ValueError(f"init: expected one of {', '.join(INITS)}, got {init!r}")
    A = generator_init(n, init, generator=generator, dtype=torch.float64)
    # expm in float64, then cast: float32 matrix_exp can be off the group by ~3e-5
    return torch.linalg.matrix_exp(A).to(dtype), A.to(dtype)


def constrain_kernel(linear: nn.Linear, manifold, retraction: str, dynamic: bool, init: str,
                     generator: torch.Generator) -> None:
    """Constrain ``linear.weight`` to ``manifold`` through a dtriv trivialization.

    Dynamic: the base starts at the initial kernel ``W0`` and the parameter at 0.
    Static (``dynamic=False``, K = infinity): ``W = map(A)`` of a free skew ``A``; with the
    exponential map the parameter starts at the generator ``A`` itself (``expm(A) = W0``),
    otherwise at the map's inverse of ``W0``.
    """
    from dtriv.parametrize import constrain

    W0, A = kernel_initial_value(manifold, init, generator, linear.weight.dtype)
    with torch.no_grad():
        # The registration calls right_inverse on the current weight: start from a point of
        # the manifold (the identity for static maps, whose inverse at I is 0).
        linear.weight.copy_(W0 if dynamic else torch.eye(W0.shape[-1], dtype=W0.dtype))
    constrain(linear, "weight", manifold, retraction=retraction, dynamic=dynamic)
    if not dynamic:
        with torch.no_grad():
            if retraction == "expm" and A is not None:
                linear.parametrizations.weight.original.copy_(A)
            else:
                try:
                    linear.weight = W0
                except ValueError as err:  # W0 outside the image of the map at I
                    # a combination of keys that cannot run: a config error (one line in a
                    # sweep's summary, exit status 2), found only once the kernel is drawn
                    raise ConfigError(
                        f"model.init = {init!r} with model.retraction = {retraction!r} and "
                        "optim.K = inf (a static map at the identity): the initial kernel is "
                        f"not in the map's image ({err}); use a finite optim.K (the base "
                        "starts at the initial kernel), or model.retraction = 'expm' with "
                        "init 'henaff' or 'cayley' (the map starts from their generator)"
                    ) from err


def manifold_kernel(linear: nn.Linear, manifold, init: str, generator: torch.Generator) -> None:
    """Replace ``linear.weight`` by a ``ManifoldParameter`` on ``manifold`` (Riemannian optim)."""
    from dtriv.optim import ManifoldParameter

    W0, _ = kernel_initial_value(manifold, init, generator, linear.weight.dtype)
    linear.weight = ManifoldParameter(W0, manifold)


def _manifold_parameters(model: nn.Module) -> Iterator[tuple[nn.Parameter, Any]]:
    from dtriv.optim import ManifoldParameter

    for p in model.parameters():
        if isinstance(p, ManifoldParameter):
            yield p, p.manifold


def _trivialized(model: nn.Module) -> Iterator[tuple[nn.Module, str, Any]]:
    """``(module, name, trivialization)`` for every dtriv trivialization, static ones included.

    (``dtriv.parametrize.trivializations`` yields the dynamic ones, those an optimizer
    wrapper refreshes.)
    """
    from dtriv.parametrize import Trivialization, is_parametrized

    for module in model.modules():
        if is_parametrized(module):
            for name, plist in module.parametrizations.items():
                for parametrization in plist:
                    if isinstance(parametrization, Trivialization):
                        yield module, name, parametrization


def constrained_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters behind a constrained weight (trivialization originals, ManifoldParameters)."""
    params = list({id(p): p for p in (module.parametrizations[name].original
                                      for module, name, _ in _trivialized(model))}.values())
    params += [p for p, _ in _manifold_parameters(model)]
    return params


def dynamic_trivializations(model: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """The trivializations an optimizer wrapper refreshes (``dtriv.parametrize``'s view)."""
    from dtriv.parametrize import trivializations

    return list(trivializations(model))


@torch.no_grad()
def constraint_error(model: nn.Module) -> float | None:
    """Largest ``manifold.distance(W)`` over the constrained weights; ``None`` if there are none."""
    errors = [float(triv.manifold.distance(getattr(module, name)).max())
              for module, name, triv in _trivialized(model)]
    errors += [float(manifold.distance(p).max()) for p, manifold in _manifold_parameters(model)]
    return max(errors) if errors else None


def build_optimizer(cfg: dict[str, Any], model: nn.Module, retraction: str | None = None):
    """The optimizer of a validated ``[optim]`` table for ``model``.

    Constrained parameters get ``lr_orth``, all others ``lr``. ``rmsprop``/``adam``/``sgd``
    are torch optimizers; when the model has dynamic trivializations and ``K`` is finite
    they are wrapped in ``DynamicTrivialization(optimizer, K)``, which refreshes the bases
    every ``K`` steps. ``riemannian_sgd``/``riemannian_adam`` step ``ManifoldParameter``s by
    Riemannian gradient, retraction (``retraction``) and transport.
    """
    name = cfg["name"]
    constrained = constrained_parameters(model)
    ids = {id(p) for p in constrained}
    others = [p for p in model.parameters() if id(p) not in ids]
    groups = [g for g in ({"params": constrained, "lr": cfg["lr_orth"]},
                          {"params": others, "lr": cfg["lr"]}) if g["params"]]
    if name == "rmsprop":
        opt = torch.optim.RMSprop(groups, lr=cfg["lr"], alpha=cfg["alpha"],
                                  momentum=cfg["momentum"])
    elif name == "adam":
        opt = torch.optim.Adam(groups, lr=cfg["lr"])
    elif name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])
    elif name == "riemannian_sgd":
        from dtriv.optim import RiemannianSGD

        return RiemannianSGD(groups, lr=cfg["lr"], momentum=cfg["momentum"],
                             retraction=retraction)
    elif name == "riemannian_adam":
        from dtriv.optim import RiemannianAdam

        return RiemannianAdam(groups, lr=cfg["lr"], retraction=retraction)
    else:
        raise ValueError(f"optim.name: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    K = cfg["K"]
    if not math.isinf(K) and dynamic_trivializations(model):
        from dtriv.optim import DynamicTrivialization

        return DynamicTrivialization(opt, K=int(K), state=cfg["state"], modules=model)
    return opt
