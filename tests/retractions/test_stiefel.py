"""Stiefel retractions: manifold membership, first-order agreement, oracles, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from dtriv.retractions import registry
from dtriv.retractions.stiefel import (
    polar_factor,
    special_polar_factor,
    stiefel_cayley,
    stiefel_exp,
    stiefel_exp_canonical,
    stiefel_polar,
    stiefel_polar_inverse,
    stiefel_polar_newton_schulz,
    stiefel_qr,
    stiefel_qr_inverse,
)

RETRACTIONS = {
    "qr": stiefel_qr,
    "polar": stiefel_polar,
    "polar_ns": stiefel_polar_newton_schulz,
    "cayley": stiefel_cayley,
    "exp": stiefel_exp,
    "exp_canonical": stiefel_exp_canonical,
}
INVERSES = {"qr": (stiefel_qr, stiefel_qr_inverse), "polar": (stiefel_polar, stiefel_polar_inverse)}
SHAPES = [(7, 3), (5, 5), (5, 3)]  # tall, square, tall with n < 2k
DTYPES = [torch.float64, torch.complex128]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def point(*shape, dtype=torch.float64, seed=0) -> torch.Tensor:
    """A random point of the Stiefel manifold (q-factor of a Gaussian matrix)."""
    Z = torch.randn(*shape, dtype=dtype, generator=_gen(seed))
    return torch.linalg.qr(Z)[0]


def tangent(B: torch.Tensor, scale: float = 0.5, seed: int = 1) -> torch.Tensor:
    """A random tangent vector at B (embedded-metric projection of a Gaussian matrix)."""
    Z = scale * torch.randn(*B.shape, dtype=B.dtype, generator=_gen(seed))
    return Z - B @ ((B.mH @ Z + Z.mH @ B) / 2)


def orth_error(Q: torch.Tensor) -> float:
    k = Q.shape[-1]
    return float((Q.mH @ Q - torch.eye(k, dtype=Q.dtype)).abs().max())


def maxdiff(a, b) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------ 1. membership, order


@pytest.mark.parametrize("name", RETRACTIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_on_manifold_single_precision(name, shape, dtype):
    B = point(*shape, dtype=dtype)
    V = tangent(B, scale=1.0)
    Q = RETRACTIONS[name](B, V)
    assert Q.shape == B.shape and Q.dtype == dtype
    assert orth_error(Q) < 1e-5


@pytest.mark.parametrize("name", RETRACTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_b_plus_v_to_first_order(name, dtype):
    B = point(8, 3, dtype=dtype, seed=2)
    V = tangent(B, scale=1.0, seed=3)
    f = RETRACTIONS[name]
    errors = [maxdiff(f(B, t * V), B + t * V) for t in (1e-2, 5e-3, 2.5e-3)]
    assert errors[0] < 1e-3  # second-order remainder: |V|^2 t^2
    for e1, e2 in zip(errors, errors[1:]):
        assert 3.0 < e1 / e2 < 5.0, errors


@pytest.mark.parametrize("name", RETRACTIONS)
def test_zero_tangent_is_identity(name):
    B = point(6, 2, seed=4)
    assert maxdiff(RETRACTIONS[name](B, torch.zeros_like(B)), B) < 1e-14


# ------------------------------------------------------------------ 2. QR and polar oracles


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qr_is_positive_diagonal_q_factor(shape, dtype):
    B = point(*shape, dtype=dtype, seed=5)
    V = tangent(B, scale=1.0, seed=6)
    Q = stiefel_qr(B, V)
    R = Q.mH @ (B + V)
    n, k = shape
    assert maxdiff(R.tril(-1), torch.zeros(k, k)) < 1e-12  # upper triangular
    d = R.diagonal()
    assert float(d.imag.abs().max() if dtype.is_complex else 0.0) < 1e-12
    assert float(d.real.min()) > 0
    assert maxdiff(Q @ R, B + V) < 1e-12
    # scipy's Householder QR with the column phases fixed the same way
    Qs, Rs = scipy.linalg.qr((B + V).numpy(), mode="economic")
    ds = np.diagonal(Rs)
    assert maxdiff(Q, Qs * (ds / np.abs(ds))[None, :]) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_polar_equals_scipy(shape, dtype):
    B = point(*shape, dtype=dtype, seed=7)
    V = tangent(B, scale=1.0, seed=8)
    U, _ = scipy.linalg.polar((B + V).numpy())
    assert maxdiff(stiefel_polar(B, V), U) < 1e-10
    assert maxdiff(stiefel_polar_newton_schulz(B, V), U) < 1e-10
    X = torch.randn(*shape, dtype=dtype, generator=_gen(9))
    assert maxdiff(polar_factor(X), scipy.linalg.polar(X.numpy())[0]) < 1e-10


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-4),
                                        (torch.complex128, 1e-6), (torch.complex64, 1e-4)])
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])
def test_newton_schulz_equals_svd_polar(dtype, tol, scale):
    B = point(20, 6, dtype=dtype, seed=10)
    V = tangent(B, scale=scale, seed=11)
    assert maxdiff(stiefel_polar_newton_schulz(B, V), stiefel_polar(B, V)) < tol


def test_newton_schulz_fixed_iterations():
    B = point(10, 4, seed=12)
    V = tangent(B, seed=13)
    exact = stiefel_polar(B, V)
    assert maxdiff(stiefel_polar_newton_schulz(B, V, iters=30), exact) < 1e-12
    # too few iterations are measurably inexact: the count is really used
    assert maxdiff(stiefel_polar_newton_schulz(B, V, iters=1), exact) > 1e-3
    for bad in (0, True, 2.0):  # a bool is an int to Python, not a count
        with pytest.raises(ValueError, match=rf"iters: expected None or a positive int, got "
                                             rf"{bad!r}"):
            stiefel_polar_newton_schulz(B, V, iters=bad)


@pytest.mark.parametrize("kind", INVERSES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inverse_round_trips(kind, shape, dtype):
    f, finv = INVERSES[kind]
    B = point(*shape, dtype=dtype, seed=14)
    V = tangent(B, scale=0.7, seed=15)
    Q = f(B, V)
    W = finv(B, Q)
    assert maxdiff(W, V) < 1e-10
    assert maxdiff(B.mH @ W + W.mH @ B, torch.zeros(shape[1], shape[1])) < 1e-10
    assert maxdiff(f(B, W), Q) < 1e-12
    # registered as the inverse
    assert registry.get("stiefel", kind).inverse is finv


def test_inverse_rejects_points_outside_the_image():
    B = point(6, 3, seed=16)
    Q = -B  # B^H Q = -I: both R and S would need a negative diagonal
    with pytest.raises(ValueError, match="Q: expected a point in the image of the QR"):
        stiefel_qr_inverse(B, Q)
    with pytest.raises(ValueError, match="Q: expected a point in the image of the polar"):
        stiefel_polar_inverse(B, Q)


# ------------------------------------------------------------------ 3. Cayley


def dense_cayley(B, V):
    """(I - Ω/2)^{-1}(I + Ω/2) B with Ω = P V B^H - B (P V)^H, formed as n x n."""
    n = B.shape[-2]
    PV = V - B @ (B.mH @ V) / 2
    Om = PV @ B.mH - B @ PV.mH
    I = torch.eye(n, dtype=B.dtype)
    return torch.linalg.solve(I - Om / 2, (I + Om / 2) @ B), Om


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cayley_equals_dense_formula(shape, dtype):
    B = point(*shape, dtype=dtype, seed=17)
    V = tangent(B, scale=1.5, seed=18)
    Q_dense, Om = dense_cayley(B, V)
    assert maxdiff(Om, -Om.mH) < 1e-14
    assert maxdiff(Om @ B, V) < 1e-12
    assert maxdiff(stiefel_cayley(B, V), Q_dense) < 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
def test_square_cases_equal_group_maps(dtype):
    B = point(5, 5, dtype=dtype, seed=19)
    V = tangent(B, scale=1.0, seed=20)
    A = B.mH @ V
    I = torch.eye(5, dtype=dtype)
    assert maxdiff(stiefel_cayley(B, V), B @ torch.linalg.solve(I - A / 2, I + A / 2)) < 1e-12
    expA = scipy.linalg.expm(A.numpy())
    assert maxdiff(stiefel_exp(B, V), B.numpy() @ expA) < 1e-12
    assert maxdiff(stiefel_exp_canonical(B, V), B.numpy() @ expA) < 1e-12


def torch_tall_skew(n, k, dtype, seed):
    """torch.nn.utils.parametrizations.orthogonal's embedding of a tall X: A = Y - Y^H."""
    X = torch.randn(n, k, dtype=dtype, generator=_gen(seed))
    Y = torch.cat([X.tril(), torch.zeros(n, n - k, dtype=dtype)], dim=-1)
    return Y - Y.mH


