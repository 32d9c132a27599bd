"""The retractions and factor maps at numerical extremes, against oracles (scipy, identities)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from dtriv.retractions import (
    clip_singular_values,
    householder,
    householder_inverse,
    polar_factor,
    stiefel_polar,
    stiefel_polar_inverse,
    stiefel_polar_newton_schulz,
    stiefel_qr_inverse,
)
from dtriv.retractions.stiefel import householder_qf, qf

SCALES = [1e-30, 1e-8, 1.0, 1e8, 1e30]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tangent(B: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    A = B.mT @ Z
    return Z - B @ ((A + A.mT) / 2)


def _scipy_polar(X: torch.Tensor) -> torch.Tensor:
    flat = X.detach().double().reshape(-1, *X.shape[-2:]).numpy()
    return torch.tensor(np.stack([scipy.linalg.polar(x)[0] for x in flat])).reshape(X.shape)


def _scipy_qf(X: torch.Tensor) -> torch.Tensor:
    out = []
    for x in X.detach().double().reshape(-1, *X.shape[-2:]).numpy():
        q, r = scipy.linalg.qr(x, mode="economic")
        s = np.sign(np.diag(r))
        s[s == 0] = 1
        out.append(q * s)
    return torch.tensor(np.stack(out)).reshape(X.shape)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------ inverses: documented ValueError


@pytest.mark.parametrize("Q", [
    # B^H Q = [[1, 0, 0], [0, 0, 1], [0, 1, 0]]: its leading 2 x 2 minor vanishes
    torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float64),
    # B^H Q = [[0, -1], [1, 0]]: its leading 1 x 1 minor vanishes
    torch.tensor([[0.0, -1], [1, 0], [0, 0]], dtype=torch.float64),
], ids=["square-permutation", "tall-rotation"])
def test_qr_inverse_singular_minor_raises_value_error(Q):
    # was torch.linalg.LinAlgError ("The solver failed because the input matrix is
    # singular") from the inner solve, not the documented ValueError naming Q
    B = torch.eye(*Q.shape, dtype=Q.dtype)
    with pytest.raises(ValueError, match="Q: expected a point in the image of the QR"):
        stiefel_qr_inverse(B, Q)


@pytest.mark.parametrize("Q", [
    torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64),
    torch.tensor([[0.0, -1], [1, 0], [0, 0]], dtype=torch.float64),
    torch.tensor([[0.0, 0], [0, 0], [1, 0]], dtype=torch.float64),
], ids=["square-rotation", "tall-rotation", "tall-orthogonal"])
def test_polar_inverse_singular_system_raises_value_error(Q):
    # M = B^H Q with eigenvalues i, -i (or zero): the Lyapunov system is singular; was
    # torch.linalg.LinAlgError instead of the documented ValueError
    B = torch.eye(*Q.shape, dtype=Q.dtype)
    with pytest.raises(ValueError, match="Q: expected a point in the image of the polar"):
        stiefel_polar_inverse(B, Q)


def test_inverses_batch_with_one_singular_element_raise_value_error():
    good = torch.linalg.matrix_exp(torch.tensor(
        [[0, 0.1, 0], [-0.1, 0, 0.2], [0, -0.2, 0]], dtype=torch.float64))
    bad = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float64)
    B = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    for fn in (stiefel_qr_inverse, stiefel_polar_inverse):
        with pytest.raises(ValueError, match="Q: expected a point in the image"):
            fn(B, torch.stack([good, bad]))


# ------------------------------------------------------------ polar by Newton--Schulz


def _odd_square_step(dtype: torch.dtype, scale: float, batch: tuple[int, ...] = ()):
    """A 5 x 5 point and a tangent of norm ``~scale``: ``V = B A`` with ``A`` skew of odd
    order is singular, so ``cond(B + V) ~ scale`` and ``cond(G) ~ scale^2``."""
    g = _gen(1)
    B, _ = torch.linalg.qr(torch.randn(*batch, 5, 5, generator=g, dtype=torch.float64))
    V = _tangent(B, torch.randn(*batch, 5, 5, generator=g, dtype=torch.float64))
    return B.to(dtype), (V * scale).to(dtype)


@pytest.mark.parametrize("dtype,scale", [
    (torch.float32, 1e6),    # G = I + V^T V not positive definite in float32: NaN before
    (torch.float64, 1e15),   # the same in float64
])
def test_newton_schulz_not_converging_gives_the_svd_polar_factor(dtype, scale):
    B, V = _odd_square_step(dtype, scale)
    Q = stiefel_polar_newton_schulz(B, V)
    assert torch.isfinite(Q).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _maxdiff(Q, _scipy_polar(B + V)) < tol


@pytest.mark.parametrize("shape", [(7, 3), (6, 1)])
def test_newton_schulz_overflowing_gram_gives_the_svd_polar_factor(shape):
    # float32 with |V| ~ 1e30: V^T V overflows; the result was NaN
    g = _gen(2)
    B, _ = torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64))
    V = _tangent(B, torch.randn(*shape, generator=g, dtype=torch.float64)) * 1e30
    B, V = B.float(), V.float()
    Q = stiefel_polar_newton_schulz(B, V)
    assert _maxdiff(Q, _scipy_polar(B + V)) < 1e-5


def test_newton_schulz_batch_with_one_extreme_element():
    B, V = _odd_square_step(torch.float64, 1.0, batch=(3,))
    V = V.clone()
    V[1] *= 1e15
    Q = stiefel_polar_newton_schulz(B, V)
    assert _maxdiff(Q, _scipy_polar(B + V)) < 1e-12
    assert _maxdiff(Q[[0, 2]], stiefel_polar(B[[0, 2]], V[[0, 2]])) < 1e-12


def test_newton_schulz_non_finite_input_stays_non_finite():
    B, V = _odd_square_step(torch.float64, 1.0)
    V = V.clone()
    V[0, 0] = float("nan")
    assert not torch.isfinite(stiefel_polar_newton_schulz(B, V)).all()


def test_newton_schulz_fallback_is_differentiable():
    B, V = _odd_square_step(torch.float64, 1e15)
    V = V.clone().requires_grad_(True)
    E = torch.randn(5, 5, generator=_gen(3), dtype=torch.float64)
    (g_ns,) = torch.autograd.grad((stiefel_polar_newton_schulz(B, V) * E).sum(), V)
    (g_svd,) = torch.autograd.grad((stiefel_polar(B, V) * E).sum(), V)
    assert torch.equal(g_ns, g_svd)


# ------------------------------------------------------------ factor maps at extreme scales


def _scaled(shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    """``(scale, X0 * scale)`` for every scale of ``SCALES``, one Gaussian ``X0`` in ``dtype``."""
    X0 = torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)
    return [(scale, (X0 * scale).to(dtype)) for scale in SCALES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 3), (5, 5), (6, 1)])
def test_q_factors_and_polar_factor_scale_invariant(dtype, shape):
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for scale, X in _scaled(shape, dtype, seed=4):
        ref_q = _scipy_qf(X)
        assert _maxdiff(qf(X), ref_q) < tol, scale
        assert _maxdiff(householder_qf(X), ref_q) < tol, scale
        assert _maxdiff(householder(householder_inverse(X)), ref_q) < tol, scale
        assert _maxdiff(polar_factor(X), _scipy_polar(X)) < tol, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 3), (3, 7), (4, 4)])
def test_clip_singular_values_scaled(dtype, shape):
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for scale, W in _scaled(shape, dtype, seed=5):
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        for upper, lower in ((scale, scale / 2), (float("inf"), 0.0), (1.0, 0.5)):
            ref = (U * S.clamp(lower, upper)) @ Vh
            out = clip_singular_values(W, upper, lower)
            assert _maxdiff(out, ref) <= tol * float(ref.abs().max()), (scale, upper, lower)
