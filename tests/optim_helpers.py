"""Helpers shared by the optimizer tests (importable from every test module: ``tests`` is on
pytest's ``pythonpath``): seeded generators, a quadratic loss, a loop of optimizer steps."""

from __future__ import annotations

import torch


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def quadratic_loss(shape, dtype, seed, dim=-2):
    """``X -> -<X, A X> - <C, X>`` with a random symmetric ``A`` acting along dimension
    ``dim`` of ``X`` (``-2``: the columns of matrices; ``-1``: vectors) and a random ``C``
    of ``shape``: its Euclidean gradient is not tangent to the usual manifolds."""
    g = gen(seed)
    n = shape[dim]
    A = torch.randn(n, n, generator=g, dtype=dtype)
    A = A + A.mT
    C = torch.randn(*shape, generator=g, dtype=dtype)
    if dim == -2:
        return lambda X: -(X * (A @ X)).sum() - (C * X).sum()
    return lambda X: -(X * (X @ A)).sum() - (C * X).sum()


def run_steps(params, opt, loss, steps):
    """``steps`` steps of ``opt`` on ``sum(loss(p) for p in params)``; the final points
    (detached copies)."""
    for _ in range(steps):
        opt.zero_grad()
        sum(loss(p) for p in params).backward()
        opt.step()
    return [p.detach().clone() for p in params]