@pytest.mark.parametrize("n, k", [(9, 4), (5, 3), (6, 6)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_orthogonal_parity(n, k, dtype):
    A = torch_tall_skew(n, k, dtype, seed=21)
    E = torch.eye(n, k, dtype=dtype)
    I = torch.eye(n, dtype=dtype)
    Q_exp = torch.linalg.matrix_exp(A)[:, :k]
    Q_cay = torch.linalg.solve(I - A / 2, I + A / 2)[:, :k]
    assert maxdiff(stiefel_exp_canonical(E, A[:, :k]), Q_exp) < 1e-12
    assert maxdiff(stiefel_cayley(E, A[:, :k]), Q_cay) < 1e-12


def test_torch_orthogonal_module_parity():
    """The parametrized weight of torch's module equals the O(n k^2) maps at E = I_{n,k}."""
    from torch.nn.utils.parametrizations import orthogonal

    torch.manual_seed(22)
    for omap, f in (("matrix_exp", stiefel_exp_canonical), ("cayley", stiefel_cayley)):
        lin = orthogonal(torch.nn.Linear(3, 8).double(), orthogonal_map=omap,
                         use_trivialization=False)
        X = lin.parametrizations.weight.original.detach()
        n, k = X.shape
        Y = torch.cat([X.tril(), torch.zeros(n, n - k, dtype=X.dtype)], dim=-1)
        A = Y - Y.mH
        Q = f(torch.eye(n, k, dtype=X.dtype), A[:, :k])
        assert maxdiff(lin.weight, Q) < 1e-12


# ------------------------------------------------------------------ 4. geodesics


def rk4_embedded_geodesic(B, V, steps=400):
    """Integrate γ'' = -γ (γ'^H γ') from (B, V) to t = 1 by classical Runge-Kutta."""
    h = 1.0 / steps

    def f(Y, D):
        return D, -Y @ (D.mH @ D)

    Y, D = B.clone(), V.clone()
    for _ in range(steps):
        k1 = f(Y, D)
        k2 = f(Y + h / 2 * k1[0], D + h / 2 * k1[1])
        k3 = f(Y + h / 2 * k2[0], D + h / 2 * k2[1])
        k4 = f(Y + h * k3[0], D + h * k3[1])
        Y = Y + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        D = D + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return Y


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_equals_integrated_geodesic(shape, dtype):
    B = point(*shape, dtype=dtype, seed=23)
    V = tangent(B, scale=1.0, seed=24)
    assert maxdiff(stiefel_exp(B, V), rk4_embedded_geodesic(B, V)) < 1e-9


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_curve_velocity_and_normal_acceleration(dtype):
    B = point(8, 3, dtype=dtype, seed=25)
    V = tangent(B, scale=1.0, seed=26)
    h = 1e-4
    velocity0 = (stiefel_exp(B, h * V) - stiefel_exp(B, -h * V)) / (2 * h)
    assert maxdiff(velocity0, V) < 1e-7
    t, h = 0.6, 1e-3
    g = stiefel_exp(B, t * V)
    acc = (stiefel_exp(B, (t + h) * V) - 2 * g + stiefel_exp(B, (t - h) * V)) / h**2
    tangential = acc - g @ ((g.mH @ acc + acc.mH @ g) / 2)
    assert float(acc.abs().max()) > 0.1  # the curve really bends
    assert float(tangential.abs().max()) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_canonical_equals_dense_exponential(shape, dtype):
    B = point(*shape, dtype=dtype, seed=27)
    V = tangent(B, scale=1.5, seed=28)
    A = B.mH @ V
    N = V - B @ A
    Om = B @ A @ B.mH + N @ B.mH - B @ N.mH
    assert maxdiff(Om @ B, V) < 1e-12
    expected = scipy.linalg.expm(Om.numpy()) @ B.numpy()
    assert maxdiff(stiefel_exp_canonical(B, V), expected) < 1e-10


# ------------------------------------------------------------------ 5. gradients


@pytest.mark.parametrize("name", RETRACTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradcheck(name, dtype):
    B = point(5, 2, dtype=dtype, seed=29).requires_grad_()
    V = tangent(B.detach(), scale=0.8, seed=30).requires_grad_()
    # complex: fast mode (random projections of the Jacobian), half the cost of the full check
    assert torch.autograd.gradcheck(RETRACTIONS[name], (B, V), fast_mode=dtype.is_complex)


@pytest.mark.parametrize("name", RETRACTIONS)
def test_gradcheck_at_zero_tangent(name):
    """Dynamic trivializations evaluate at V = 0, where the singular values of B + V tie."""
    B = point(5, 3, seed=31)
    V = torch.zeros_like(B, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: RETRACTIONS[name](B, v), (V,))


@pytest.mark.parametrize("kind", INVERSES)
def test_gradcheck_inverses(kind):
    f, finv = INVERSES[kind]
    B = point(5, 2, seed=32)
    Q = f(B, tangent(B, seed=33)).requires_grad_()
    assert torch.autograd.gradcheck(lambda q: finv(B, q), (Q,))


def test_gradcheck_polar_factor_repeated_singular_values():
    X = (2.0 * point(6, 3, seed=34)).requires_grad_()  # all singular values equal 2
    assert torch.autograd.gradcheck(polar_factor, (X,))


# ------------------------------------------------------------------ 6. second derivatives


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 3), (4, 4)], ids=["tall", "square"])
def test_gradgradcheck_polar_factor(dtype, shape):
    """Second derivatives of the polar factor, also at repeated singular values (X = 2B)."""
    X = torch.randn(*shape, dtype=dtype, generator=_gen(37)).requires_grad_()
    assert torch.autograd.gradgradcheck(polar_factor, (X,), fast_mode=dtype.is_complex)
    X = (2.0 * point(*shape, dtype=dtype, seed=38)).requires_grad_()
    assert torch.autograd.gradgradcheck(polar_factor, (X,), fast_mode=dtype.is_complex)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradgradcheck_polar_retraction(dtype):
    """In B and V at a tangent V, and in V at V = 0 (the point of a dynamic trivialization)."""
    B = point(5, 3, dtype=dtype, seed=39)
    V = tangent(B, seed=40)
    assert torch.autograd.gradgradcheck(
        stiefel_polar, (B.requires_grad_(), V.requires_grad_()), fast_mode=dtype.is_complex)
    zero = torch.zeros_like(V, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: stiefel_polar(B.detach(), v), (zero,))


