"""PyTorch's "Parametrizations tutorial", run through ``dtriv.parametrize`` imports alone.

Each claim of the tutorial is checked: symmetric and skew weights, Skew + Cayley is
orthogonal, Symmetric + matrix exponential is SPD, assignment through ``right_inverse``,
the pruning mask, ``cached()`` computing once, and ``remove_parametrizations`` with
``leave_parametrized`` True and False.
"""

from __future__ import annotations

import torch
from torch import nn

from dtriv.parametrize import (
    cached,
    is_parametrized,
    register_parametrization,
    remove_parametrizations,
)


class Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(-1, -2)


class Skew(nn.Module):
    def forward(self, X):
        A = X.triu(1)
        return A - A.transpose(-1, -2)

    def right_inverse(self, A):
        # A is assumed skew-symmetric; the forward only uses the upper triangle
        return A.triu(1)


class CayleyMap(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("Id", torch.eye(n, dtype=torch.float64))

    def forward(self, X):
        # (I + X)(I - X)^{-1}, written as a solve
        return torch.linalg.solve(self.Id - X, self.Id + X)

    def right_inverse(self, A):
        # A is assumed orthogonal: the inverse Cayley transform (A - I)(A + I)^{-1}, the
        # formula in the tutorial's comment. (The tutorial's code line,
        # solve(X + Id, Id - X), is its negative and would assign A^T instead of A.)
        return torch.linalg.solve(A + self.Id, A - self.Id)


class MatrixExponential(nn.Module):
    def forward(self, X):
        return torch.matrix_exp(X)


class PruningParametrization(nn.Module):
    def __init__(self, X, p_drop=0.2, generator=None):
        super().__init__()
        mask = torch.full_like(X, 1.0 - p_drop)
        self.mask = torch.bernoulli(mask, generator=generator)

    def forward(self, X):
        return X * self.mask

    def right_inverse(self, A):
        return A


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, X):
        self.calls += 1
        return X


def linear(n, m=None):
    return nn.Linear(n, n if m is None else m).double()


def test_symmetric_and_skew():
    torch.manual_seed(0)
    layer = linear(3)
    register_parametrization(layer, "weight", Symmetric())
    A = layer.weight
    assert torch.equal(A, A.T)
    assert is_parametrized(layer) and is_parametrized(layer, "weight")
    assert not is_parametrized(layer, "bias")

    layer = linear(3)
    register_parametrization(layer, "weight", Skew())
    A = layer.weight
    assert torch.equal(A, -A.T)
    # the parametrized class and the original tensor are reachable
    assert type(layer).__name__ == "ParametrizedLinear"
    assert layer.parametrizations.weight.original.shape == (3, 3)


def test_skew_then_cayley_is_orthogonal():
    torch.manual_seed(1)
    layer = linear(3)
    register_parametrization(layer, "weight", Skew())
    register_parametrization(layer, "weight", CayleyMap(3))
    X = layer.weight
    assert torch.dist(X.T @ X, torch.eye(3, dtype=X.dtype)) < 1e-12
    assert len(layer.parametrizations.weight) == 2


def test_skew_then_exp_is_orthogonal_and_symmetric_then_exp_is_spd():
    torch.manual_seed(2)
    layer = linear(3)
    register_parametrization(layer, "weight", Skew())
    register_parametrization(layer, "weight", MatrixExponential())
    X = layer.weight
    assert torch.dist(X.T @ X, torch.eye(3, dtype=X.dtype)) < 1e-12

    layer = linear(3)
    register_parametrization(layer, "weight", Symmetric())
    register_parametrization(layer, "weight", MatrixExponential())
    X = layer.weight
    assert torch.dist(X, X.T) < 1e-12
    assert bool((torch.linalg.eigvalsh(X) > 0).all())


def test_assignment_through_right_inverse():
    g = torch.Generator().manual_seed(3)
    layer = linear(3)
    register_parametrization(layer, "weight", Skew())
    X = torch.rand(3, 3, generator=g, dtype=torch.float64)
    X = X - X.T
    layer.weight = X
    assert torch.dist(layer.weight, X) < 1e-14

    layer = linear(3)
    register_parametrization(layer, "weight", Skew())
    register_parametrization(layer, "weight", CayleyMap(3))
    Q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64)).Q
    if Q.det() < 0:
        Q[0].neg_()
    layer.weight = Q
    assert torch.dist(layer.weight, Q) < 1e-12


def test_pruning_mask():
    g = torch.Generator().manual_seed(4)
    layer = linear(3, 4)
    X = torch.rand(layer.weight.shape, generator=g, dtype=torch.float64)
    pruning = PruningParametrization(layer.weight, generator=g)
    register_parametrization(layer, "weight", pruning)
    layer.weight = X
    assert torch.equal(layer.weight, X * pruning.mask)
    assert torch.equal(layer.weight == 0, (pruning.mask == 0) | (X == 0))
    assert torch.equal(layer.parametrizations.weight.original, X)


def test_cached_computes_once():
    torch.manual_seed(5)
    layer = linear(4)
    counter = Counting()
    register_parametrization(layer, "weight", counter)
    counter.calls = 0
    foo = layer.weight + layer.weight.T
    bar = layer.weight.sum()
    assert counter.calls == 3
    counter.calls = 0
    with cached():
        foo2 = layer.weight + layer.weight.T
        bar2 = layer.weight.sum()
    assert counter.calls == 1
    assert torch.equal(foo, foo2) and torch.equal(bar, bar2)
    # outside the context the value is recomputed again
    layer.weight
    assert counter.calls == 2


def test_remove_parametrizations_leave_parametrized():
    torch.manual_seed(6)
    layer = linear(3)
    register_parametrization(layer, "weight", Skew())
    skew_weight = layer.weight.detach().clone()
    remove_parametrizations(layer, "weight")  # leave_parametrized=True
    assert not is_parametrized(layer)
    assert type(layer) is nn.Linear
    assert isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight, skew_weight)
    assert torch.equal(layer.weight, -layer.weight.T)

    layer = linear(3)
    register_parametrization(layer, "weight", Skew())
    X = torch.randn(3, 3, dtype=torch.float64)
    layer.weight = X - X.T
    original = layer.parametrizations.weight.original.detach().clone()
    remove_parametrizations(layer, "weight", leave_parametrized=False)
    assert not is_parametrized(layer)
    # the unparametrized tensor is the original: the upper triangle given by right_inverse
    assert torch.equal(layer.weight, original)
    assert torch.equal(layer.weight, (X - X.T).triu(1))
