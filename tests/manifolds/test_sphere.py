"""The sphere of radius r."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from dtriv.manifolds import Sphere

F64 = torch.float64
CASES = {
    "unit": (Sphere(5), F64),
    "radius": (Sphere(4, radius=2.5), F64),
    "complex": (Sphere(3, radius=0.5), torch.complex128),
}
RETRACTION_CASES = [(c, m) for c, (M, _) in CASES.items() for m in M.retractions]


def rdot(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (x.conj() * v).real.sum(-1)


def tangent_vector(B: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A tangent vector from an orthonormal complement of B (Gram–Schmidt, not proj_tangent)."""
    Z = torch.randn(B.shape, generator=gen, dtype=B.dtype)
    x = B / torch.linalg.vector_norm(B, dim=-1, keepdim=True)
    return Z - x * rdot(x, Z)[..., None]


# ---------------------------------------------------------------------------- 1. tangent
@pytest.mark.parametrize("case", list(CASES))
def test_proj_tangent_is_orthogonal_projection(case, gen):
    M, dtype = CASES[case]
    B = M.sample(4, generator=gen, dtype=dtype)
    Z = torch.randn(B.shape, generator=gen, dtype=dtype)
    P = M.proj_tangent(B, Z)
    assert rdot(B, P).abs().max() < 1e-12
    torch.testing.assert_close(M.proj_tangent(B, P), P, atol=1e-12, rtol=0)
    for _ in range(3):
        W = tangent_vector(B, gen)
        assert M.inner(B, Z - P, W).abs().max() < 1e-12
    torch.testing.assert_close(M.proj_tangent(B, W), W, atol=1e-12, rtol=0)


def test_dim():
    assert Sphere(5).dim == 4 and Sphere(1).dim == 0
    B = Sphere(5, radius=3.0).sample(dtype=F64)
    P = Sphere(5, radius=3.0).proj_tangent(B.expand(5, 5), torch.eye(5, dtype=F64))
    assert torch.linalg.matrix_rank(P) == 4


# ---------------------------------------------------------------------------- 2. project
@pytest.mark.parametrize("case", list(CASES))
def test_project(case, gen):
    M, dtype = CASES[case]
    B = M.sample(3, generator=gen, dtype=dtype)
    torch.testing.assert_close(M.project(B), B, atol=1e-14, rtol=0)
    X = 3 * torch.randn(M.n, generator=gen, dtype=dtype)
    P = M.project(X)
    x = X.numpy()
    np.testing.assert_allclose(P.numpy(), M.radius * x / np.linalg.norm(x), atol=1e-14)
    others = M.sample(500, generator=gen, dtype=dtype)
    dist = torch.linalg.vector_norm(X - P)
    assert dist <= torch.linalg.vector_norm(X - others, dim=-1).min()
    V = M.random_tangent(P.expand(100, M.n), generator=gen)
    near = M.retract(P.expand_as(V), 1e-2 * V / torch.linalg.vector_norm(V, dim=-1, keepdim=True))
    assert dist <= torch.linalg.vector_norm(X - near, dim=-1).min() + 1e-13