def _hessian_vector_product(retraction, B, V, C, E):
    r"""The derivative of :math:`\nabla_V L` along ``E`` for
    :math:`L(V) = \operatorname{Re}\langle R, C\rangle^2 + \sum |R_{ij}|^3`, :math:`R = R_B(V)`."""
    V = V.clone().requires_grad_()
    R = retraction(B, V)
    loss = (R * C.conj()).sum().real ** 2 + R.abs().pow(3).sum()
    (g,) = torch.autograd.grad(loss, V, create_graph=True)
    (hv,) = torch.autograd.grad((g * E.conj()).sum().real, V)
    return hv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 0.5], ids=["zero_tangent", "tangent"])
def test_polar_hessian_vector_product_equals_newton_schulz(dtype, scale):
    """Oracle: the matmul-only Newton--Schulz polar factor, differentiated twice by autograd
    through its products (30 steps: converged to rounding, derivatives included)."""
    B = point(6, 3, dtype=dtype, seed=41)
    V = tangent(B, scale=scale, seed=42)
    C = torch.randn(6, 3, dtype=dtype, generator=_gen(43))
    E = torch.randn(6, 3, dtype=dtype, generator=_gen(44))
    hv = _hessian_vector_product(stiefel_polar, B, V, C, E)
    hv_ref = _hessian_vector_product(
        lambda b, v: stiefel_polar_newton_schulz(b, v, iters=30), B, V, C, E)
    assert float(hv.abs().max()) > 0.1  # not the zero of a once-differentiable backward
    assert maxdiff(hv, hv_ref) < 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 3), (4, 1)])
