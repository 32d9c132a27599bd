"""Sphere maps: exp/log and projective retraction, against geoopt and their identities."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.autograd import gradcheck

from dtriv.retractions import sphere_exp, sphere_log, sphere_projective, sphere_projective_inverse

with warnings.catch_warnings():  # geoopt's import scripts functions with torch.jit (deprecated)
    warnings.simplefilter("ignore", DeprecationWarning)
    import geoopt


@pytest.fixture
def point(randn):
    def make(*shape, dtype=torch.float64):
        x = randn(*shape, dtype=dtype)
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)

    return make


@pytest.fixture
def tangent(randn):
    """A tangent at x with norms ``scale`` times a standard normal vector's."""

    def make(x, scale=1.0):
        v = randn(*x.shape, dtype=x.dtype)
        v = v - (x.conj() * v).real.sum(-1, keepdim=True) * x
        return scale * v

    return make


def norms(y):
    return torch.linalg.vector_norm(y, dim=-1)


@pytest.mark.parametrize("scale", [1e-9, 0.05, 0.3, 1.0])
def test_exp_matches_geoopt_and_stays_on_the_sphere(point, tangent, scale):
    x = point(6, 5)
    v = tangent(x, scale)
    y = sphere_exp(x, v)
    ref = geoopt.Sphere().expmap(x, v)
    assert (y - ref).abs().max().item() < 1e-14
    assert (norms(y) - 1).abs().max().item() < 1e-14


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("scale", [0.0, 1e-7, 0.03, 0.5, 1.0])
def test_exp_log_round_trip(point, tangent, dtype, scale):
    x = point(6, 5, dtype=dtype)
    v = tangent(x, scale)
    # keep |v| < pi (the exponential map is injective there)
    v = v * torch.clamp(3.0 / norms(v).clamp_min(1e-300), max=1.0).unsqueeze(-1)
    assert (sphere_log(x, sphere_exp(x, v)) - v).abs().max().item() < 1e-13
    y = point(6, 5, dtype=dtype)
    assert (sphere_exp(x, sphere_log(x, y)) - y).abs().max().item() < 1e-13


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_exp_and_log_around_their_series_thresholds(point, tangent, dtype):
    """Angles on both sides of the switches to power series (exp: t^2 = 1e-2; log: tan^2 =
    1e-2, t = 0.0997) and past them: the closed forms cos(t) x + sin(t) v/t and
    arccos(<x, y>) as length, and the round trip, to 1e-15. A switch placed at 1e-1 left the
    round trip 1.2e-10 off at t = 0.3."""
    x = point(6, 5, dtype=dtype)
    u = tangent(x)
    u = u / norms(u).unsqueeze(-1)
    for t in (0.05, 0.0996, 0.0998, 0.0999, 0.1001, 0.15, 0.2, 0.25, 0.3, 0.32):
        v = t * u
        y = sphere_exp(x, v)
        torch.testing.assert_close(y, math.cos(t) * x + math.sin(t) * u, atol=1e-15, rtol=0)
        w = sphere_log(x, y)
        torch.testing.assert_close(w, v, atol=1e-15, rtol=0)
        torch.testing.assert_close(norms(w), torch.full((6,), t, dtype=torch.float64),
                                   atol=1e-15, rtol=0)


def test_log_matches_geoopt(point):
    x, y = point(8, 4), point(8, 4)
    assert (sphere_log(x, y) - geoopt.Sphere().logmap(x, y)).abs().max().item() < 1e-13


def test_log_length_is_the_angle(point):
    x, y = point(8, 4), point(8, 4)
    angle = torch.arccos((x * y).sum(-1))
    assert (norms(sphere_log(x, y)) - angle).abs().max().item() < 1e-13


def test_series_and_closed_form_agree_across_the_switch(point, tangent):
    """|v|^2 just below and above the series threshold 1e-2: the same smooth function."""
    x = point(5)
    e = tangent(x)
    e = e / norms(e)
    for t in (0.1 * (1 - 1e-9), 0.1 * (1 + 1e-9), 1e-3, 1e-8):
        y = sphere_exp(x, t * e)
        ref = math.cos(t) * x + math.sin(t) * e
        assert (y - ref).abs().max().item() < 1e-16 * 4
    # the log switches at z^2 = tan^2(theta) = 1e-2
    for theta in (math.atan(0.1) * (1 - 1e-9), math.atan(0.1) * (1 + 1e-9), 1e-6):
        y = math.cos(theta) * x + math.sin(theta) * e
        assert (sphere_log(x, y) - theta * e).abs().max().item() < 1e-16 * 4