def test_project_zero_vector():
    P = Sphere(3, radius=2.0).project(torch.zeros(2, 3, dtype=F64))
    torch.testing.assert_close(P, torch.tensor([[2.0, 0, 0], [2.0, 0, 0]], dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_project_at_extreme_scales(dtype, gen):
    """float32 vectors of entries 1e-30 .. 1e30: the squares in the norm underflow to 0 or
    overflow to inf (the direction was lost: e1, or the zero vector); the oracle is the
    float64 direction of the same vector."""
    M = Sphere(6, radius=2.0)
    x = torch.randn(6, generator=gen, dtype=F64 if dtype == torch.float32 else torch.complex128)
    for scale in (1e-30, 1e-23, 1e-21, 1e19, 1e30):
        X = (scale * x).to(dtype)
        P = M.project(X)
        direction = X.to(x.dtype) / torch.linalg.vector_norm(X.to(x.dtype))
        assert M.check(P), scale
        torch.testing.assert_close(P.to(x.dtype), 2.0 * direction, atol=1e-6, rtol=0)
    X = (1e-25 * x).to(dtype).requires_grad_()
    (M.project(X).real.sum()).backward()  # the gradient scales like 1/|X|: finite, 1e25
    assert bool(torch.isfinite(X.grad).all())
    assert 1e23 < float(X.grad.abs().max()) < 1e27


# ---------------------------------------------------------------------------- 3. check
@pytest.mark.parametrize("M", [Sphere(1), Sphere(6), Sphere(5, radius=7.0), Sphere(1024)],
                         ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.complex64])
def test_check_sample(M, dtype, gen):
    X = M.sample(2, 3, generator=gen, dtype=dtype)
    assert X.shape == (2, 3, M.n) and X.dtype == dtype
    ok, reason = M.check(X, explain=True)
    assert ok, reason
    assert M.distance(X).shape == (2, 3)


def test_check_perturbed_explains(gen):
    M = Sphere(4, radius=2.0)
    X = M.sample(5, generator=gen, dtype=F64)
    X[3] *= 1.001
    assert not M.check(X)
    ok, reason = M.check(X, explain=True)
    assert not ok and "X[3]" in reason and "radius" in reason and "1.000e-03" in reason
    torch.testing.assert_close(M.distance(X)[3], torch.tensor(1e-3, dtype=F64))


def test_tolerance():
    e32, e64 = torch.finfo(torch.float32).eps, torch.finfo(F64).eps
    assert Sphere(10).tolerance(torch.float32) == pytest.approx(1000 * e32)
    assert Sphere(10).tolerance(F64) == pytest.approx(1000 * e64)
    # capped at 100 sqrt(eps): at n = 100,000 the uncapped bound (1.19) admitted the zero vector
    assert Sphere(100_000).tolerance(torch.float32) == pytest.approx(100 * math.sqrt(e32))
    assert not Sphere(100_000).check(torch.zeros(100_000))
    assert not Sphere(100_000).check(2 * Sphere(100_000).sample())
    assert Sphere(100_000).check(Sphere(100_000).sample())
    # in half precision even the capped bound passed 1 (bfloat16, n = 8: 6.25): at most 0.1
    for dtype in (torch.bfloat16, torch.float16):
        assert Sphere(8).tolerance(dtype) == 0.1
        assert not Sphere(8).check(torch.zeros(8, dtype=dtype))
        assert not Sphere(8).check(torch.full((8,), 0.5, dtype=dtype))  # norm 1.41
        assert Sphere(8).check(Sphere(8).sample(dtype=F64).to(dtype))


def test_project_keeps_nan():
    P = Sphere(3).project(torch.tensor([[float("nan"), 1.0, 0.0], [0.0, 3.0, 4.0]], dtype=F64))
    assert P[0].isnan().all()  # not the point e1 chosen for the zero vector
    torch.testing.assert_close(P[1], torch.tensor([0.0, 0.6, 0.8], dtype=F64))


@pytest.mark.parametrize("batch", [3, 5])
@pytest.mark.parametrize("method", ["exp", "projective"])
def test_one_point_with_a_batch_of_vectors_broadcasts(batch, method, gen):
    # one base (n,) with vectors (b, n): equal to the expanded base, values and gradients
    # (with b == n a wrongly shaped dot product broadcast silently along the wrong dimension)
    M = Sphere(3, radius=2.0)
    x = M.sample(generator=gen, dtype=F64)
    V = torch.randn(batch, 3, generator=gen, dtype=F64)
    G = torch.randn(batch, 3, generator=gen, dtype=F64)
    T = M.proj_tangent(x, V)
    torch.testing.assert_close(T, M.proj_tangent(x.expand(batch, 3), V))
    assert rdot(x, T).abs().max() < 1e-13
    torch.testing.assert_close(M.retract(x, T, method), M.retract(x.expand(batch, 3), T, method))
    grads = []
    for expand in (False, True):
        xr, Vr = x.clone().requires_grad_(), V.clone().requires_grad_()
        out = M.trivialize(xr.expand(batch, 3) if expand else xr, Vr, method)
        grads.append(torch.autograd.grad((out * G).sum(), (xr, Vr)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    xr, Vr = x.clone().requires_grad_(), V.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: M.trivialize(a, b, method), (xr, Vr))


def test_shapes_that_do_not_broadcast_are_refused(gen):
    M = Sphere(3)
    B = M.sample(2, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match=r"^V: expected a shape that broadcasts with that of B"):
        M.retract(B, torch.zeros(4, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"^X: expected a shape that broadcasts"):
        M.tangent(B, torch.zeros(4, 3, dtype=F64))


def test_a_complex_tangent_at_a_real_point_is_refused(gen):
    """The results have the dtype of ``B``: a complex ``V`` at a real ``B`` would lose its
    imaginary part (and leave the sphere), so it is refused with the argument named; another
    real dtype is computed in the promoted one and returned in that of ``B``."""
    M = Sphere(3)
    B = M.sample(2, generator=gen, dtype=F64)
    V = torch.tensor([0.0, 0.5j, 0.0], dtype=torch.complex128)
    for call, name in ((lambda: M.retract(B, V), "V"), (lambda: M.proj_tangent(B, V), "V"),
                       (lambda: M.tangent(B, V), "X"),
                       (lambda: M.retract(B, V, "projective"), "V")):
        with pytest.raises(ValueError, match=rf"^{name}: expected a real tensor at the real "
                                             r"point B \(torch.float64\), got torch.complex128"):
            call()
    W = M.proj_tangent(B, torch.randn(2, 3, generator=gen, dtype=F64))
    y = M.retract(B, W.float())
    assert y.dtype == F64
    torch.testing.assert_close(y, M.retract(B, W.float().double()), rtol=0, atol=0)


# ---------------------------------------------------------------------------- 4. laws
@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_coordinate_law(n, gen):
    """On S^{n-1}, x_1 has density (1 - x^2)^{(n-3)/2}: (x_1 + 1)/2 ~ Beta((n-1)/2, (n-1)/2)."""
    r = 1.5
    X = Sphere(n, radius=r).sample(3000, generator=gen, dtype=F64)
    a = (n - 1) / 2
    u = ((X[:, 0] / r + 1) / 2).numpy()
    assert scipy.stats.kstest(u, "beta", args=(a, a)).pvalue > 1e-3
    if n == 3:  # Archimedes: uniform on [-r, r]
        assert scipy.stats.kstest(X[:, 2].numpy(), "uniform", args=(-r, 2 * r)).pvalue > 1e-3


# ---------------------------------------------------------------------------- 5. retract
@pytest.mark.parametrize("case, method", RETRACTION_CASES)
def test_retraction_on_manifold_and_first_order(case, method, gen):
    M, dtype = CASES[case]
    B = M.sample(3, generator=gen, dtype=dtype)
    V = tangent_vector(B, gen)
    V = V / torch.linalg.vector_norm(V, dim=-1, keepdim=True)
    X = M.retract(B, 0.7 * V, method)
    ok, reason = M.check(X, explain=True)
    assert ok, reason
    torch.testing.assert_close(M.retract(B, torch.zeros_like(V), method), B,
                               atol=1e-14, rtol=0)
    t = 1e-4
    err = torch.linalg.vector_norm(M.retract(B, t * V, method) - B - t * V, dim=-1).max()
    assert err < 10 * t**2
    W = M.retract_inverse(B, X, method)
    torch.testing.assert_close(W, 0.7 * V, atol=1e-10, rtol=0)


def test_exp_is_the_geodesic_of_radius_r(gen):
    """The angle between B and exp_B(V) is |V| / r, in the plane of B and V."""
    M = Sphere(6, radius=2.5)
    B = M.sample(4, generator=gen, dtype=F64)
    V = 1.3 * M.random_tangent(B, generator=gen)
    X = M.retract(B, V, "exp")
    cos = (B * X).sum(-1) / M.radius**2
    length = torch.linalg.vector_norm(V, dim=-1)
    torch.testing.assert_close(torch.arccos(cos.clamp(-1, 1)), length / M.radius)
    Vhat = V / length[..., None]
    torch.testing.assert_close(
        X, B * torch.cos(length / M.radius)[..., None]
        + M.radius * Vhat * torch.sin(length / M.radius)[..., None])
    P = M.retract(B, V, "projective")
    y = (B + V) / torch.linalg.vector_norm(B + V, dim=-1, keepdim=True)
    torch.testing.assert_close(P, M.radius * y)


def test_unknown_retraction_and_transport(gen):
    M = Sphere(4)
    assert M.retractions == ("exp", "projective") and M.default_retraction == "exp"
    B = M.sample(generator=gen, dtype=F64)
    V = M.random_tangent(B, generator=gen)
    with pytest.raises(ValueError, match=r"method: expected one of exp, projective.*'nope'"):
        M.retract(B, V, method="nope")
    B_new = M.retract(B, V)
    T = M.transport(B, B_new, V)
    assert rdot(B_new, T).abs() < 1e-12


# ---------------------------------------------------------------------------- 6. errors
@pytest.mark.parametrize(
    "kwargs, match",
    [({"n": 0}, r"n: expected a positive integer \(n >= 1\), got 0"),
     ({"n": 2.0}, r"n: expected .*got 2.0"),
     ({"n": 3, "radius": 0.0}, r"radius: expected a positive number, got 0.0"),
     ({"n": 3, "radius": -1}, r"radius: expected a positive number, got -1"),
     ({"n": 3, "radius": math.inf}, r"radius: expected a finite positive number, got inf")],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sphere(**kwargs)


def test_validate():
    M = Sphere(3)
    with pytest.raises(ValueError, match=r"X: expected .*\(\.\.\., 3\).*got shape \(2, 4\)"):
        M.check(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"V: expected .*got shape \(2,\)"):
        M.proj_tangent(torch.ones(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"init: expected one of haar.*'henaff'"):
        M.sample(init="henaff")
    assert repr(M) == "Sphere(n=3)" and repr(Sphere(2, radius=2)) == "Sphere(n=2, radius=2.0)"


# ---------------------------------------------------------------------------- 7. chart
def test_chart_and_tangent(gen):
    M = Sphere(5, radius=2.0)
    B = M.sample(generator=gen, dtype=F64)
    X = torch.randn(5, generator=gen, dtype=F64)
    assert M.chart(X) is X
    V = M.tangent(B, X)
    torch.testing.assert_close(V, M.proj_tangent(B, X), atol=0, rtol=0)
    assert rdot(B, V).abs() < 1e-12


def test_retract_default_is_the_exponential_map():
    """``retract`` without a method is the documented default, the exponential map
    ``cos|v| x + sin|v| v/|v|`` (the projective retraction differs at ``|v| = 1.2``)."""
    M = Sphere(5)
    g = torch.Generator().manual_seed(0)
    x = M.sample(generator=g, dtype=F64)
    v = M.proj_tangent(x, torch.randn(5, generator=g, dtype=F64))
    v = 1.2 * v / torch.linalg.vector_norm(v)
    expected = math.cos(1.2) * x + math.sin(1.2) * v / 1.2
    torch.testing.assert_close(M.retract(x, v), expected, atol=1e-14, rtol=0)