@pytest.mark.parametrize("scale", [0.0, 0.5], ids=["zero_tangent", "tangent"])
def test_newton_schulz_default_second_derivatives_equal_the_polar_factor_s(dtype, shape, scale):
    """With ``iters=None`` the iteration stopped after one step from ``Y_0 = I`` (``V = 0``,
    or any ``V`` for ``k = 1``): affine in ``G``, so its Hessian was wrong by O(1) (1.9 against
    2.0 at (4, 2)); a differentiated Gram matrix now runs the steps its derivatives need."""
    B = point(*shape, dtype=dtype, seed=51)
    V = tangent(B, scale=scale, seed=52)
    C = torch.randn(*shape, dtype=dtype, generator=_gen(53))
    E = torch.randn(*shape, dtype=dtype, generator=_gen(54))
    hv = _hessian_vector_product(stiefel_polar_newton_schulz, B, V, C, E)
    hv_ref = _hessian_vector_product(stiefel_polar, B, V, C, E)
    assert float(hv_ref.abs().max()) > 0.1
    assert maxdiff(hv, hv_ref) < 1e-10


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_polar_under_torch_func_transforms():
    """vmap(grad) equals a loop of backward passes; jvp equals the Newton--Schulz oracle's;
    torch.func.hessian (forward over reverse) and jacrev(jacfwd) equal autograd's Hessian."""
    B = point(5, 3, seed=45)
    C = torch.randn(5, 3, dtype=torch.float64, generator=_gen(46))

    def loss(v):
        Q = stiefel_polar(B, v)
        return (Q * C).sum() ** 2 + Q.pow(3).sum()

    Vs = torch.stack([tangent(B, seed=47 + i) for i in range(3)])
    looped = []
    for v in Vs:
        v = v.clone().requires_grad_()
        looped.append(torch.autograd.grad(loss(v), v)[0])
    assert maxdiff(torch.func.vmap(torch.func.grad(loss))(Vs), torch.stack(looped)) < 1e-12

    V, E = Vs[0], torch.randn(5, 3, dtype=torch.float64, generator=_gen(50))
    _, dQ = torch.func.jvp(lambda v: stiefel_polar(B, v), (V,), (E,))
    _, dQ_ref = torch.func.jvp(lambda v: stiefel_polar_newton_schulz(B, v, iters=30), (V,), (E,))
    assert maxdiff(dQ, dQ_ref) < 1e-10

    zero = torch.zeros_like(V)
    H = torch.autograd.functional.hessian(loss, zero)
    assert float(H.abs().max()) > 0.1
    assert maxdiff(torch.func.hessian(loss)(zero), H) < 1e-12
    assert maxdiff(torch.func.jacrev(torch.func.jacfwd(loss))(zero), H) < 1e-12


