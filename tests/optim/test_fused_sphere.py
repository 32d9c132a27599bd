"""The fused sphere path of RiemannianSGD / RiemannianAdam (``dtriv.optim._sphere``) against
the generic path (the manifold interface) and against the explicit formulas."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import gen as _gen
from optim_helpers import quadratic_loss
from optim_helpers import run_steps as _run

from dtriv.manifolds import Sphere, Stiefel
from dtriv.optim import ManifoldParameter, RiemannianAdam, RiemannianSGD, _sphere
from dtriv.optim._riemannian import fused_path

DT = torch.float64


class GenericSphere(Sphere):
    """Overrides a fused map (with the same math), so the optimizers take the generic path."""

    def inner(self, B, U, V):
        return super().inner(B, U, V)


def _loss(shape, dtype, seed):
    return quadratic_loss(shape, dtype, seed, dim=-1)


ALGOS = [
    (RiemannianAdam, dict(lr=0.03)),
    (RiemannianAdam, dict(lr=0.03, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True)),
    (RiemannianAdam, dict(lr=0.03, maximize=True)),
    (RiemannianSGD, dict(lr=0.02, momentum=0.9)),
    (RiemannianSGD, dict(lr=0.02)),
    (RiemannianSGD, dict(lr=0.02, momentum=0.7, nesterov=True, weight_decay=0.01)),
    (RiemannianSGD, dict(lr=0.02, momentum=0.5, dampening=0.3)),
    (RiemannianSGD, dict(lr=0.02, momentum=0.5, dampening=1.0)),
]


def test_fast_path_selection():
    X = torch.randn(3, 5)
    assert fused_path(Sphere(5), X) is _sphere
    assert fused_path(Sphere(5, 2.0), X.double()) is _sphere
    assert fused_path(GenericSphere(5), X) is None  # a subclass that redefines a map
    assert fused_path(Sphere(5), X.to(torch.complex64)) is None
    assert fused_path(Sphere(5), X.half()) is None  # computed in float32 by the generic path


@pytest.mark.parametrize("algo,kwargs", ALGOS, ids=repr)
@pytest.mark.parametrize("method", ["exp", "projective"])
@pytest.mark.parametrize("shape,radius,count", [
    ((7,), 1.0, 1),  # one point: its numbers on the host
    ((3, 7), 2.5, 1), ((7,), 2.5, 3),  # batches of points: tensors (persistent buffers)
    ((2, 3, 7), 1.0, 2),
])
def test_fused_equals_generic_float64(algo, kwargs, method, shape, radius, count):
    X0 = [Sphere(shape[-1], radius).sample(*shape[:-1], generator=_gen(i), dtype=DT)
          for i in range(count)]
    fused = [ManifoldParameter(X.clone(), Sphere(shape[-1], radius)) for X in X0]
    generic = [ManifoldParameter(X.clone(), GenericSphere(shape[-1], radius)) for X in X0]
    loss = _loss(shape, DT, seed=5)
    a = _run(fused, algo(fused, retraction=method, **kwargs), loss, 40)
    b = _run(generic, algo(generic, retraction=method, **kwargs), loss, 40)
    for x, y, x0 in zip(a, b, X0):
        assert (x - x0).abs().max() > 1e-2  # it moved
        assert (x - y).abs().max() < 1e-12
        torch.testing.assert_close(torch.linalg.vector_norm(x, dim=-1),
                                   torch.full(shape[:-1], radius, dtype=DT), rtol=1e-14, atol=0)


# G = a tangent vector + normal_part x: the identity; the explicit fallback (mostly normal)
@pytest.mark.parametrize("normal_part", [0.1, 1e3])
@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("on_host", [False, True])
@pytest.mark.parametrize("radius", [1.0, 2.5])
def test_moment_against_explicit_formulas(normal_part, beta, on_host, radius):
    b, n = (1, 9) if on_host else (4, 9)
    M = Sphere(n, radius)
    X = M.sample(b, generator=_gen(0), dtype=DT)
    B = M.sample(b, generator=_gen(1), dtype=DT)  # the previous points
    m = M.proj_tangent(B, torch.randn(b, n, generator=_gen(2), dtype=DT))
    G = M.proj_tangent(X, torch.randn(b, n, generator=_gen(3), dtype=DT)) + normal_part * X
    new, sq = _sphere.moment_(M, X, G, m.clone(), beta, on_host)
    grad = M.proj_tangent(X, G)
    expected = beta * M.transport(B, X, m) + (1 - beta) * grad
    assert (new - expected).abs().max() < 1e-13 * G.abs().max()
    if on_host:
        assert isinstance(sq, float)
        sq = torch.tensor([sq], dtype=DT)
    torch.testing.assert_close(sq, (grad * grad).sum(-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["exp", "projective"])
@pytest.mark.parametrize("b,c", [(1, -0.3), (4, -0.3), (4, None), (1, 0.0)])
@pytest.mark.parametrize("radius", [1.0, 2.5])
def test_retract_is_the_manifold_map(method, b, c, radius):
    """In place, for a number or one step size per point: the manifold's retraction of
    ``c V``, back on the sphere (``exp``: then scaled to the radius, as the generic path
    settles its points)."""
    n = 6
    M = Sphere(n, radius)
    X = M.sample(b, generator=_gen(4), dtype=DT)
    V = M.proj_tangent(X, torch.randn(b, n, generator=_gen(5), dtype=DT))
    if c is None:
        c = torch.linspace(-0.5, 0.5, b, dtype=DT).unsqueeze(-1)
    expected = M.retract(X, V * c, method)
    if method == "exp":
        expected = M.project(expected)
    Y = X.clone()
    _sphere.retract_(M, method, Y, V, c, trusted=True)
    torch.testing.assert_close(Y, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_project_and_gradient(b, scale):
    M = Sphere(5, 2.5)
    X = M.sample(b, generator=_gen(6), dtype=DT)
    V = torch.randn(b, 5, generator=_gen(7), dtype=DT)
    torch.testing.assert_close(_sphere.gradient(M, X, V), M.proj_tangent(X, V),
                               rtol=0, atol=1e-14)
    W = V.clone()
    assert _sphere.project_(M, X, W, scale) is W
    torch.testing.assert_close(W, scale * M.proj_tangent(X, V), rtol=0, atol=1e-14)


@pytest.mark.parametrize("algo,kwargs", [
    (RiemannianAdam, dict(lr=0.03)), (RiemannianSGD, dict(lr=0.02, momentum=0.8)),
    (RiemannianSGD, dict(lr=0.02)),
])
def test_fused_step_on_a_parameter_whose_points_are_not_one_view(algo, kwargs):
    """Points in a transposed layout (rows of a column-major tensor): the batch is a copy,
    written back; the iterates are those of the generic path."""
    M, G = Sphere(7), GenericSphere(7)
    X0 = M.sample(4, generator=_gen(8), dtype=DT)
    fused = ManifoldParameter(X0.mT.contiguous().mT, M)  # not viewable as rows
    generic = ManifoldParameter(X0.clone(), G)
    assert not fused.is_contiguous()
    loss = _loss((4, 7), DT, seed=9)
    (a,) = _run([fused], algo([fused], **kwargs), loss, 10)
    (b,) = _run([generic], algo([generic], **kwargs), loss, 10)
    assert (a - X0).abs().max() > 1e-2
    assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("algo,kwargs", [
    (RiemannianAdam, {}), (RiemannianSGD, dict(momentum=0.9)), (RiemannianSGD, {})])
def test_sphere_buckets_take_the_fused_path(algo, kwargs, monkeypatch):
    calls = []
    original = _sphere.retract_
    monkeypatch.setattr(_sphere, "retract_", lambda *a: calls.append(1) or original(*a))
    loss = _loss((3, 7), DT, seed=12)
    for manifold, expected in ((Sphere(7), 4), (GenericSphere(7), 0)):
        calls.clear()
        p = ManifoldParameter(manifold.sample(3, generator=_gen(13), dtype=DT), manifold)
        _run([p], algo([p], lr=0.01, **kwargs), loss, 4)
        assert len(calls) == expected


@pytest.mark.parametrize("manifold,method", [(Sphere(7), "exp"), (Stiefel(8, 3), "qr")])
def test_parameters_of_one_bucket_with_different_step_counts(manifold, method):
    """Adam's bias corrections are per parameter: a parameter without gradient for its
    first steps (its count lags) in a bucket with one stepped all along follows the run it
    would have alone, and so does the other."""
    X0 = [manifold.sample(generator=_gen(20 + i), dtype=DT) for i in range(2)]
    loss = quadratic_loss(tuple(manifold.shape), DT, seed=22,
                          dim=-1 if isinstance(manifold, Sphere) else -2)
    p, q = (ManifoldParameter(X.clone(), manifold) for X in X0)
    opt = RiemannianAdam([p, q], lr=0.03, retraction=method)
    for t in range(8):
        opt.zero_grad()
        (loss(p) + (loss(q) if t >= 3 else 0)).backward()
        opt.step()
    assert opt.state[p]["step"] == 8 and opt.state[q]["step"] == 5
    for X, steps, got in ((X0[0], 8, p), (X0[1], 5, q)):
        alone = ManifoldParameter(X.clone(), manifold)
        (expected,) = _run([alone], RiemannianAdam([alone], lr=0.03, retraction=method), loss,
                           steps)
        assert (got.detach() - X).abs().max() > 1e-2
        torch.testing.assert_close(got.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("algo,gopt,kwargs", [
    (RiemannianAdam, "RiemannianAdam", dict(lr=1e-2)),
    (RiemannianAdam, "RiemannianAdam", dict(lr=1e-2, amsgrad=True)),
    (RiemannianSGD, "RiemannianSGD", dict(lr=1e-2)),
])
@pytest.mark.parametrize("method,gmanifold", [("projective", "Sphere"), ("exp", "SphereExact")])
@pytest.mark.parametrize("shape", [(512,), (16, 256)])  # one vector (host), rows (tensors)
def test_matches_geoopt_in_float32(algo, gopt, kwargs, method, gmanifold, shape):
    """geoopt's trajectory in single precision at sizes the optimizers meet (its ``Sphere``
    retracts by projection, ``SphereExact`` by the exponential map)."""
    import warnings

    with warnings.catch_warnings():  # geoopt scripts functions with the deprecated torch.jit
        warnings.simplefilter("ignore")
        import geoopt

    dt = torch.float32
    M = Sphere(shape[-1])
    X0 = M.sample(*shape[:-1], generator=_gen(30), dtype=dt)
    ours = ManifoldParameter(X0.clone(), M)
    theirs = geoopt.ManifoldParameter(X0.clone(), manifold=getattr(geoopt, gmanifold)())
    loss = _loss(shape, dt, seed=31)
    (a,) = _run([ours], algo([ours], retraction=method, **kwargs), loss, 30)
    (b,) = _run([theirs], getattr(geoopt.optim, gopt)([theirs], **kwargs), loss, 30)
    assert (a - X0).abs().max() > 1e-2
    assert (a - b).abs().max() < 1e-5
    assert M.distance(a).max() < 1e-6


def test_one_float32_point_with_a_tiny_gradient_takes_the_exponential_step():
    """One float32 point on CPU (host coefficients): a gradient of entries 1e-25 and lr 1e25 (a
    step of length 1) follows the geodesic; the norm of the step read 0 (its entries squared
    underflow), and the step became the projective one (0.12 off the geodesic)."""
    x = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(0)),
                                      dim=0)
    G = torch.randn(16, generator=torch.Generator().manual_seed(1))
    G = G - x * (x @ G)
    G = G / G.norm() * 1e-25
    p = ManifoldParameter(x.clone(), Sphere(16))
    opt = RiemannianSGD([p], lr=1e25, retraction="exp")
    p.grad = G.clone()
    opt.step()
    v = -(G.double() * 1e25)
    t = v.norm()
    exact = torch.cos(t) * x.double() + torch.sin(t) * v / t
    assert (p.detach().double() - exact).abs().max() < 1e-6