def test_exp_is_first_order_x_plus_v(point, tangent):
    x = point(7)
    v = tangent(x)
    errors = [(sphere_exp(x, t * v) - (x + t * v)).abs().max().item() for t in (1e-2, 1e-3)]
    assert 90 < errors[0] / errors[1] < 110  # O(t^2)


def test_projective_agrees_with_exp_to_second_order(point, tangent):
    x = point(7)
    v = tangent(x)
    errors = [
        (sphere_exp(x, t * v) - sphere_projective(x, t * v)).abs().max().item()
        for t in (1e-2, 1e-3)
    ]
    assert 900 < errors[0] / errors[1] < 1100  # O(t^3)


def test_exp_at_zero_is_exact_and_has_the_first_order_jacobian(point):
    x = point(5)
    v0 = torch.zeros(5, dtype=torch.float64)
    assert torch.equal(sphere_exp(x, v0), x)
    J_v = torch.autograd.functional.jacobian(lambda v: sphere_exp(x, v), v0)
    J_x = torch.autograd.functional.jacobian(lambda y: sphere_exp(y, v0), x)
    J_first_order = torch.autograd.functional.jacobian(lambda v: x + v, v0)
    assert torch.equal(J_v, J_first_order)
    assert torch.equal(J_x, torch.eye(5, dtype=torch.float64))
    # on tangent directions it is also the projective retraction's Jacobian
    J_proj = torch.autograd.functional.jacobian(lambda v: sphere_projective(x, v), v0)
    P = torch.eye(5, dtype=torch.float64) - torch.outer(x, x)
    assert (J_v @ P - J_proj @ P).abs().max().item() < 1e-15


def test_gradients_at_zero_are_finite(point):
    x = point(3, 4).requires_grad_()
    v = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    sphere_exp(x, v).pow(2).sum().backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(x.grad).all()
    y = x.detach().clone().requires_grad_()
    sphere_log(x.detach(), y).pow(2).sum().backward()
    assert torch.isfinite(y.grad).all()


@pytest.mark.parametrize("scale", [0.0, 0.05, 0.101, 1.5])
def test_exp_gradcheck(point, tangent, scale):
    x = point(2, 4)
    v = tangent(x, scale)
    if scale == 0.101:  # |v| ~ the series threshold
        v = 0.1 * v / norms(v).unsqueeze(-1)
    assert gradcheck(sphere_exp, (x.requires_grad_(), v.requires_grad_()))


def test_exp_gradcheck_complex(point, tangent):
    x = point(2, 3, dtype=torch.complex128)
    v = tangent(x, 0.5)
    assert gradcheck(sphere_exp, (x.requires_grad_(), v.requires_grad_()))


@pytest.mark.parametrize("where", ["equal", "near", "far"])
def test_log_gradcheck(point, tangent, where):
    x = point(2, 4)
    y = {"equal": x.clone(), "near": sphere_exp(x, tangent(x, 1e-3)), "far": point(2, 4)}[where]
    assert gradcheck(sphere_log, (x.requires_grad_(), y.requires_grad_()))


