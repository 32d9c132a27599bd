"""Shared fixtures of the retraction tests: seeded random skew, orthogonal and tangent data."""

from __future__ import annotations

import math

import pytest
import torch

from dtriv.retractions import _scratch


def _randn(*shape, dtype, generator):
    if dtype.is_complex:
        real = torch.empty((), dtype=dtype).real.dtype
        parts = torch.randn(*shape, 2, dtype=real, generator=generator)
        return torch.view_as_complex(parts.contiguous())
    return torch.randn(*shape, dtype=dtype, generator=generator)


@pytest.fixture
def fresh_scratch():
    """The thread's scratch pool empty before and after the test (tests of what it keeps)."""
    _scratch.clear()
    yield
    _scratch.clear()


@pytest.fixture
def gen():
    """A seeded generator, fresh for every test."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def randn(gen):
    """``randn(*shape, dtype=float64)``: a seeded standard normal tensor (complex supported)."""

    def make(*shape, dtype=torch.float64):
        return _randn(*shape, dtype=dtype, generator=gen)

    return make


@pytest.fixture
def random_skew(randn):
    """``random_skew(*batch, n, dtype, radius)``: skew-Hermitian with spectral radius ``radius``."""

    def make(*shape, dtype=torch.float64, radius=None):
        X = randn(*shape[:-1], shape[-1], shape[-1], dtype=dtype)
        A = X - X.mH
        if radius is not None:
            norm = torch.linalg.matrix_norm(A, ord=2, keepdim=True)
            A = A / torch.where(norm > 0, norm, 1) * radius
        return A

    return make


@pytest.fixture
def random_orthogonal(random_skew):
    """``random_orthogonal(*batch, n, dtype)``: e^A for skew A with spectral radius 0.9 pi."""

    def make(*shape, dtype=torch.float64, radius=0.9 * math.pi):
        return torch.linalg.matrix_exp(random_skew(*shape, dtype=dtype, radius=radius))

    return make


@pytest.fixture
def random_stiefel(randn):
    """``random_stiefel(*batch, n, k, dtype)``: orthonormal columns (q-factor of a Gaussian)."""

    def make(*shape, dtype=torch.float64):
        return torch.linalg.qr(randn(*shape, dtype=dtype))[0]

    return make


class _CountProducts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the products of two n x n matrices (mm, addmm, bmm, baddbmm, in place or not)."""

    PRODUCTS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}

    def __init__(self, n):
        super().__init__()
        self.n, self.count = n, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.PRODUCTS:
            x, y = (args[1], args[2]) if name.startswith(("add", "badd")) else args[:2]
            if x.shape[-2:] == y.shape[-2:] == (self.n, self.n):
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_products():
    """``count_products(n)``: a context whose ``count`` is the number of n x n by n x n
    products run inside it (the cost a docstring states, counted, not timed)."""
    return _CountProducts
