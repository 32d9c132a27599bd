"""block_inverse: the inverse of a matrix with positive definite Hermitian part by block
elimination, against torch.linalg.inv (float64) and the bound of its pivot blocks."""

from __future__ import annotations

import pytest
import torch

from dtriv.retractions._block_inverse import LEAF, block_inverse


def _accretive(randn, *shape, dtype, shift=0.1):
    """``H + K``: H Hermitian positive definite (least eigenvalue ``shift``), K skew-Hermitian
    and larger than H, so that elimination without pivoting is not trivially diagonal."""
    n = shape[-1]
    Z = randn(*shape, dtype=dtype)
    H = Z @ Z.mH / n + shift * torch.eye(n, dtype=dtype)
    W = randn(*shape, dtype=dtype)
    return H + 2.0 * (W - W.mH)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("shape", [(5, 5), (7, 7), (3, 9, 9), (2, 2, 16, 16)])
@pytest.mark.parametrize("leaf", [1, 2, 3, 4])
def test_equals_the_inverse(randn, dtype, shape, leaf):
    """Every split (odd sizes, leaves of one row, batches) gives M^{-1} to rounding."""
    M = _accretive(randn, *shape, dtype=dtype)
    got = block_inverse(M, leaf)
    want = torch.linalg.inv(M)
    assert (got - want).abs().max() < 1e-11 * max(1.0, want.abs().max())
    eye = torch.eye(shape[-1], dtype=dtype)
    assert (M @ got - eye).abs().max() < 1e-11


def test_cayley_matrix_in_single_precision_as_accurate_as_lu(randn):
    """M = I - A/2 for a skew A with ||A||_2 about 2 (the Cayley transform of a random
    generator), n = 2 LEAF + 17 (two levels of splits, uneven halves): in float32 within
    2x the error of torch's LU inverse, both measured against float64."""
    n = 2 * LEAF + 17
    X = randn(n, n) / n ** 0.5
    A = X - X.mT
    M = torch.eye(n, dtype=torch.float64) - A / 2
    exact = torch.linalg.inv(M)
    err = (block_inverse(M.float()).double() - exact).abs().max()
    err_lu = (torch.linalg.inv(M.float()).double() - exact).abs().max()
    assert err < max(2 * err_lu, 1e-6)


def test_pivot_blocks_are_bounded(randn, monkeypatch):
    """With Hermitian part I every block inverted on the way (the leading blocks and the
    Schur complements) has an inverse of 2-norm at most 1, here with a skew part of norm 30."""
    from dtriv.retractions import _block_inverse

    norms = []
    real = _block_inverse._lu_inverse

    def spy(M):
        out = real(M)
        norms.append(torch.linalg.matrix_norm(out, 2).amax().item())
        return out

    monkeypatch.setattr(_block_inverse, "_lu_inverse", spy)
    n = 40
    X = randn(n, n) * 2.0
    M = torch.eye(n, dtype=torch.float64) + (X - X.mT)
    assert torch.linalg.matrix_norm(M - M.mT, 2) > 50
    Minv = block_inverse(M, 3)
    assert len(norms) >= 16 and max(norms) <= 1.0 + 1e-12
    assert torch.linalg.matrix_norm(Minv, 2) <= 1.0 + 1e-12
    assert (Minv - torch.linalg.inv(M)).abs().max() < 1e-12


def test_differentiable_and_vmap(randn):
    """Plain torch operations: the gradient equals inv's, and vmap equals the batched call."""
    M = _accretive(randn, 3, 6, 6, dtype=torch.float64).requires_grad_()
    G = randn(3, 6, 6)
    (g,) = torch.autograd.grad(block_inverse(M, 2), M, G)
    (g_ref,) = torch.autograd.grad(torch.linalg.inv(M), M, G)
    assert (g - g_ref).abs().max() < 1e-10
    M = M.detach()
    assert (torch.vmap(lambda m: block_inverse(m, 2))(M) - block_inverse(M, 2)).abs().max() == 0


def test_meta_shape():
    M = torch.empty(2, 9, 9, device="meta")
    assert block_inverse(M, 2).shape == (2, 9, 9)