# ------------------------------------------------------- 6b. the nearest rotation (SO(n))


def rotation(n: int, seed: int) -> torch.Tensor:
    Q = point(n, n, seed=seed)
    return torch.cat([Q[..., :1] * torch.linalg.det(Q), Q[..., 1:]], dim=-1)


def reflected(*singular_values: float, seed: int = 0) -> torch.Tensor:
    """``R1 diag(s) R2`` with rotations ``R1, R2``: ``det < 0`` when one ``s`` is negative."""
    n = len(singular_values)
    S = torch.diag(torch.tensor(singular_values, dtype=torch.float64))
    return rotation(n, seed) @ S @ rotation(n, seed + 1)


def assert_nearest_rotation(X: torch.Tensor, Q: torch.Tensor) -> None:
    """The maximiser of tr(Q^T X) over SO(n) is characterised by: det Q = 1, H = Q^T X
    symmetric, and at most one negative eigenvalue of H, the least in absolute value."""
    assert maxdiff(torch.linalg.det(Q), torch.ones(Q.shape[:-2], dtype=Q.dtype)) < 1e-12
    assert orth_error(Q) < 1e-12
    H = Q.mT @ X
    assert maxdiff(H, H.mT) < 1e-12
    h = torch.linalg.eigvalsh((H + H.mT) / 2)
    assert bool((h[..., 1:] > 0).all())
    assert bool((h[..., :1].abs() <= h[..., 1:2]).all())


