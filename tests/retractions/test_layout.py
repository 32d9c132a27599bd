"""Padded rows for transposed reads: when they are used, and that every path through them
computes what the plain formulas compute."""

from __future__ import annotations

import pytest
import torch

from dtriv.optim import _stiefel
from dtriv.retractions import _layout
from dtriv.retractions._expm import skew_of, skew_of_adjoint
from dtriv.retractions._layout import (
    aliases,
    padded_empty,
    transposable,
    transposable_empty,
)
from dtriv.retractions._scratch import Arena
from dtriv.retractions.lie import cayley_of_skew, expm_of_skew

pytestmark = pytest.mark.usefixtures("fresh_scratch")


@pytest.fixture
def no_padding(monkeypatch):
    """The reference: no row stride counts as aliasing, every op reads ``X`` as it is."""
    def off():
        monkeypatch.setattr(_layout, "ALIASING_BYTES", 1 << 40)
    return off


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _padded(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.stride(-2) > t.shape[-1]


# ------------------------------------------------------------------------- when it applies
@pytest.mark.parametrize(("shape", "dtype", "expected"), [
    ((512, 512), torch.float32, True),      # 2 KiB rows
    ((128, 128), torch.float32, True),      # 512 B rows
    ((3, 256, 256), torch.float32, True),   # a batch
    ((256, 256), torch.float64, True),
    ((256, 256), torch.complex64, True),
    ((500, 500), torch.float32, False),     # 2000 B rows: no aliasing
    ((96, 96), torch.float32, False),       # too small to matter
    ((64, 512), torch.float32, False),      # a column of 64 entries fits the cache's ways
    ((512, 100), torch.float32, False),
])
def test_aliases_is_decided_by_the_row_stride(shape, dtype, expected):
    X = torch.zeros(shape, dtype=dtype)
    assert aliases(X) is expected


def test_aliases_is_false_for_views_graphs_and_transforms():
    X = torch.zeros(512, 512)
    assert not aliases(X.mT)  # column-major: its rows are not the unit-stride dimension
    assert not aliases(torch.zeros(512))
    W = X.clone().requires_grad_()
    assert not aliases(W)  # a recorded graph through the copy would be one more node
    P = torch.nn.Parameter(X.clone())
    with torch.no_grad():  # e.g. inside an autograd.Function's forward
        assert aliases(W) and aliases(P)
    seen = []

    def probe(Y):
        seen.append(aliases(Y))
        return Y.sum()

    torch.func.vmap(probe)(torch.zeros(2, 512, 512))
    torch.func.grad(probe)(X)
    assert seen == [False, False]


def test_copy_threshold_leaves_medium_matrices_alone():
    X = torch.randn(256, 256, generator=_gen(0))
    assert aliases(X) and transposable(X) is X
    Y = torch.randn(512, 512, generator=_gen(1))
    P = transposable(Y)
    assert P is not Y and _padded(P) and torch.equal(P, Y)
    assert P.untyped_storage().data_ptr() != Y.untyped_storage().data_ptr()
    Z = torch.randn(520, 520, generator=_gen(2))
    assert transposable(Z) is Z


@pytest.mark.parametrize(("dtype", "pad"), [(torch.float32, 16), (torch.float64, 8),
                                            (torch.complex64, 8), (torch.complex128, 4)])
def test_padded_rows_are_one_cache_line_longer(dtype, pad):
    P = padded_empty((2, 512, 512), torch.zeros((), dtype=dtype))
    assert P.shape == (2, 512, 512) and P.dtype == dtype
    assert P.stride() == (512 * (512 + pad), 512 + pad, 1)
    assert not aliases(P)


@torch.no_grad()
def test_padded_buffers_come_from_the_arena_and_go_back_to_it():
    like = torch.zeros(512, 512)
    with Arena(like) as arena:
        first = padded_empty((512, 512), like, arena)
        ptr = first.untyped_storage().data_ptr()
    with Arena(like) as arena:
        again = transposable_empty((512, 512), like, arena)
        assert again.untyped_storage().data_ptr() == ptr and _padded(again)
        plain = transposable_empty((500, 500), like, arena)
        assert plain.is_contiguous()  # no aliasing: the arena's own contiguous buffer
    assert transposable_empty((500, 500), like) is None  # no arena: the op allocates


# ----------------------------------------------------------------- the paths through it
@pytest.mark.parametrize("lower", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_skew_of_and_its_adjoint_equal_the_formulas_with_padded_reads(lower, dtype):
    n = 512
    X = torch.randn(2, n, n, generator=_gen(3), dtype=dtype)
    L = X.tril() if lower else X
    with Arena(X) as arena:
        A = skew_of(X, lower, arena)
        out = torch.empty_like(X)
        skew_of(X, lower, arena, out=out)
        G = skew_of_adjoint(X, lower, arena)
    assert aliases(X)
    assert torch.equal(A, L - L.mH)
    assert torch.equal(out, L - L.mH)
    expected = X - X.mH
    assert torch.equal(G, expected.tril() if lower else expected)
    assert A.is_contiguous() and G.is_contiguous()


@pytest.mark.parametrize("n", [16, 64, 65, 200, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_skew_of_the_lower_triangle_on_every_route(n, dtype):
    # up to SMALL_TRIL_NUMEL torch's tril (recorded too); above it, up to the arena's size a
    # fresh scratch, beyond it the arena's scratch (or, without an arena, the masked select);
    # recorded: the masked select, differentiable. All equal L - L^H for L = tril(X), whose
    # diagonal is 2i Im(X_ii).
    X = torch.randn(3, n, n, generator=_gen(5), dtype=dtype)
    L = X.tril()
    want = L - L.mH
    with torch.no_grad():
        assert torch.equal(skew_of(X, True), want)
        with Arena(X) as arena:
            assert torch.equal(skew_of(X, True, arena), want)
            out = torch.empty_like(X)
            skew_of(X, True, arena, out=out)
            assert torch.equal(out, want)
    leaf = X.clone().requires_grad_()
    A = skew_of(leaf, True)
    assert torch.equal(A.detach(), want)
    G = torch.randn(A.shape, generator=_gen(6), dtype=dtype)
    (grad,) = torch.autograd.grad(A, leaf, G)
    expected = G - G.mH
    assert torch.equal(grad, expected.tril())


@pytest.mark.parametrize("fn", [expm_of_skew, cayley_of_skew])
@pytest.mark.parametrize("lower", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_maps_and_gradients_agree_with_and_without_padding(fn, lower, dtype, no_padding):
    n = 512
    X = (torch.randn(n, n, generator=_gen(4), dtype=dtype) / n**0.5)
    C = torch.randn(n, n, generator=_gen(5), dtype=dtype)

    def value_and_grad():
        W = X.clone().requires_grad_()
        Q = fn(W, lower=lower)
        (Q * C).real.sum().backward()
        return Q.detach(), W.grad

    Q, g = value_and_grad()
    assert Q.is_contiguous()  # row-major, whatever order the factorization returns
    no_padding()
    Q0, g0 = value_and_grad()
    torch.testing.assert_close(Q, Q0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g0, rtol=1e-12, atol=1e-12)
    if lower:
        assert torch.equal(g.triu(1), torch.zeros_like(g))


@pytest.mark.parametrize(("b", "n", "k"), [(1, 512, 512), (3, 300, 256), (2, 200, 100)])
def test_cross_and_sym_equal_the_plain_products(b, n, k):
    X = torch.randn(b, n, k, generator=_gen(6))
    G = torch.randn(b, n, k, generator=_gen(7))
    K = _stiefel.cross(X, G)
    assert _padded(K) is (k % 128 == 0)
    torch.testing.assert_close(K, X.mT @ G, rtol=1e-5, atol=1e-4)
    S2 = _stiefel._sym2_(K)
    assert torch.equal(S2, K + K.mT)
    assert torch.equal(S2, S2.mT)
