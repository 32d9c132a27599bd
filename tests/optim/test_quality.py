"""Optimisation quality against closed forms: top eigenvectors on Stiefel(200, 5), the
leading eigenvector on the sphere and orthogonal Procrustes on O(50), in float32, with the
wrapper (Adam, K = 1, 10, 100) and with RiemannianAdam."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dtriv.manifolds import Manifold, Orthogonal, Sphere, Stiefel
from dtriv.optim import DynamicTrivialization, ManifoldParameter, RiemannianAdam
from dtriv.parametrize import constrain

F64, F32 = torch.float64, torch.float32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class Problem:
    manifold: Manifold
    start: torch.Tensor  # float64 point
    data: torch.Tensor  # float64 matrix of the objective
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (W, data) -> loss
    optimum: float  # closed-form minimum of the loss


def _quadratic(W, A):
    return -(W * (A @ W)).sum()


def eigenvectors(n: int = 200, k: int = 5, seed: int = 0) -> Problem:
    """min -tr(W^T A W) on Stiefel(n, k) (sphere for k = 1): minus the sum of the top k
    eigenvalues (Ky Fan), by eigvalsh."""
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    spectrum = torch.cat([torch.tensor([10.0, 9.5, 9.0, 8.5, 8.0], dtype=F64)[:k],
                          5 * torch.rand(n - k, generator=g, dtype=F64)])
    A = (Q * spectrum) @ Q.T
    A = (A + A.T) / 2
    manifold = Stiefel(n, k) if k > 1 else Sphere(n)
    start = manifold.sample(generator=_gen(seed + 1), dtype=F64)
    optimum = -torch.linalg.eigvalsh(A)[-k:].sum().item()
    return Problem(manifold, start, A, _quadratic, optimum)


def procrustes(n: int = 50, m: int = 100, seed: int = 0) -> Problem:
    """min ||A Q - B||^2 on O(n), i.e. min -tr(Q^T A^T B): minus the nuclear norm of A^T B,
    attained at U V^T (SVD A^T B = U S V^T). The start is taken in the connected component
    of U V^T (same determinant), which a trivialization cannot leave."""
    g = _gen(seed)
    A = torch.randn(m, n, generator=g, dtype=F64)
    Q_true, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    B = A @ Q_true + 0.5 * torch.randn(m, n, generator=g, dtype=F64)
    M = A.T @ B
    U, S, Vh = torch.linalg.svd(M)
    manifold = Orthogonal(n)
    start = manifold.sample(generator=_gen(seed + 1), dtype=F64)
    if torch.linalg.det(start) * torch.linalg.det(U @ Vh) < 0:
        start[:, 0] = -start[:, 0]
    return Problem(manifold, start, M, lambda Q, M: -(Q * M).sum(), -S.sum().item())


PROBLEMS = {
    "eigenvectors": eigenvectors,
    "sphere": lambda: eigenvectors(k=1),
    "procrustes": procrustes,
}
METHODS = [("wrapper", 1), ("wrapper", 10), ("wrapper", 100), ("radam", None)]


class _Holder(nn.Module):
    def __init__(self, X: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(X.clone())


def solve(problem: Problem, method: str, K, steps: int, dtype=F32):
    """Optimise with a cosine learning-rate schedule; returns (relative gap, constraint error)."""
    data = problem.data.to(dtype)
    if method == "wrapper":
        holder = _Holder(problem.start.to(dtype))
        constrain(holder, "w", problem.manifold)
        # default settings: every refresh polishes the base back to rounding level
        opt = DynamicTrivialization(torch.optim.Adam(holder.parameters(), lr=0.05), K=K,
                                    modules=holder)

        def point():
            return holder.w
    else:
        p = ManifoldParameter(problem.start.to(dtype, copy=True), problem.manifold)
        # one second moment per point: the step has norm ~ lr, so lr is larger than Adam's
        opt = RiemannianAdam([p], lr=1.0, stabilize=20)

        def point():
            return p
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        problem.objective(point(), data).backward()
        opt.step()
        schedule.step()
    W = point().detach()
    value = problem.objective(W.to(F64), problem.data).item()
    gap = abs(value - problem.optimum) / abs(problem.optimum)
    return gap, problem.manifold.distance(W).max().item()


@pytest.fixture(scope="module")
def problems():
    return {name: make() for name, make in PROBLEMS.items()}


@pytest.mark.parametrize("method,K", METHODS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_reaches_the_optimum(problems, name, method, K):
    gap, error = solve(problems[name], method, K, steps=300)
    assert gap < 1e-4, gap
    assert error < 1e-5, error


@pytest.mark.slow
@pytest.mark.parametrize("method,K", METHODS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_reaches_the_optimum_and_stays_on_the_manifold_for_10000_steps(problems, name, method,
                                                                       K):
    gap, error = solve(problems[name], method, K, steps=10_000)
    assert gap < 1e-4, gap
    assert error < 1e-5, error