def test_special_polar_factor_is_the_nearest_rotation():
    X = torch.randn(6, 5, 5, dtype=torch.float64, generator=_gen(60))
    X[:3] = X[:3].flip(-1)  # reflect half of the batch: both signs of det X occur
    det = torch.linalg.det(X)
    assert bool((det < 0).any()) and bool((det > 0).any())
    Q = special_polar_factor(X)
    assert_nearest_rotation(X, Q)
    positive = det > 0  # there it is the polar factor
    assert maxdiff(Q[positive], polar_factor(X[positive])) < 1e-12
    assert maxdiff(Q, torch.stack([special_polar_factor(x) for x in X])) < 1e-12


@pytest.mark.parametrize("X", [
    reflected(3.0, 2.0, 2.0, -1.0, seed=61),  # repeated larger singular values, det < 0
    reflected(2.0, 2.0, 2.0, 2.0, seed=63),  # on 2 SO(4): all equal, det > 0
    reflected(3.0, 1.0, 0.5, -0.25, seed=65),
], ids=["reflection-repeated", "rotation-repeated", "reflection-distinct"])
def test_special_polar_factor_gradients(X):
    """First and second derivatives against finite differences; torch's SVD backward is
    NaN at the repeated singular values of the first two."""
    X = X.requires_grad_()
    assert_nearest_rotation(X.detach(), special_polar_factor(X).detach())
    assert torch.autograd.gradcheck(special_polar_factor, (X,))
    assert torch.autograd.gradgradcheck(special_polar_factor, (X,))


def test_special_polar_factor_batch_of_both_kinds_has_finite_gradients():
    """A batch holding a point of SO(n) (all singular values 1) and a reflection: each
    point's gradient is the one it has alone."""
    X = torch.stack([rotation(4, 66), reflected(3.0, 2.0, 1.5, -1.0, seed=67)])
    C = torch.randn(2, 4, 4, dtype=torch.float64, generator=_gen(68))
    Xb = X.clone().requires_grad_()
    (special_polar_factor(Xb) * C).sum().backward()
    assert bool(torch.isfinite(Xb.grad).all())
    for i in range(2):
        xi = X[i].clone().requires_grad_()
        (special_polar_factor(xi) * C[i]).sum().backward()
        assert maxdiff(Xb.grad[i], xi.grad) < 1e-12


def test_special_polar_factor_forward_mode_and_vmap():
    X = reflected(3.0, 2.0, 2.0, -1.0, seed=69)
    dX = torch.randn(4, 4, dtype=torch.float64, generator=_gen(70))
    _, jvp = torch.func.jvp(special_polar_factor, (X,), (dX,))
    h = 1e-6
    fd = (special_polar_factor(X + h * dX) - special_polar_factor(X - h * dX)) / (2 * h)
    assert maxdiff(jvp, fd) < 1e-8
    Xs = torch.stack([X, rotation(4, 71), reflected(1.0, 0.9, 0.8, -0.1, seed=72)])
    assert maxdiff(torch.func.vmap(special_polar_factor)(Xs), special_polar_factor(Xs)) < 1e-12
    # nested forward mode takes the plain SVD path: the same values and second derivatives
    x = reflected(3.0, 1.0, 0.5, -0.25, seed=73)
    f = lambda t: special_polar_factor(x + t * dX).sum()  # noqa: E731
    t0 = torch.zeros((), dtype=torch.float64)
    second = torch.func.jacfwd(torch.func.jacfwd(f))(t0)
    g = lambda t: torch.autograd.grad(  # noqa: E731
        special_polar_factor(x + t * dX).sum(), t, create_graph=True)[0]
    t1 = t0.clone().requires_grad_()
    assert maxdiff(second, torch.autograd.grad(g(t1), t1)[0]) < 1e-8


