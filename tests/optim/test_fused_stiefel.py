"""The fused Stiefel path of RiemannianSGD / RiemannianAdam against the generic path (the
manifold interface), against geoopt in float32, and its constraint error over long runs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from optim_helpers import gen as _gen
from optim_helpers import quadratic_loss
from optim_helpers import run_steps as _run

from dtriv.manifolds import Stiefel
from dtriv.optim import ManifoldParameter, RiemannianAdam, RiemannianSGD
from dtriv.optim._stiefel import fast_stiefel

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import geoopt


class GenericStiefel(Stiefel):
    """Overrides a fused map (with the same math), so the optimizers take the generic path."""

    def inner(self, B, U, V):
        return super().inner(B, U, V)


def _loss(shape, dtype, seed):
    return quadratic_loss(shape, dtype, seed, dim=-2)


def test_fast_path_selection():
    X = torch.zeros(2, 5, 3)
    assert fast_stiefel(Stiefel(5, 3), X)
    assert not fast_stiefel(GenericStiefel(5, 3), X)
    assert not fast_stiefel(Stiefel(5, 3), X.to(torch.complex128))


ALGOS = [
    (RiemannianAdam, dict(lr=0.03)),
    (RiemannianAdam, dict(lr=0.03, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True)),
    (RiemannianAdam, dict(lr=0.03, maximize=True)),
    (RiemannianSGD, dict(lr=0.02)),
    (RiemannianSGD, dict(lr=0.02, momentum=0.7, nesterov=True, weight_decay=0.01)),
    (RiemannianSGD, dict(lr=0.02, momentum=0.5, dampening=0.3)),
]


@pytest.mark.parametrize("algo,kwargs", ALGOS, ids=lambda a: repr(a))
@pytest.mark.parametrize("n,k,method,batch", [
    (8, 3, "qr", ()), (8, 3, "qr", (2,)), (3, 8, "qr", ()), (6, 6, "qr", ()),
    (8, 3, "cayley", ()), (3, 8, "polar", (2,)), (6, 6, "expm", ()),
    (150, 70, "qr", ()), (70, 150, "qr", ()),  # recursive block QR (k > BLOCK_QR_BASE)
])
def test_fused_equals_generic_float64(algo, kwargs, n, k, method, batch):
    dt = torch.float64
    X0 = [Stiefel(n, k).sample(*batch, generator=_gen(i), dtype=dt) for i in range(3)]
    fused = [ManifoldParameter(X.clone(), Stiefel(n, k)) for X in X0]
    generic = [ManifoldParameter(X.clone(), GenericStiefel(n, k)) for X in X0]
    loss = _loss(X0[0].shape, dt, seed=5)
    a = _run(fused, algo(fused, retraction=method, **kwargs), loss, 40)
    b = _run(generic, algo(generic, retraction=method, **kwargs), loss, 40)
    for x, y, x0 in zip(a, b, X0):
        assert (x - x0).abs().max() > 1e-2  # it moved
        assert (x - y).abs().max() < 1e-12


@pytest.mark.parametrize("algo,gopt,kwargs", [
    (RiemannianAdam, geoopt.optim.RiemannianAdam, dict(lr=1e-2)),
    (RiemannianSGD, geoopt.optim.RiemannianSGD, dict(lr=1e-2)),
])
@pytest.mark.parametrize("n,k", [(64, 64), (96, 24)])
def test_fused_qr_matches_geoopt_in_float32(algo, gopt, kwargs, n, k):
    dt = torch.float32
    X0 = Stiefel(n, k).sample(generator=_gen(0), dtype=dt)
    ours = ManifoldParameter(X0.clone(), Stiefel(n, k))
    theirs = geoopt.ManifoldParameter(X0.clone(), manifold=geoopt.Stiefel(canonical=False))
    loss = _loss((n, k), dt, seed=1)
    (a,) = _run([ours], algo([ours], retraction="qr", **kwargs), loss, 20)
    (b,) = _run([theirs], gopt([theirs], **kwargs), loss, 20)
    assert (a - X0).abs().max() > 1e-2
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("algo,gopt,kwargs", [
    (RiemannianAdam, geoopt.optim.RiemannianAdam, dict(lr=1e-2)),
    (RiemannianSGD, geoopt.optim.RiemannianSGD, dict(lr=1e-2)),
])
def test_a_stacked_bucket_matches_geoopt_step_after_step(algo, gopt, kwargs):
    # three parameters in one bucket: stacked gradients and temporaries come from the scratch
    # arena, reused from step to step; every parameter follows geoopt's trajectory (SGD
    # without momentum: geoopt seeds its momentum buffer differently, see test_riemannian)
    dt, n, k = torch.float32, 48, 16
    X0 = [Stiefel(n, k).sample(generator=_gen(i), dtype=dt) for i in range(3)]
    ours = [ManifoldParameter(X.clone(), Stiefel(n, k)) for X in X0]
    theirs = [geoopt.ManifoldParameter(X.clone(), manifold=geoopt.Stiefel(canonical=False))
              for X in X0]
    loss = _loss((n, k), dt, seed=4)
    a = _run(ours, algo(ours, retraction="qr", **kwargs), loss, 20)
    b = _run(theirs, gopt(theirs, **kwargs), loss, 20)
    for x0, x, y in zip(X0, a, b):
        assert (x - x0).abs().max() > 1e-2
        assert (x - y).abs().max() < 1e-5


def test_constraint_holds_over_1000_float32_steps():
    """Cholesky QR re-orthonormalizes at every step: the error does not accumulate."""
    M = Stiefel(48, 16)
    p = ManifoldParameter(M.sample(4, generator=_gen(2)), M)
    opt = RiemannianAdam([p], lr=0.05, retraction="qr")
    loss = _loss((4, 48, 16), torch.float32, seed=3)
    _run([p], opt, loss, 1000)
    assert M.distance(p.detach()).max() < 2e-6


@pytest.mark.parametrize("normal_part", [0.0, 1e3])  # the identity, then the explicit fallback
@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("n,k", [(9, 4), (200, 128)])  # 128 doubles: X^T G in padded rows
@pytest.mark.parametrize("on_host", [False, True])  # one point: the norm a number
def test_moment_and_sq_norm_against_explicit_formulas(normal_part, beta, n, k, on_host):
    from dtriv.optim._stiefel import moment_and_sq_norm_

    b = 1 if on_host else 3
    M = Stiefel(n, k)
    X = M.sample(b, generator=_gen(0), dtype=torch.float64)
    B = M.sample(b, generator=_gen(1), dtype=torch.float64)  # the previous points
    m = M.proj_tangent(B, torch.randn(b, n, k, generator=_gen(2), dtype=torch.float64))
    H = torch.randn(b, k, k, generator=_gen(3), dtype=torch.float64)
    G = torch.randn(b, n, k, generator=_gen(4), dtype=torch.float64)
    G = G + normal_part * X @ (H + H.mT)  # a mostly normal gradient defeats the identity
    new, sq = moment_and_sq_norm_(X, G, m.clone(), beta, on_host)
    grad = M.proj_tangent(X, G)
    expected = beta * M.transport(B, X, m) + (1 - beta) * grad
    scale = G.abs().max()
    assert (new - expected).abs().max() < 1e-13 * scale
    if on_host:
        assert isinstance(sq, float)
        sq = torch.tensor([sq], dtype=torch.float64)
    torch.testing.assert_close(sq, (grad * grad).sum((-2, -1)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("algo,gopt", [
    (RiemannianAdam, geoopt.optim.RiemannianAdam), (RiemannianSGD, geoopt.optim.RiemannianSGD),
])
@pytest.mark.parametrize("n,k", [(160, 130), (200, 100)])
def test_block_qr_steps_match_geoopt_in_float32(algo, gopt, n, k):
    """Widths above BLOCK_QR_BASE: the recursive block QR at every step after the first."""
    dt = torch.float32
    X0 = Stiefel(n, k).sample(generator=_gen(0), dtype=dt)
    ours = ManifoldParameter(X0.clone(), Stiefel(n, k))
    theirs = geoopt.ManifoldParameter(X0.clone(), manifold=geoopt.Stiefel(canonical=False))
    loss = _loss((n, k), dt, seed=1)
    (a,) = _run([ours], algo([ours], retraction="qr", lr=0.05), loss, 20)
    (b,) = _run([theirs], gopt([theirs], lr=0.05), loss, 20)
    assert (a - X0).abs().max() > 1e-2
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("b,n,k,base", [
    (3, 40, 27, 4), (2, 33, 33, 8), (1, 200, 150, 64), (2, 9, 1, 4),
    (1, 90, 80, None), (8, 90, 80, None),  # the default widths, one point and a batch
    # blocks at most twice as tall as wide: one triangular solve (SOLVE_MAX_ROWS_PER_COLUMN)
    (1, 64, 64, None), (2, 50, 30, None), (8, 60, 32, None), (1, 70, 50, 32),
])
@pytest.mark.parametrize("wide", [False, True])
def test_block_cholesky_qf_is_the_positive_q_factor(b, n, k, base, wide):
    from scipy.linalg import qr

    from dtriv.optim._stiefel import block_cholesky_qf_

    g = _gen(7)
    X = torch.linalg.qr(torch.randn(b, n, k, generator=g, dtype=torch.float64))[0]
    Y = X + 0.2 * torch.randn(b, n, k, generator=g, dtype=torch.float64) / n**0.5
    # the tall batch as stored (row-major) or as the transposed view of a wide bucket
    W = Y.mT.contiguous().mT if wide else Y.clone()
    assert block_cholesky_qf_(W, base=base)
    for y, q in zip(Y, W):
        Q, R = qr(y.numpy(), mode="economic")
        Q = Q * np.sign(R.diagonal())  # diag(R) > 0
        torch.testing.assert_close(q, torch.from_numpy(Q), rtol=0, atol=1e-13)
    eye = torch.eye(k, dtype=torch.float64)
    assert (W.mT @ W - eye).abs().max() < 1e-13


@pytest.mark.parametrize("b,n,k,base", [
    (3, 40, 27, 4), (1, 200, 150, 64), (8, 90, 80, None), (1, 64, 64, None), (1, 70, 50, 32)])
@pytest.mark.parametrize("wide", [False, True])
def test_block_cholesky_qf_into_out_equals_in_place(b, n, k, base, wide):
    """With ``out`` the q-factor goes there (a strided view too: a wide bucket's tall view)
    and equals the in-place result; an ``out`` of another shape is refused."""
    from dtriv.optim._stiefel import block_cholesky_qf_

    g = _gen(8)
    X = torch.linalg.qr(torch.randn(b, n, k, generator=g, dtype=torch.float64))[0]
    Y = X + 0.2 * torch.randn(b, n, k, generator=g, dtype=torch.float64) / n**0.5
    in_place = Y.clone()
    assert block_cholesky_qf_(in_place, base=base)
    out = torch.full((b, k, n), float("nan"), dtype=torch.float64).mT if wide else (
        torch.full((b, n, k), float("nan"), dtype=torch.float64))
    assert block_cholesky_qf_(Y.clone(), base=base, out=out)
    torch.testing.assert_close(out, in_place, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="out: expected the shape of Y"):
        block_cholesky_qf_(Y.clone(), out=torch.empty(b, n, k + 1, dtype=torch.float64))


def _symmetric_of_size(b, w, size, dtype, seed):
    """A batch of random symmetric ``w x w`` matrices scaled so that the largest Frobenius
    norm of the batch is ``size``."""
    E = torch.randn(b, w, w, generator=_gen(seed), dtype=torch.float64)
    E = E + E.mT
    E = E * (size / torch.linalg.vector_norm(E, dim=(-2, -1)).amax())
    return E.to(dtype)


@pytest.mark.parametrize("dtype,first,newton", [
    # the documented bounds, in numbers: sqrt(eps)/8 and eps^(1/4)/8
    (torch.float32, 4.3e-5, 2.3e-3), (torch.float64, 1.9e-9, 1.5e-5)])
@pytest.mark.parametrize("b,w", [(1, 64), (5, 32), (1, 128), (3, 7)])
@pytest.mark.parametrize("where", [(1e-3, "first"), (0.9, "first"), (1.1, "first"),
                                   (0.9, "newton"), (1.1, "newton")])
def test_near_identity_factor_is_the_inverse_cholesky_factor(dtype, first, newton, b, w, where):
    """Z with Z^T G Z = I, upper triangular with a positive diagonal, is L^{-T} (L the
    Cholesky factor of G = I + E) to rounding in every tier: the first-order term alone
    (|E|_F up to sqrt(eps)/8), one Newton step (up to eps^(1/4)/8), and None beyond; sizes
    on both sides of each bound."""
    from dtriv.optim._stiefel import _near_identity_factor, _series_tolerances

    assert _series_tolerances(dtype) == pytest.approx((first, newton), rel=0.03)
    size = where[0] * (first if where[1] == "first" else newton)
    E = _symmetric_of_size(b, w, size, dtype, seed=w + b)
    G = torch.eye(w, dtype=dtype) + E
    Z = _near_identity_factor(G.clone())
    if size > newton:
        assert Z is None
        return
    assert Z is not None and Z.dtype == dtype
    assert torch.equal(Z, Z.triu()) and bool((Z.diagonal(dim1=-2, dim2=-1) > 0).all())
    L = torch.linalg.cholesky(G.to(torch.float64))
    exact = torch.linalg.inv(L).mT
    u = torch.finfo(dtype).eps
    assert (Z.to(torch.float64) - exact).abs().max() <= 4 * u
    eye = torch.eye(w, dtype=torch.float64)
    orthonormality = Z.mT.double() @ G.double() @ Z.double() - eye
    assert orthonormality.abs().max() <= 8 * u


def test_near_identity_factor_refuses_non_finite_gram():
    from dtriv.optim._stiefel import _near_identity_factor

    G = torch.eye(6, dtype=torch.float64).repeat(2, 1, 1)
    G[1, 2, 3] = float("nan")
    assert _near_identity_factor(G) is None
    G[1, 2, 3] = float("inf")
    assert _near_identity_factor(G) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("step", [1e-7, 1e-5, 1e-3])
@pytest.mark.parametrize("b,n,k", [(1, 300, 256), (1, 200, 150), (8, 90, 80), (2, 40, 7)])
def test_block_cholesky_qf_near_identity_is_the_positive_q_factor(dtype, step, b, n, k,
                                                                  monkeypatch):
    """Y = X + c V a small step from orthonormal X (c |V|_F = ``step``), with the widths of
    ``near_identity``: the q-factor of scipy's QR (diag(R) > 0) to rounding, the same as the
    blocks by Cholesky give (to rounding), and the blocks take the series where it is exact
    to rounding (no Cholesky factorization at all when the step and the points' rounding
    error are below both bounds)."""
    from scipy.linalg import qr

    from dtriv.optim import _stiefel
    from dtriv.optim._stiefel import block_cholesky_qf_

    g = _gen(11)
    X = torch.linalg.qr(torch.randn(b, n, k, generator=g, dtype=torch.float64))[0]
    V = Stiefel(n, k).proj_tangent(X, torch.randn(b, n, k, generator=g, dtype=torch.float64))
    V = V * (step / torch.linalg.vector_norm(V, dim=(-2, -1), keepdim=True))
    Y = (X + V).to(dtype)
    series = []
    original = _stiefel._near_identity_factor

    def spy(G):
        Z = original(G)
        series.append(Z is not None)
        return Z

    monkeypatch.setattr(_stiefel, "_near_identity_factor", spy)
    Q = Y.clone()
    assert block_cholesky_qf_(Q, near_identity=True)
    monkeypatch.setattr(_stiefel, "_near_identity_factor", lambda G: None)  # Cholesky blocks
    by_cholesky = Y.clone()
    assert block_cholesky_qf_(by_cholesky, near_identity=True)
    u = torch.finfo(dtype).eps
    if dtype == torch.float64 or step <= 1e-5:  # within the bounds: no Cholesky block
        assert series and all(series)
    atol = 40 * u * math.sqrt(k)
    torch.testing.assert_close(Q, by_cholesky, rtol=0, atol=atol)
    for y, q in zip(Y.double(), Q.double()):
        R0, R = qr(y.numpy(), mode="economic")
        R0 = R0 * np.sign(R.diagonal())
        torch.testing.assert_close(q, torch.from_numpy(R0), rtol=0, atol=atol)
    eye = torch.eye(k, dtype=torch.float64)
    assert (Q.mT.double() @ Q.double() - eye).abs().max() <= 20 * u * math.sqrt(k)


def test_block_cholesky_qf_reports_rank_deficiency():
    from dtriv.optim._stiefel import block_cholesky_qf_

    Y = torch.randn(2, 10, 6, generator=_gen(0), dtype=torch.float64)
    Y[1, :, 4] = 0  # rank deficient: a zero pivot in the block of column 4
    assert not block_cholesky_qf_(Y, base=2)


def test_safe_for_block_qr_bounds_the_gram_deviation():
    from dtriv.optim._stiefel import BLOCK_QR_MAX_STEP, safe_for_block_qr

    M = Stiefel(30, 12)
    X = M.sample(4, generator=_gen(1), dtype=torch.float64)
    V = M.proj_tangent(X, torch.randn(4, 30, 12, generator=_gen(2), dtype=torch.float64))
    c_edge = (BLOCK_QR_MAX_STEP / (V * V).sum((-2, -1))).sqrt().min()
    assert safe_for_block_qr(V, 0.99 * c_edge)
    assert not safe_for_block_qr(V, 1.01 * c_edge)
    c = torch.full((4, 1, 1), 0.99 * float(c_edge), dtype=torch.float64)
    assert safe_for_block_qr(V, c)
    Y = X + c * V  # within the bound: kappa(Y)^2 <= 1 + BLOCK_QR_MAX_STEP
    assert float(torch.linalg.cond(Y).max()) ** 2 <= 1 + BLOCK_QR_MAX_STEP


def test_safe_for_block_qr_contract_in_numbers():
    """The documented contract with fixed numbers (not read from the constant): a tangent step
    with c^2 |V|_F^2 = 1.9 is safe and gives kappa(X + c V)^2 <= 3; one with 2.5 along a rank-one
    tangent V (kappa^2 = 3.5 > 3, the bound is attained) is refused."""
    from dtriv.optim._stiefel import safe_for_block_qr

    M = Stiefel(20, 6)
    X = M.sample(generator=_gen(30), dtype=torch.float64)
    V = M.proj_tangent(X, torch.randn(20, 6, generator=_gen(31), dtype=torch.float64))
    c = math.sqrt(1.9 / float((V * V).sum()))
    assert safe_for_block_qr(V.unsqueeze(0), c)
    assert safe_for_block_qr(V.unsqueeze(0), torch.tensor([c], dtype=torch.float64))
    assert float(torch.linalg.cond(X + c * V)) ** 2 <= 3
    # rank one, normal to the columns of X (so tangent): Y^T Y = I + c^2 V^T V, eigenvalues 1
    # and 1 + c^2 |V|_F^2
    u = torch.randn(20, generator=_gen(32), dtype=torch.float64)
    u = u - X @ (X.T @ u)
    W = torch.outer(u, torch.randn(6, generator=_gen(33), dtype=torch.float64))
    torch.testing.assert_close(M.proj_tangent(X, W), W, rtol=0, atol=1e-12)
    c = math.sqrt(2.5 / float((W * W).sum()))
    assert not safe_for_block_qr(W.unsqueeze(0), c)
    assert not safe_for_block_qr(torch.stack([V, W]), torch.tensor([0.0, c]))
    assert float(torch.linalg.cond(X + c * W)) ** 2 > 3
    c = math.sqrt(1.9 / float((W * W).sum()))
    assert safe_for_block_qr(W.unsqueeze(0), c)
    assert float(torch.linalg.cond(X + c * W)) ** 2 <= 3


def test_checked_retraction_after_the_parameter_is_changed_outside():
    """A point written by the user (off the manifold) takes the checked QR, not the fast one."""
    M = Stiefel(80, 70)
    X0 = M.sample(generator=_gen(3), dtype=torch.float64)
    p = ManifoldParameter(X0.clone(), M)
    opt = RiemannianAdam([p], lr=1e-2, retraction="qr")
    loss = _loss((80, 70), torch.float64, seed=4)
    _run([p], opt, loss, 3)
    with torch.no_grad():
        p.mul_(3.0).add_(torch.randn(80, 70, generator=_gen(5), dtype=torch.float64))
    _run([p], opt, loss, 1)
    assert M.distance(p.detach()).max() < 1e-12


def _ill_conditioned(n, k, cond, dtype, seed):
    """An ``n x k`` matrix with singular values from 1 down to ``1 / cond`` (log-spaced)."""
    g = _gen(seed)
    U = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype)


@pytest.mark.parametrize("algo,kwargs", [
    (RiemannianAdam, dict(lr=1e-2)), (RiemannianSGD, dict(lr=1e-3, momentum=0.9)),
    (RiemannianSGD, dict(lr=1e-2)),
])
@pytest.mark.parametrize("count,n,k", [
    (1, 64, 64), (1, 128, 64),  # one point: the exact test (EXACT_TEST_MAX_NUMEL), the probes
    (3, 64, 64),
])
def test_a_write_through_data_takes_the_checked_qr(algo, kwargs, count, n, k):
    """``p.data.copy_(W)`` does not bump ``p``'s version counter, so the optimizer still
    takes the point for its own; the test of the points sends the ill-conditioned ``W`` to
    the checked QR, whose result is orthonormal (the block Cholesky QR's was off by 5e-3 to
    3e-2 in float32)."""
    dt = torch.float32
    M = Stiefel(n, k)
    params = _params([M.sample(generator=_gen(i), dtype=dt) for i in range(count)], M)
    opt = algo(params, retraction="qr", **kwargs)
    loss = _loss((n, k), dt, seed=8)
    _run(params, opt, loss, 3)
    version = params[-1]._version
    params[-1].data.copy_(_ill_conditioned(n, k, 1e3, dt, seed=9))
    assert params[-1]._version == version  # invisible to the version counter
    _run(params, opt, loss, 1)
    for p in params:
        assert M.distance(p.detach()).max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,n,k", [(1, 64, 64), (3, 300, 40), (2, 40, 1)])
def test_near_orthonormal_tells_points_from_perturbed_ones(dtype, b, n, k):
    from dtriv.optim._stiefel import NEAR_ORTHONORMAL_TOL, near_orthonormal

    X = Stiefel(n, k).sample(b, generator=_gen(10), dtype=dtype)
    assert near_orthonormal(X)
    # E = X^T X - I of Frobenius norm 100 tol, rank one: X (I + t u u^T)
    u = torch.randn(k, 1, generator=_gen(11), dtype=dtype)
    u = u / u.norm()
    t = math.sqrt(1 + 100 * NEAR_ORTHONORMAL_TOL) - 1
    Y = X.clone()
    Y[-1] = X[-1] + t * (X[-1] @ u) @ u.T
    E = Y[-1].mT @ Y[-1] - torch.eye(k, dtype=dtype)
    assert float(torch.linalg.matrix_norm(E)) == pytest.approx(100 * NEAR_ORTHONORMAL_TOL,
                                                                rel=1e-3)
    assert not near_orthonormal(Y)
    assert not near_orthonormal(1.01 * X)
    if k > 1:  # a repeated column: rank deficient, unit column norms
        Z = X.clone()
        Z[0, :, 1] = Z[0, :, 0]
        assert not near_orthonormal(Z)


def test_the_optimizers_own_points_take_the_block_qr(monkeypatch):
    """The probe test must not turn away the points the optimizer wrote (float32, many
    steps, a tall and a square shape): every step after the first is a block Cholesky QR."""
    from dtriv.optim import _stiefel

    calls = []
    original = _stiefel.block_cholesky_qf_

    def counting(Y, **kwargs):
        calls.append(Y.shape)
        return original(Y, **kwargs)

    monkeypatch.setattr(_stiefel, "block_cholesky_qf_", counting)
    dt = torch.float32
    for n, k, steps in ((2048, 128, 40), (256, 256, 100)):
        calls.clear()
        M = Stiefel(n, k)
        p = ManifoldParameter(M.sample(generator=_gen(12), dtype=dt), M)
        opt = RiemannianAdam([p], lr=1e-2, retraction="qr")
        _run([p], opt, _loss((n, k), dt, seed=13), steps)
        assert len(calls) == steps - 1
        assert M.distance(p.detach()).max() < 1e-5


def _params(X0, manifold):
    return [ManifoldParameter(X.clone(), manifold) for X in X0]


@pytest.mark.parametrize("algo,kwargs", [
    (RiemannianAdam, dict(lr=0.03)), (RiemannianSGD, dict(lr=0.02, momentum=0.8)),
    (RiemannianSGD, dict(lr=0.02)),  # without momentum: in place too
])
def test_persistent_bucket_survives_replaced_data_and_state(algo, kwargs):
    """A multi-parameter bucket is updated in place in persistent buffers; replacing a
    parameter's ``.data``, writing a parameter in place, and loading a state dict (into a
    fresh model and optimizer) all continue the trajectory of the generic path."""
    import io

    dt = torch.float64
    n, k = 12, 5
    X0 = [Stiefel(n, k).sample(generator=_gen(i), dtype=dt) for i in range(4)]
    loss = _loss((n, k), dt, seed=6)
    fused = _params(X0, Stiefel(n, k))
    generic = _params(X0, GenericStiefel(n, k))
    opt_f, opt_g = algo(fused, retraction="qr", **kwargs), algo(generic, retraction="qr", **kwargs)
    _run(fused, opt_f, loss, 5)
    _run(generic, opt_g, loss, 5)
    # the fused bucket's parameters are rows of one buffer
    base = fused[0].data_ptr()
    assert [p.data_ptr() - base for p in fused] == [i * n * k * 8 for i in range(4)]

    with torch.no_grad():  # a new tensor for one parameter, an in-place write to another
        for ps in (fused, generic):
            ps[1].data = ps[1].data.clone()
            ps[2].mul_(-1.0)
    _run(fused, opt_f, loss, 5)
    _run(generic, opt_g, loss, 5)

    # save and load into a fresh model and optimizer
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in fused], "opt": opt_f.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    fresh = _params(saved["params"], Stiefel(n, k))
    opt_fresh = algo(fresh, retraction="qr", **kwargs)
    opt_fresh.load_state_dict(saved["opt"])
    a = _run(fresh, opt_fresh, loss, 5)
    b = _run(generic, opt_g, loss, 5)
    c = _run(fused, opt_f, loss, 5)
    for x, y, z in zip(a, b, c):
        assert (x - y).abs().max() < 1e-12
        assert (z - y).abs().max() < 1e-12
        assert Stiefel(n, k).distance(x).max() < 1e-13


@pytest.mark.parametrize("algo,kwargs", [
    (RiemannianAdam, dict(lr=0.03)), (RiemannianSGD, dict(lr=0.02, momentum=0.8)),
    (RiemannianSGD, dict(lr=0.02)),
])
def test_buckets_that_change_every_step_keep_one_stack_per_tensor(algo, kwargs):
    """Conditional computation (a mixture of experts): each step only a random subset of the
    parameters gets a gradient, so the bucket changes from step to step. The stacked buffers
    then stay bounded (at most one cached stack per tensor and state entry, and no more
    memory than a few copies of the parameters), and the trajectory is that of one generic
    optimizer per parameter."""
    dt = torch.float64
    n, k, count, routed = 10, 4, 12, 3
    X0 = [Stiefel(n, k).sample(generator=_gen(i), dtype=dt) for i in range(count)]
    fused = _params(X0, Stiefel(n, k))
    single = _params(X0, GenericStiefel(n, k))
    opt = algo(fused, retraction="qr", **kwargs)
    singles = [algo([p], retraction="qr", **kwargs) for p in single]
    C = torch.randn(n, k, generator=_gen(99), dtype=dt)
    rng = np.random.default_rng(0)
    param_bytes = sum(p.numel() * p.element_size() for p in fused)
    for step in range(120):
        chosen = rng.choice(count, routed, replace=False)
        opt.zero_grad()
        sum((fused[i] * C).pow(3).sum() for i in chosen).backward()
        opt.step()
        for i in chosen:
            singles[i].zero_grad()
            (single[i] * C).pow(3).sum().backward()
            singles[i].step()
        stacks = opt.__dict__["_stacks"]
        names = {key[0] for key in stacks}
        for name in names:
            keys = [key[1] for key in stacks if key[0] == name]
            ids = [i for key in keys for i in key]
            assert len(ids) == len(set(ids)), (step, name)  # one cached stack per tensor
        held = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes()
                for p in fused for b in [p.data] + [t for t in opt.state[p].values()
                                                    if isinstance(t, torch.Tensor)]}
        cached = sum(b.untyped_storage().nbytes() for b in stacks.values())
        assert cached <= 2 * param_bytes, step
        assert sum(held.values()) <= 2 * routed * param_bytes, step
    for a, b in zip(fused, single):
        assert (a.detach() - b.detach()).abs().max() < 1e-12


@pytest.mark.parametrize("algo,kwargs", [
    (RiemannianAdam, dict(lr=0.03)), (RiemannianSGD, dict(lr=0.02, momentum=0.8)),
    (RiemannianSGD, dict(lr=0.02)),  # without momentum: in place too
])
@pytest.mark.parametrize("n,k", [(8, 3), (3, 8)])
def test_fused_step_on_a_parameter_whose_batch_is_not_one_view(algo, kwargs, n, k):
    """A single parameter whose batch dimensions cannot be merged into one view (permuted
    strides): the in-place fused step works on a copy and writes it back."""
    dt = torch.float64
    X0 = Stiefel(n, k).sample(2, 2, generator=_gen(0), dtype=dt)
    strided = X0.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    with pytest.raises(RuntimeError):
        strided.view(-1, n, k)
    fused = [ManifoldParameter(strided.clone().permute(1, 0, 2, 3).contiguous()
                               .permute(1, 0, 2, 3), Stiefel(n, k))]
    assert fused[0].stride() == strided.stride()
    generic = [ManifoldParameter(X0.clone(), GenericStiefel(n, k))]
    loss = _loss(X0.shape, dt, seed=5)
    (a,) = _run(fused, algo(fused, retraction="qr", **kwargs), loss, 10)
    (b,) = _run(generic, algo(generic, retraction="qr", **kwargs), loss, 10)
    assert (a - X0).abs().max() > 1e-2
    assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("n,k,batch", [
    (80, 70, ()), (40, 30, ()),  # one point: the bound on the host (probes, exact test)
    (40, 30, (2,)),
])
def test_large_steps_take_the_checked_qr(monkeypatch, n, k, batch):
    """Steps beyond the block-QR bound (here c^2 |V|_F^2 >> 2) fall back to the checked QR
    (Householder for such steps): the block QR never runs and the iterates stay
    orthonormal to rounding."""
    from dtriv.optim import _stiefel

    calls = []
    original = _stiefel.block_cholesky_qf_
    monkeypatch.setattr(_stiefel, "block_cholesky_qf_",
                        lambda Y, **kwargs: calls.append(1) or original(Y, **kwargs))
    M = Stiefel(n, k)
    p = ManifoldParameter(M.sample(*batch, generator=_gen(8), dtype=torch.float64), M)
    opt = RiemannianSGD([p], lr=5.0, momentum=0.9, retraction="qr")
    loss = _loss(p.shape, torch.float64, seed=9)
    for _ in range(4):
        opt.zero_grad()
        loss(p).backward()
        step = 25.0 * (M.proj_tangent(p.detach(), p.grad) ** 2).sum((-2, -1)).min()
        opt.step()
        assert M.distance(p.detach()).max() < 1e-12
    assert step > 100 * _stiefel.BLOCK_QR_MAX_STEP
    assert not calls


@pytest.mark.parametrize("lr,near", [(1e-4, True), (0.3, False)])
@pytest.mark.parametrize("n,k,batch", [
    (200, 150, ()), (40, 30, ()),  # one point: its step on the host (the probes; the exact test)
    (200, 150, (3,))])
def test_the_step_picks_the_widths_of_the_series(monkeypatch, lr, near, n, k, batch):
    """Adam's first steps have c |V|_F = lr: the optimizer asks block_cholesky_qf_ for the
    widths of ``near_identity`` exactly when c^2 |V|_F^2 is below the second series bound
    (float32: 2.3e-3), and the result stays on the manifold either way."""
    from dtriv.optim import _stiefel

    hints = []
    original = _stiefel.block_cholesky_qf_
    monkeypatch.setattr(_stiefel, "block_cholesky_qf_",
                        lambda Y, **kwargs: hints.append(kwargs.get("near_identity"))
                        or original(Y, **kwargs))
    M = Stiefel(n, k)
    p = ManifoldParameter(M.sample(*batch, generator=_gen(21), dtype=torch.float32), M)
    opt = RiemannianAdam([p], lr=lr, retraction="qr")
    _run([p], opt, _loss(p.shape, torch.float32, seed=22), 4)
    assert hints and all(h is near for h in hints)
    assert M.distance(p.detach()).max() < 1e-5


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 96, 96), (2, 40, 40), (2, 32, 32)])
def test_sym2_equals_the_plain_formula_exactly(shape):
    from dtriv.optim._stiefel import _sym2_

    A = torch.randn(*shape, generator=_gen(0))
    S2 = _sym2_(A)
    assert torch.equal(S2, A + A.mT)
    assert torch.equal(S2, S2.mT)
    # the factor 1/2 taken by a product or a norm instead: the same to the bit
    X = torch.randn(*shape, generator=_gen(1))
    assert torch.equal(torch.baddbmm(X, X, S2, alpha=-0.5), torch.baddbmm(X, X, S2 * 0.5, alpha=-1))
    assert torch.equal(0.25 * (S2 ** 2).sum(), ((S2 * 0.5) ** 2).sum())


def test_a_huge_step_of_underflowing_gradients_takes_the_checked_qr():
    """float32, one point on CPU, gradients of 2e-22 (their squares underflow: the norm read
    0) and lr 5e24: the step c |V| = 1e3 must fail the block QR's bound, and the result is
    the q-factor of X - lr G (it was the unchecked block QR of an ill-conditioned Y: 2e-2
    off orthonormal)."""
    n, k = 128, 64
    M = Stiefel(n, k)
    X0 = M.sample(generator=_gen(0), dtype=torch.float64)
    p = ManifoldParameter(X0.float(), M)
    opt = RiemannianSGD([p], lr=1e-2, retraction="qr")
    p.grad = torch.randn(n, k, generator=_gen(1))
    opt.step()  # the point is now the optimizer's own (trusted)
    X = p.detach().double()
    u = torch.randn(n, generator=_gen(2), dtype=torch.float64)
    u -= X @ (X.T @ u)
    w = torch.randn(k, generator=_gen(3), dtype=torch.float64)
    G = (2e-22 * torch.outer(u / u.norm(), w / w.norm())).float()  # normal to span(X)
    assert torch.linalg.vector_norm(G).item() == 0.0  # the underflow this guards against
    opt.param_groups[0]["lr"] = 5e24
    p.grad = G.clone()
    opt.step()
    Y = X - 5e24 * G.double()
    Q, R = torch.linalg.qr(Y)
    want = Q * torch.sign(torch.diagonal(R))
    assert M.distance(p.detach()).max() < 1e-5
    assert (p.detach().double() - want).abs().max() < 1e-3  # Y has kappa ~ 1e3


def test_adam_with_eps_0_and_a_zero_gradient_gives_nan_on_every_path():
    """eps = 0 and no gradient: -lr / 0 times a zero moment, NaN, as torch's and geoopt's
    Adam give (the one-point host path divided Python floats by zero and raised, leaving the
    step count and moments updated)."""
    X = Stiefel(8, 4).sample(generator=_gen(0))
    for count in (1, 2):
        ps = [ManifoldParameter(X.clone(), Stiefel(8, 4)) for _ in range(count)]
        opt = RiemannianAdam(ps, lr=1e-2, eps=0.0, retraction="qr")
        for p in ps:
            p.grad = torch.zeros(8, 4)
        opt.step()
        assert all(p.detach().isnan().all() for p in ps)
    t = torch.nn.Parameter(X.clone())
    t.grad = torch.zeros(8, 4)
    torch.optim.Adam([t], lr=1e-2, eps=0.0).step()
    assert t.detach().isnan().all()


@pytest.mark.parametrize("cls", [RiemannianAdam, RiemannianSGD])
def test_stacked_parameters_keep_their_layout(cls):
    """Column-major points (the q-factors of torch.linalg.qr) keep their strides, and so do their
    gradients, once re-pointed to the rows of the stacked buffer (they became row-major, and
    DistributedDataParallel warned at every step that the gradients' strides no longer
    matched its buckets); the trajectory equals that of row-major copies to rounding."""
    kwargs = {"momentum": 0.9} if cls is RiemannianSGD else {}
    g = torch.Generator().manual_seed(0)
    points = [torch.linalg.qr(torch.randn(32, 16, generator=g))[0] for _ in range(3)]
    assert not points[0].is_contiguous() and points[0].mT.is_contiguous()
    finals = []
    for make in (lambda P: P, lambda P: P.contiguous()):
        params = [ManifoldParameter(make(P.clone()), Stiefel(32, 16)) for P in points]
        strides = [p.stride() for p in params]
        opt = cls(params, lr=1e-2, **kwargs)
        inputs = torch.Generator().manual_seed(1)
        for _ in range(5):
            opt.zero_grad()
            x = torch.randn(4, 32, generator=inputs)
            sum((x @ p).pow(2).sum() for p in params).backward()
            opt.step()
        assert [p.stride() for p in params] == strides
        assert [p.grad.stride() for p in params] == strides
        finals.append(torch.stack([p.detach() for p in params]))
    torch.testing.assert_close(finals[0], finals[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [RiemannianAdam, RiemannianSGD])
def test_an_empty_batch_of_points_steps(cls):
    """A parameter holding no point ((0, 8, 4)) steps like the generic path: it crashed in the
    block-QR bound (a reduction over nothing) at its second step."""
    p = ManifoldParameter(torch.empty(0, 8, 4), Stiefel(8, 4))
    opt = cls([p], lr=0.1, retraction="qr")
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert p.shape == (0, 8, 4)


@pytest.mark.parametrize("cls", [RiemannianAdam, RiemannianSGD])
def test_tied_parameters_stay_tied(cls):
    """Parameters that do not own their memory (two tied to one storage, a view of a larger
    bank that the model reads) are not re-pointed to a stacked buffer: the bucket is written
    back, the ties hold, and the steps equal the generic path's. Re-pointed, they were
    separated from their memory (0.24 apart after 5 SGD steps)."""
    kwargs = {"momentum": 0.9} if cls is RiemannianSGD else {}
    g = torch.Generator().manual_seed(0)
    bank = torch.stack([torch.linalg.qr(torch.randn(8, 4, generator=g))[0] for _ in range(3)])
    results = []
    for manifold in (Stiefel(8, 4), GenericStiefel(8, 4)):
        storage = bank.clone()
        params = [ManifoldParameter(storage[i], manifold) for i in range(3)]  # views of it
        opt = cls(params, lr=0.05, **kwargs)
        for step in range(5):
            for p in params:
                p.grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            opt.step()
        for i, p in enumerate(params):
            assert p.data_ptr() == storage[i].data_ptr()
            assert torch.equal(p.detach(), storage[i])
        results.append(storage)
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [RiemannianAdam, RiemannianSGD])
def test_a_stacked_bucket_is_not_copied_at_later_steps(cls, monkeypatch):
    """Once re-pointed to the rows of their stacked buffer, the parameters no longer own their
    memory, yet they are that buffer's rows: later steps update it in place, with no stacked
    copy written back (the memory test alone sent every later step to the copying path)."""
    from dtriv.optim import radam, rsgd

    module = radam if cls is RiemannianAdam else rsgd
    copies = []  # the calls that stack the parameters themselves into a copy
    original = module.stack

    def spy(tensors, out=None):
        copies.extend(t for t in tensors if any(t is p for p in params))
        return original(tensors, out)

    monkeypatch.setattr(module, "stack", spy)
    kwargs = {"momentum": 0.9} if cls is RiemannianSGD else {}
    params = [ManifoldParameter(Stiefel(16, 8).sample(), Stiefel(16, 8)) for _ in range(3)]
    opt = cls(params, lr=1e-2, **kwargs)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert copies == []
    assert opt._stackable(params)