def test_projective_maps_gradcheck(point, tangent):
    x = point(2, 4)
    v = tangent(x, 0.7)
    assert gradcheck(sphere_projective, (x.clone().requires_grad_(), v.requires_grad_()))
    y = point(2, 4)
    y = torch.where((x * y).sum(-1, keepdim=True) > 0, y, -y)
    assert gradcheck(sphere_projective_inverse, (x.requires_grad_(), y.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_projective_round_trip_and_unit_norm(point, tangent, dtype):
    x = point(6, 5, dtype=dtype)
    v = tangent(x, 2.0)
    y = sphere_projective(x, v)
    assert (norms(y) - 1).abs().max().item() < 1e-14
    assert (sphere_projective_inverse(x, y) - v).abs().max().item() < 1e-13
    ref = (x + v) / torch.linalg.vector_norm(x + v, dim=-1, keepdim=True)
    assert (y - ref).abs().max().item() < 1e-15


def test_complex_exp_is_the_real_exp_of_r2n(point, tangent):
    x = point(3, 4, dtype=torch.complex128)
    v = tangent(x, 0.8)
    y = sphere_exp(x, v)
    real = sphere_exp(torch.view_as_real(x).flatten(-2), torch.view_as_real(v).flatten(-2))
    assert (torch.view_as_real(y).flatten(-2) - real).abs().max().item() < 1e-15


@pytest.mark.parametrize("other", [torch.complex128, torch.float32])
def test_mixed_dtypes_compute_in_the_promoted_one(point, tangent, other):
    """A real float64 point with a complex or float32 tangent: each map's result is that of
    both arguments cast to the promoted dtype (a complex tangent at a real point: a point of
    the complex sphere, imaginary part kept), and the inverses take such pairs back."""
    x = point(4, 5)
    v = tangent(x, 0.7)
    if other.is_complex:
        v = v * 1j  # Re<x, i v> = 0: a tangent of C^5 = R^10 at x
    v = v.to(other)
    dtype = torch.promote_types(x.dtype, other)
    for fn, inverse in ((sphere_exp, sphere_log),
                        (sphere_projective, sphere_projective_inverse)):
        y = fn(x, v)
        assert y.dtype == dtype
        torch.testing.assert_close(y, fn(x.to(dtype), v.to(dtype)), rtol=0, atol=0)
        torch.testing.assert_close(torch.linalg.vector_norm(y, dim=-1),
                                   torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6)
        back = inverse(x, y)
        assert back.dtype == dtype
        torch.testing.assert_close(back, v.to(dtype), rtol=1e-5, atol=1e-5)


def test_log_raises_at_the_antipode(point):
    x = point(3, 4)
    with pytest.raises(ValueError, match=r"^y: expected a point that is not antipodal"):
        sphere_log(x, -x)


def test_projective_inverse_raises_outside_the_hemisphere(point, tangent):
    x = point(4)
    with pytest.raises(ValueError, match=r"^y: expected a point in the open hemisphere"):
        sphere_projective_inverse(x, tangent(x) / norms(tangent(x)))
    with pytest.raises(ValueError, match="open hemisphere"):
        sphere_projective_inverse(x, -x)


@pytest.mark.parametrize("fn", [sphere_exp, sphere_log, sphere_projective,
                                sphere_projective_inverse])
def test_argument_checks(fn):
    with pytest.raises(ValueError, match=r"expected the shape of x"):
        fn(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match=r"floating point"):
        fn(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("t", [0.05, 0.0999, 0.1001, 0.3])
def test_exp_hessian_equals_the_closed_form_s_around_the_series_threshold(point, tangent,
                                                                           t):
    """Second derivatives of sphere_exp (the nodes' differentiable recomputation, power
    series below t^2 = 1e-2) equal those of cos|v| x + sin|v| v/|v| written with torch's cos
    and sin, to 1e-12 on both sides of the switch: a cos series cut to three terms was off
    by 5e-8 in the mixed block there, below what gradgradcheck sees."""
    x = point(5)
    u = tangent(x)
    v = t * u / norms(u)
    C = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def closed_form(x, v):
        r = torch.sqrt((v * v).sum())
        return torch.cos(r) * x + torch.sin(r) / r * v

    # in (x, v) jointly: the mixed block reads the recomputed cos (the v block does not)
    H = torch.autograd.functional.hessian(lambda x, v: (sphere_exp(x, v) * C).sum(), (x, v))
    H_ref = torch.autograd.functional.hessian(lambda x, v: (closed_form(x, v) * C).sum(),
                                              (x, v))
    for row, row_ref in zip(H, H_ref):
        for block, block_ref in zip(row, row_ref):
            torch.testing.assert_close(block, block_ref, atol=1e-12, rtol=0)


MAPS_AND_NAMES = [(sphere_exp, "v"), (sphere_log, "y"), (sphere_projective, "v"),
                  (sphere_projective_inverse, "y")]


@pytest.mark.parametrize("fn,other", MAPS_AND_NAMES)
def test_bad_arguments_are_named_with_what_was_expected(fn, other):
    """Each argument checked, in each position: a scalar, an integer dtype, a shape that is
    not the other's, something other than a tensor (the message names the argument)."""
    x = torch.tensor([1.0, 0.0, 0.0])
    w = torch.tensor([0.0, 0.5, 0.0])
    scalar = torch.tensor(0.5)
    for a, b, name in ((scalar, w, "x"), (x, scalar, other), (scalar, scalar, "x")):
        with pytest.raises(ValueError, match=rf"^{name}: expected a vector or a batch of "
                                             r"vectors, got a scalar"):
            fn(a, b)
    for a, b, name in ((x.long(), w, "x"), (x, w.long(), other)):
        with pytest.raises(ValueError, match=rf"^{name}: expected a floating point or "
                                             r"complex tensor, got dtype torch.int64"):
            fn(a, b)
    with pytest.raises(ValueError, match=rf"^{other}: expected the shape of x, \(3,\), got "
                                         r"\(2, 3\)"):
        fn(x, w.expand(2, 3))
    for a, b, name in (([1.0, 0.0], w, "x"), (x, 0.5, other)):
        with pytest.raises(TypeError, match=rf"^{name}: expected a torch.Tensor, got "):
            fn(a, b)