def test_special_polar_factor_bad_input():
    with pytest.raises(ValueError, match=r"X: expected a real matrix .*complex128"):
        special_polar_factor(torch.eye(3, dtype=torch.complex128))
    with pytest.raises(ValueError, match=r"X: expected square matrices .*got shape \(5, 3\)"):
        special_polar_factor(torch.ones(5, 3, dtype=torch.float64))


# ------------------------------------------------------------------ 7. batching, precision


@pytest.mark.parametrize("name", RETRACTIONS)
def test_batched_equals_loop(name):
    B = point(2, 3, 6, 3, seed=35)
    V = tangent(B, seed=36)
    f = RETRACTIONS[name]
    out = f(B, V)
    assert out.shape == B.shape
    loop = torch.stack([torch.stack([f(B[i, j], V[i, j]) for j in range(3)]) for i in range(2)])
    assert maxdiff(out, loop) < 1e-12


@pytest.mark.parametrize("name", RETRACTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_input_dtype(name, dtype):
    B = point(6, 3, dtype=torch.float32, seed=37)
    V = tangent(B, seed=38)
    out = RETRACTIONS[name](B.to(dtype), V.to(dtype))
    assert out.dtype == dtype
    assert orth_error(out.float()) < 0.05


@pytest.mark.parametrize("name", RETRACTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_the_single_result_rounded(name, dtype):
    """Half inputs are computed in float32 and cast back once (``upcast_half``): the result
    is exactly the float32 result of the upcast inputs cast down, hence within half an ulp of
    the double result (products in half precision, or a second rounding, are not)."""
    B = point(6, 3, dtype=torch.float32, seed=37).to(dtype)
    V = tangent(B.float(), seed=38).to(dtype)
    f = RETRACTIONS[name]
    out = f(B, V)
    assert out.dtype == dtype
    assert torch.equal(out, f(B.float(), V.float()).to(dtype))
    ref = f(B.double(), V.double())
    info = torch.finfo(dtype)
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(info.smallest_normal)))) * info.eps
    assert ((out.double() - ref).abs() <= 0.5 * ulp + 1e-5).all()


# ------------------------------------------------------------------ 8. bad input, registry


@pytest.mark.parametrize("name", RETRACTIONS)
def test_bad_input(name):
    f = RETRACTIONS[name]
    with pytest.raises(ValueError, match=r"B: expected .*ndim >= 2.*got"):
        f(torch.ones(3), torch.ones(3))
    wide = torch.eye(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"B: expected tall .*n >= k.*got shape \(2, 4\)"):
        f(wide, wide)
    B = point(5, 2)
    with pytest.raises(ValueError, match=r"V: expected the shape of B, \(5, 2\), got \(5, 3\)"):
        f(B, torch.zeros(5, 3, dtype=B.dtype))
    with pytest.raises(ValueError, match=r"V: expected the dtype of B"):
        f(B, torch.zeros(5, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"B: expected a floating point"):
        f(torch.ones(5, 2, dtype=torch.int64), torch.ones(5, 2, dtype=torch.int64))


def test_registry():
    names = registry.available("stiefel")
    for name, fn in RETRACTIONS.items():
        assert name in names
        assert registry.get("stiefel", name).map is fn
    with pytest.raises(ValueError, match="available: .*qr"):
        registry.get("stiefel", "no-such-map")


# --------------------------------------------------------------------------- Cholesky QR


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.complex128, 1e-12),
                                       (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (3, 40, 8)])
