"""O(n k^2) for real: every Stiefel retraction runs forward and backward at n = 200000, k = 8.

Any n x n intermediate would need 200000^2 * 8 bytes = 320 GB, so these runs can only
succeed if no such matrix is formed.
"""

from __future__ import annotations

import pytest
import torch

from dtriv.retractions.stiefel import (
    stiefel_cayley,
    stiefel_exp,
    stiefel_exp_canonical,
    stiefel_polar,
    stiefel_polar_inverse,
    stiefel_polar_newton_schulz,
    stiefel_qr,
    stiefel_qr_inverse,
)

N, K = 200_000, 8
RETRACTIONS = [stiefel_qr, stiefel_polar, stiefel_polar_newton_schulz, stiefel_cayley,
               stiefel_exp, stiefel_exp_canonical]


@pytest.fixture(scope="module")
def base_and_tangent():
    g = torch.Generator().manual_seed(0)
    B = torch.linalg.qr(torch.randn(N, K, dtype=torch.float64, generator=g))[0]
    Z = torch.randn(N, K, dtype=torch.float64, generator=g) / N**0.5  # |V| of order 1
    V = Z - B @ ((B.mH @ Z + Z.mH @ B) / 2)
    return B, V


@pytest.mark.parametrize("f", RETRACTIONS, ids=lambda f: f.__name__)
def test_large_forward_backward(f, base_and_tangent):
    B, V = base_and_tangent
    B = B.clone().requires_grad_()
    V = V.clone().requires_grad_()
    Q = f(B, V)
    assert Q.shape == (N, K)
    eye = torch.eye(K, dtype=Q.dtype)
    assert float((Q.detach().mH @ Q.detach() - eye).abs().max()) < 1e-12
    # a loss with a generic gradient, backward to both arguments
    w = torch.linspace(-1.0, 1.0, N * K, dtype=Q.dtype).reshape(N, K)
    (Q * w).sum().backward()
    assert B.grad.shape == (N, K) and V.grad.shape == (N, K)
    assert bool(torch.isfinite(B.grad).all()) and bool(torch.isfinite(V.grad).all())
    assert float(V.grad.abs().max()) > 0


@pytest.mark.parametrize("f, finv", [(stiefel_qr, stiefel_qr_inverse),
                                     (stiefel_polar, stiefel_polar_inverse)],
                         ids=["qr", "polar"])
def test_large_inverses(f, finv, base_and_tangent):
    B, V = base_and_tangent
    W = finv(B, f(B, V))
    assert float((W - V).abs().max()) < 1e-10