def test_cholesky_qf_equals_householder_and_scipy(shape, dtype, tol):
    from dtriv.retractions.stiefel import cholesky_qf, householder_qf

    B = point(*shape, dtype=dtype, seed=3)
    V = tangent(B, scale=0.02, seed=4)
    Q = cholesky_qf(B + V)
    assert Q is not None  # a small step: the fast path is taken
    assert maxdiff(Q, householder_qf(B + V)) < tol
    assert orth_error(Q) < tol
    X = (B + V)[(0,) * (len(shape) - 2)].numpy()
    Qs, Rs = scipy.linalg.qr(X, mode="economic")
    d = np.diag(Rs)
    Qs = Qs * (d / np.abs(d))[None, :]  # diag(R) > 0
    assert maxdiff(Q[(0,) * (len(shape) - 2)], Qs) < tol
    torch.testing.assert_close(stiefel_qr(B, V), Q, rtol=0, atol=0)


def test_cholesky_qf_declines_ill_conditioned_input_and_qr_falls_back():
    from dtriv.retractions.stiefel import cholesky_qf, householder_qf

    B = point(2, 30, 6, seed=5)
    V = tangent(B, scale=3.0, seed=6)  # |V^H V| far above 0.5 for the second point
    V[0] *= 1e-3  # the first is a small step: one bad point sends the batch to Householder
    assert cholesky_qf(B + V) is None
    assert cholesky_qf(B[0] + V[0]) is not None
    torch.testing.assert_close(stiefel_qr(B, V), householder_qf(B + V), rtol=0, atol=0)
    nan = B.clone()
    nan[0, 0, 0] = float("nan")
    assert cholesky_qf(nan) is None
    # rank deficient: the Gram is singular, Householder handles it
    X = B[0].clone()
    X[:, 1] = X[:, 0]
    assert cholesky_qf(X) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128])
def test_cholesky_qf_with_scratch_and_out_equals_the_plain_call(dtype, monkeypatch):
    """With an arena (its temporaries reused from call to call) and ``out`` (the q-factor
    written over a tensor the input was computed from, as the optimizers write the new point
    over the old one): equal to the plain call to rounding, twice in a row (the second call's
    scratch is the first's); a declined input leaves ``out`` as it was."""
    from dtriv.retractions import _scratch
    from dtriv.retractions._scratch import Arena
    from dtriv.retractions.stiefel import cholesky_qf

    monkeypatch.setattr(_scratch, "MIN_BYTES", 0)  # arenas for these small tensors
    B = point(3, 40, 8, dtype=dtype, seed=11)
    Y = B + tangent(B, scale=0.05, seed=12)
    want = cholesky_qf(Y)
    with torch.no_grad():
        for _ in range(2):
            X = B.clone()
            with Arena(X) as arena:
                Yc = torch.add(X, Y - B)  # Y computed from X, then X overwritten
                assert cholesky_qf(Yc, arena=arena, out=X) is X
            torch.testing.assert_close(X, want, rtol=0, atol=1e-6 if dtype == torch.float32
                                       else 1e-14)
        bad = B + tangent(B, scale=3.0, seed=13)
        X = B.clone()
        with Arena(X) as arena:
            assert cholesky_qf(bad, arena=arena, out=X) is None
        assert torch.equal(X, B)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_cholesky_qr_gradient_matches_householder_and_gradcheck(dtype):
    from dtriv.retractions.stiefel import cholesky_qf, householder_qf

    B = point(9, 4, dtype=dtype, seed=7)
    V = tangent(B, scale=0.1, seed=8).requires_grad_(True)
    W = torch.randn(9, 4, dtype=dtype, generator=_gen(9))
    (g1,) = torch.autograd.grad((cholesky_qf(B + V) * W.conj()).real.sum(), V)
    (g2,) = torch.autograd.grad((householder_qf(B + V) * W.conj()).real.sum(), V)
    assert maxdiff(g1, g2) < 1e-12
    assert torch.autograd.gradcheck(lambda v: stiefel_qr(B, v), (V,))
    assert torch.autograd.gradgradcheck(lambda v: stiefel_qr(B, v), (V,))
