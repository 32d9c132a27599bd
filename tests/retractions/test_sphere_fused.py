"""The fused sphere maps (one autograd node each) against their plain formulas."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from dtriv.retractions import sphere as S


def ref_exp(x, v, r=1.0):
    cos, sinc = S._cos_sinc(S._sqnorm(v) / r**2)
    return cos * x + sinc * v


def ref_projective(x, v, r=1.0):
    w = x + v
    return r * w / torch.sqrt(S._sqnorm(w))


def ref_tangent(x, v, r=1.0):
    return v - x * S._rdot(x, v) / r**2


def ref_trivialize_exp(x, X, r=1.0):
    return ref_exp(x, ref_tangent(x, X, r), r)


def ref_trivialize_projective(x, X, r=1.0):
    return ref_projective(x, ref_tangent(x, X, r), r)


MAPS = [(S.exp_radius, ref_exp), (S.projective_radius, ref_projective),
        (S.tangent_radius, ref_tangent), (S.trivialize_exp_radius, ref_trivialize_exp),
        (S.trivialize_projective_radius, ref_trivialize_projective)]


VECTOR_NODE_NAMES = {"_VectorExpBackward", "_VectorTrivializeExpBackward",
                     "_VectorProjectiveBackward", "_VectorTrivializeProjectiveBackward"}
#: the maps with a one-vector node for one real CPU vector
VECTOR_MAPS = (S.exp_radius, S.trivialize_exp_radius, S.projective_radius,
               S.trivialize_projective_radius)


EAGER_NODE_NAMES = {"_EagerTrivializeExpBackward", "_EagerTrivializeProjectiveBackward"}
#: the maps with an eager node (eager code, plain tensors of one shape)
EAGER_MAPS = (S.trivialize_exp_radius, S.trivialize_projective_radius)


@pytest.fixture(params=["vector", "eager", "general"])
def route(request, monkeypatch):
    """Runs a test with the one-vector nodes of one real CPU vector and the eager nodes on
    (``vector``, the default), the eager nodes alone (``eager``), or neither (``general``: the
    fused nodes take every input); returns a check that ``y`` was made by the node the route
    and its inputs call for."""
    vector, eager = request.param == "vector", request.param != "general"
    monkeypatch.setattr(S, "VECTOR_NODES", vector)
    monkeypatch.setattr(S, "EAGER_NODES", eager)

    def check(fn, y, x, v):
        takes_vector = (vector and fn in VECTOR_MAPS and x.dim() == 1 and x.shape == v.shape
                        and not x.is_complex())
        takes_eager = (not takes_vector and eager and fn in EAGER_MAPS
                       and x.dtype == v.dtype and x.dtype not in (torch.float16,
                                                                  torch.bfloat16))
        name = type(y.grad_fn).__name__
        assert (name in VECTOR_NODE_NAMES) == takes_vector, name
        assert (name in EAGER_NODE_NAMES) == takes_eager, name

    return check


def point_and_tangent(dtype, r, scale, shape=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, generator=g)
    x = r * x / torch.sqrt(S._sqnorm(x))
    v = ref_tangent(x, scale * torch.randn(shape, dtype=dtype, generator=g), r)
    return x.requires_grad_(), v.requires_grad_()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.complex128, 1e-12),
                                       (torch.float32, 1e-6)])
@pytest.mark.parametrize("r", [1.0, 2.5])
@pytest.mark.parametrize("scale", [0.0, 1e-3, 1.0, 3.0])
@pytest.mark.parametrize("fn,ref", MAPS)
@pytest.mark.parametrize("shape", [(3, 5), (5,)])  # one vector: its dot products are 0-d
def test_values_and_gradients_equal_the_formula(fn, ref, scale, r, dtype, tol, shape, route):
    x, v = point_and_tangent(dtype, r, scale, shape)
    a, b = fn(x, v, r), ref(x, v, r)
    route(fn, a, x, v)
    assert (a - b).abs().max() <= tol * r
    # a fixed cotangent: in float32 an unlucky draw reaches the tolerance (1.1e-6 for 1 of 200)
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(1)).to(a.dtype)
    for ga, gb in zip(torch.autograd.grad(a, (x, v), g), torch.autograd.grad(b, (x, v), g)):
        assert (ga - gb).abs().max() <= tol * max(1.0, r)


@pytest.mark.parametrize("scale", [0.0, 1e-3, 1.0])
@pytest.mark.parametrize("fn,ref", MAPS)
@pytest.mark.parametrize("shape", [(3, 5), (5,)])
def test_gradcheck_and_gradgradcheck(fn, ref, scale, shape, route):
    for dtype in (torch.float64, torch.complex128):
        x, v = point_and_tangent(dtype, 1.7, scale, shape)
        route(fn, fn(x, v, 1.7), x, v)
        assert gradcheck(lambda x, v: fn(x, v, 1.7), (x, v))
        assert gradgradcheck(lambda x, v: fn(x, v, 1.7), (x, v))


@pytest.mark.parametrize("shape", [(3, 5), (5,)])
def test_the_projective_gradients_in_x_and_v_do_not_share_memory(shape, route):
    """The projective retraction's gradients in ``x`` and ``v`` are equal, and returned as two
    tensors: an in-place edit of one (an optimizer's, a user's) leaves the other as it was."""
    x, v = point_and_tangent(torch.float64, 1.0, 0.5, shape)
    y = S.projective_radius(x, v)
    route(S.projective_radius, y, x, v)
    gx, gv = torch.autograd.grad(y, (x, v), torch.ones_like(y))
    assert torch.equal(gx, gv)
    gx.add_(1.0)
    assert not torch.equal(gx, gv)


@pytest.mark.parametrize("fn,ref", MAPS)
def test_vmap_of_the_gradient_has_a_batching_rule_for_every_op(fn, ref):
    """``vmap(grad)`` over a batch of points and tangents equals the per-sample gradients of
    the formula, with no op falling back to a loop over the batch (torch warns when it does:
    the exponential maps' forwards wrote ``addcmul_``, which has no batching rule)."""
    x, v = point_and_tangent(torch.float64, 1.5, 0.6, (4, 6), seed=12)
    x, v = x.detach(), v.detach()
    C = torch.randn(6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = torch.func.vmap(torch.func.grad(lambda a, b: (fn(a, b, 1.5) * C).sum(),
                                              argnums=(0, 1)))(x, v)
    for i in range(4):
        xi, vi = x[i].clone().requires_grad_(), v[i].clone().requires_grad_()
        want = torch.autograd.grad((ref(xi, vi, 1.5) * C).sum(), (xi, vi))
        for a, b in zip(got, want):
            torch.testing.assert_close(a[i], b, atol=1e-12, rtol=0)


def test_only_the_needed_gradient_is_computed():
    x, v = point_and_tangent(torch.float64, 1.0, 0.5)
    x = x.detach()
    for fn, _ in MAPS:
        (g,) = torch.autograd.grad(fn(x, v, 1.0).sum(), v)
        assert torch.isfinite(g).all()


def test_public_maps_use_the_fused_nodes_and_upcast_half():
    x, v = point_and_tangent(torch.float64, 1.0, 0.3)
    assert torch.allclose(S.sphere_exp(x, v), ref_exp(x, v), atol=1e-12, rtol=0)
    assert torch.allclose(S.sphere_projective(x, v), ref_projective(x, v), atol=1e-12, rtol=0)
    xh, vh = x.detach().half(), v.detach().half()
    out = S.sphere_exp(xh, vh)
    assert out.dtype == torch.float16
    assert torch.allclose(out.double(), ref_exp(xh.double(), vh.double()), atol=2e-3)


def _two_dsinc_exact(t: float) -> float:
    r""":math:`2\operatorname{sinc}'(t^2) = (\cos t - \sin t/t)/t^2` in 60-digit arithmetic."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        if t == 0.0:
            return -1.0 / 3.0
        u = mpmath.mpf(t)
        return float((mpmath.cos(u) - mpmath.sin(u) / u) / u**2)


ANGLES = [0.0, 1e-4, 0.03, 0.0999, 0.1001, 0.5, 2.0, 6.4]


@pytest.mark.parametrize("t", ANGLES)
def test_one_vector_coefficient_is_exact_in_double(t):
    # the direct formula (from t = 0.1) cancels in cos - sinc: its error grows as 1/t^2
    slack = 1.0 / min(t, 1.0) ** 2 if t >= 0.1 else 1.0
    assert S._two_dsinc_of(t) == pytest.approx(_two_dsinc_exact(t), rel=1e-15 * slack)


@pytest.mark.parametrize("t", [math.inf, -math.inf, math.nan])
def test_one_vector_coefficient_of_a_non_finite_angle_is_nan(t):
    """As the tensor formulas give (``math.cos(inf)`` raises: the backward of a batched node
    on one vector with an infinite tangent raised ``ValueError`` before)."""
    assert math.isnan(S._two_dsinc_of(t))
    x = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    v = torch.tensor([0.0, t, 0.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(S.exp_radius(x, v).sum(), v)
    assert g.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_coefficient_error_reaches_the_gradient_as_rounding(dtype):
    """The batched coefficient is the direct formula ``(cos t - sinc t)/t^2``: its error grows
    as ``1/t^2`` for small angles (it cancels), but the nodes multiply it by vectors of norm at
    most ``t^2 |g|``, so its error times ``t^2`` is what reaches a gradient: a few eps at every
    angle, down to ``t = 0`` (finite there). From ``t = 1`` on, the coefficient itself is
    exact to a few eps."""
    angles = [*ANGLES, 1e-30, 1e-20, 1e-8, 3e-4, 1.0, 3.0]
    t = torch.tensor(angles, dtype=dtype).unsqueeze(-1)
    cos, sinc = S._cos_sinc_values(t)
    got = S._two_dsinc(t, cos, sinc).double().reshape(-1)
    want = torch.tensor([_two_dsinc_exact(float(a)) for a in t.reshape(-1)], dtype=torch.float64)
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(got).all()
    z = t.double().reshape(-1) ** 2
    assert ((got - want).abs() * z <= 4 * eps).all(), (got, want)
    far = t.reshape(-1) >= 1
    assert ((got - want).abs()[far] <= 8 * eps * want.abs()[far]).all(), (got, want)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("fn,ref", MAPS)
def test_rows_near_and_far_from_the_base_in_one_batch(fn, ref, dtype, tol):
    """Tangents of lengths on both sides of the series switch in one batch."""
    x, v = point_and_tangent(dtype, 1.0, 1.0, (4, 6))
    with torch.no_grad():
        v *= torch.tensor([0.0, 1e-3, 0.5, 3.0], dtype=dtype).unsqueeze(-1)
    a, b = fn(x, v, 1.0), ref(x, v, 1.0)
    assert (a - b).abs().max() <= tol
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(1)).to(a.dtype)
    for ga, gb in zip(torch.autograd.grad(a, (x, v), g), torch.autograd.grad(b, (x, v), g)):
        assert (ga - gb).abs().max() <= tol


# ------------------------------------------------------------------- one vector: lean nodes
ROUTED = [(fn, ref) for fn, ref in MAPS if fn in VECTOR_MAPS]


def _both_routes(monkeypatch, make):
    """``make()`` with the one-vector nodes on, then off."""
    out = []
    for on in (True, False):
        monkeypatch.setattr(S, "VECTOR_NODES", on)
        out.append(make())
    return out


@pytest.mark.parametrize("needs", ["x", "v", "both"])
@pytest.mark.parametrize("fn,ref", ROUTED)
def test_one_vector_gradients_of_either_input_alone(fn, ref, needs, route):
    """Only the gradients asked for, each equal to the formula's; a gradient that reaches the
    map expanded (stride 0, from ``sum``) is read as the full vector."""
    x, v = point_and_tangent(torch.float64, 2.5, 0.7, (6,))
    x.requires_grad_(needs != "v")
    v.requires_grad_(needs != "x")
    wanted = [t for t in (x, v) if t.requires_grad]
    y = fn(x, v, 2.5)
    route(fn, y, x, v)
    got = torch.autograd.grad(y.sum(), wanted)
    want = torch.autograd.grad(ref(x, v, 2.5).sum(), wanted)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-12


@pytest.mark.parametrize("fn,ref", ROUTED)
def test_one_vector_second_derivatives_with_a_constant_base(fn, ref, route):
    """gradgradcheck in the tangent alone: the base of a parametrization is a buffer."""
    x, v = point_and_tangent(torch.float64, 1.3, 0.4, (5,))
    x = x.detach()
    route(fn, fn(x, v, 1.3), x, v)
    assert gradgradcheck(lambda v: fn(x, v, 1.3), (v,))


@pytest.mark.parametrize("fn,ref", ROUTED)
def test_one_vector_of_4096_in_float32_is_as_accurate_as_the_batched_node(fn, ref, monkeypatch):
    """The benchmark's size in single precision: value and gradient against float64, within
    the batched node's own error (times 2) and 1e-6."""
    x, v = point_and_tangent(torch.float32, 1.0, 0.1, (4096,), seed=3)
    g = torch.randn(4096, generator=torch.Generator().manual_seed(4))
    x64, v64 = (t.detach().double().requires_grad_() for t in (x, v))
    y64 = ref(x64, v64, 1.0)
    want = (y64, *torch.autograd.grad(y64, (x64, v64), g.double()))

    def errors():
        y = fn(x, v, 1.0)
        got = (y, *torch.autograd.grad(y, (x, v), g))
        return [(a.double() - b).abs().max().item() for a, b in zip(got, want)]

    vector, general = _both_routes(monkeypatch, errors)
    for e_vector, e_general in zip(vector, general):
        assert e_vector <= max(2 * e_general, 1e-6), (vector, general)


@pytest.mark.parametrize("normal", [0.0, 0.45, 0.55, 0.999])
@pytest.mark.parametrize("angle", [1e-3, 0.8, 2.5])
def test_one_vector_trivialization_either_side_of_its_switch(normal, angle, monkeypatch):
    """The one-vector exponential trivialization takes the angle from ``|X|^2 - <x, X>^2``
    while the normal part of ``X`` is at most half of ``|X|^2``, else from ``X - <x, X> x``:
    ``X`` with the fraction ``normal`` of its squared norm along the base, its tangent part
    of length ``angle``, in float32 at 4096 entries: the value and the gradient in ``X``
    against float64, within the batched node's own error (times 2) and 1e-6."""
    x, v = point_and_tangent(torch.float64, 1.0, 1.0, (4096,), seed=7)
    x, v = x.detach(), v.detach() * (angle / v.detach().norm())
    along = math.sqrt(normal / (1.0 - normal)) * angle  # c^2 / |X|^2 = normal
    X64 = (v + along * x).requires_grad_()
    g = torch.randn(4096, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y64 = ref_trivialize_exp(x, X64)
    want = (y64, *torch.autograd.grad(y64, X64, g))
    x32, X32, g32 = x.float(), X64.detach().float().requires_grad_(), g.float()

    def errors():
        y = S.trivialize_exp_radius(x32, X32)
        got = (y, *torch.autograd.grad(y, X32, g32))
        return [(a.double() - b).abs().max().item() for a, b in zip(got, want)]

    vector, general = _both_routes(monkeypatch, errors)
    for e_vector, e_general in zip(vector, general):
        assert e_vector <= max(2 * e_general, 1e-6), (vector, general)


@pytest.mark.parametrize("scale", [0.5, 0.999, 1.001, 1.7])
@pytest.mark.parametrize("radius", [1.0, 2.5])
def test_one_vector_trivialization_off_the_sphere_is_the_composition(scale, radius,
                                                                      monkeypatch):
    """A base ``x`` off the sphere (``|x| = scale r``, as ``gradcheck`` perturbs it): the
    one-vector exponential trivialization still computes the composition ``exp_x(X - <x, X>
    x / r^2)``, whose derivative its backward is: the value equals the batched node's and the
    composition of differentiable ops in float64, and ``gradcheck`` passes in ``x`` and
    ``X``."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(6, generator=gen, dtype=torch.float64)
    x = x * (scale * radius / x.norm())
    X = 0.4 * radius * torch.randn(6, generator=gen, dtype=torch.float64)
    X = X - 0.1 * (x @ X) / radius**2 * x  # a normal part small enough for the host route
    fn = S.trivialize_exp_radius
    want = ref_trivialize_exp(x, X, radius)
    vector, batched = _both_routes(monkeypatch, lambda: fn(x, X, radius))
    torch.testing.assert_close(vector, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(batched, want, rtol=1e-13, atol=1e-13)
    monkeypatch.setattr(S, "VECTOR_NODES", True)
    assert S._vector_case(x, X)
    assert gradcheck(lambda a, b: fn(a, b, radius),
                     (x.clone().requires_grad_(), X.clone().requires_grad_()))
    # |x|^2 is remembered per constant base tensor: an in-place write (a refresh) is seen
    fn(x, X, radius)
    x.mul_(1.3)
    torch.testing.assert_close(fn(x, X, radius), ref_trivialize_exp(x, X, radius),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("angle", [10.0, 100.0, 1e4])
@pytest.mark.parametrize("radius", [1.0, 1e-3, 1e3])
def test_exponential_maps_stay_on_the_sphere_at_large_angles(angle, radius):
    """The cosine and the sine of the batched nodes take the same angle: in float32 the
    results stay on the sphere to a few roundings at angles of 10 to 1e4 (``torch.sinc(t /
    pi)`` rounded the angle, an error of eps t: 1e-5 at 100, 2e-3 at 1e4)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(256, 16, generator=gen)
    x = radius * x / x.norm(dim=-1, keepdim=True)
    V = torch.randn(256, 16, generator=gen)
    V = V - (V * x).sum(-1, keepdim=True) * x / radius**2
    angles = angle * (0.5 + torch.rand(256, 1, generator=gen))  # (exact multiples may not round)
    V = angles * radius * V / V.norm(dim=-1, keepdim=True)
    eps = torch.finfo(torch.float32).eps
    for y in (S.exp_radius(x, V, radius), S.trivialize_exp_radius(x, V, radius),
              S.exp_radius(x, V.requires_grad_(), radius)):
        error = (y.detach().norm(dim=-1) / radius - 1).abs().max().item()
        assert error <= 16 * eps, error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("s", [1e-8, -0.3, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 1.7, 40.0])
@pytest.mark.parametrize("beta", [0.0, -0.6])
def test_scaled_sum_is_the_combination_to_rounding(s, beta, dtype):
    """``s a + beta b`` and ``s a`` (also in place) of the one-vector nodes and optimizer
    steps, near 1 as ``a + beta b + (s - 1) a``, elsewhere as a product: within four roundings
    of ``|s a| + |beta b|`` of the float64 value at every scale (``s = 1e-8`` through
    ``s - 1``, rounded to float32, would give 0)."""
    gen = torch.Generator().manual_seed(9)
    a, b = (torch.randn(4096, generator=gen, dtype=dtype) for _ in range(2))
    eps = torch.finfo(dtype).eps
    bound = 4 * eps * (abs(s) * a.double().abs() + abs(beta) * b.double().abs())
    got = S._scaled_sum(a, s, b, beta)
    assert ((got.double() - (s * a.double() + beta * b.double())).abs() <= bound).all()
    for got in (S._scaled(a, s), S._scale_(a.clone(), s)):
        assert ((got.double() - s * a.double()).abs() <= 4 * eps * abs(s) * a.double().abs()).all()


@pytest.mark.parametrize("fn,ref", ROUTED)
@pytest.mark.parametrize("case", ["inf", "nan", "opposite"])
def test_one_vector_non_finite_and_degenerate_input_as_the_batched_node(fn, ref, case,
                                                                        monkeypatch):
    """A non-finite tangent, or ``v = -x``, gives the same values and gradients on both
    routes (NaN where the batched node has NaN), and raises nothing."""
    x, v = point_and_tangent(torch.float64, 1.0, 0.5, (4,))
    with torch.no_grad():
        if case == "opposite":
            v.copy_(-x)
        else:
            v[1] = float(case)

    def run():
        y = fn(x, v, 1.0)
        return (y, *torch.autograd.grad(y, (x, v), torch.ones_like(y)))

    for a, b in zip(*_both_routes(monkeypatch, run)):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.allclose(a, b, equal_nan=True, atol=1e-12)


def test_other_inputs_take_the_batched_nodes(monkeypatch):
    """Batches, complex and mixed-shape (broadcast) inputs, half precision (through float32:
    that one takes the vector node), and forward-mode derivatives keep the batched nodes."""
    x, v = point_and_tangent(torch.float64, 1.0, 0.5, (5,))
    name = lambda y: type(y.grad_fn).__name__  # noqa: E731
    assert name(S.exp_radius(x, v)) == "_VectorExpBackward"
    xb, vb = point_and_tangent(torch.float64, 1.0, 0.5, (2, 5))
    assert name(S.exp_radius(xb, vb)) == "_SphereExpBackward"
    assert name(S.exp_radius(x, vb)) == "_SphereExpBackward"  # one point, a batch of tangents
    xc, vc = point_and_tangent(torch.complex128, 1.0, 0.5, (5,))
    assert name(S.exp_radius(xc, vc)) == "_SphereExpBackward"
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(v.detach(), torch.ones_like(v))
        y = S.exp_radius(x.detach(), dual)
        tangent = fwAD.unpack_dual(y).tangent
    assert tangent is not None
    want = torch.func.jvp(lambda v: ref_exp(x.detach(), v), (v.detach(),),
                          (torch.ones_like(v),))[1]
    assert torch.allclose(tangent, want, atol=1e-12)


TRIVIALIZE_MAPS = [(S.trivialize_exp_radius, ref_trivialize_exp),
                   (S.trivialize_projective_radius, ref_trivialize_projective)]


@pytest.mark.parametrize("fn,ref", TRIVIALIZE_MAPS)
@pytest.mark.parametrize("case", ["one base, a batch of parameters", "float32 base",
                                  "float16", "bfloat16"])
def test_trivialize_of_other_inputs_equals_the_formula(fn, ref, case, route):
    """A base broadcast against a batch of parameters, a base of another dtype than the
    parameter (the result has the base's), and half precision: the value and both gradients
    as the formula's in float64, within the rounding of the precision at hand (half precision
    computed in float32)."""
    x, X = point_and_tangent(torch.float64, 1.5, 0.6, (3, 6), seed=8)
    x, X = x.detach(), (X.detach() + 0.3 * x.detach())
    tol = 1e-12
    if case == "one base, a batch of parameters":
        x = x[0]
    elif case == "float32 base":
        x, tol = x.float(), 1e-6
    else:
        dtype = getattr(torch, case)
        x, X, tol = x.to(dtype), X.to(dtype), 8 * torch.finfo(dtype).eps
    x.requires_grad_()
    X.requires_grad_()
    y = fn(x, X, 1.5)
    route(fn, y, x, X)
    assert y.dtype == x.dtype
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    x64, X64 = (t.detach().double().requires_grad_() for t in (x, X))
    y64 = ref(x64, X64, 1.5)
    want = (y64, *torch.autograd.grad(y64, (x64, X64), g.double()))
    got = (y, *torch.autograd.grad(y, (x, X), g))
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert (a.double() - b).abs().max() <= tol * max(1.0, b.abs().max().item())
    if case in ("float16", "bfloat16"):  # computed in float32, rounded once
        assert torch.equal(y, fn(x.float(), X.float(), 1.5).to(x.dtype))


@pytest.mark.parametrize("fn,ref", TRIVIALIZE_MAPS)
@pytest.mark.parametrize("shape", [(6,), (3, 6)])
def test_trivialize_under_torch_func_and_checkpoint_equals_eager(fn, ref, shape, route):
    """``torch.func.grad``, ``vmap`` over a batch of parameters (with a batching rule for every
    op: the exponential's forward wrote ``addcmul_``, which has none) and non-reentrant
    checkpointing give the eager gradient: under ``torch.func`` the maps leave the lean
    nodes, which have no ``setup_context``, for the fused ones."""
    x, v = point_and_tangent(torch.float64, 1.5, 0.6, shape, seed=10)
    x, X = x.detach(), (v.detach() + 0.2 * x.detach()).requires_grad_()
    C = torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    y = fn(x, X, 1.5)
    route(fn, y, x, X)
    (want,) = torch.autograd.grad((y * C).sum(), X)
    got = torch.func.grad(lambda X: (fn(x, X, 1.5) * C).sum())(X.detach())
    torch.testing.assert_close(got, want, atol=1e-13, rtol=0)
    batch = torch.stack([X.detach(), 2 * X.detach()])
    with warnings.catch_warnings():  # no op without a batching rule (torch warns, then loops)
        warnings.simplefilter("error", UserWarning)
        per_sample = torch.func.vmap(torch.func.grad(lambda X: (fn(x, X, 1.5) * C).sum()))(batch)
    torch.testing.assert_close(per_sample[0], want, atol=1e-13, rtol=0)
    from torch.utils.checkpoint import checkpoint

    out = checkpoint(lambda X: fn(x, X, 1.5), X, use_reentrant=False)
    (again,) = torch.autograd.grad((out * C).sum(), X)
    torch.testing.assert_close(again, want, atol=1e-13, rtol=0)


@pytest.mark.parametrize("fn,ref", TRIVIALIZE_MAPS)
@pytest.mark.parametrize("shape", [(6,), (3, 6)])
def test_trivialize_with_a_normal_component_in_both_inputs(fn, ref, shape, route):
    """A parameter ``X`` off the tangent space (``<x, X> != 0``, as Adam's elementwise steps
    leave it): the value and both gradients against the formula, where the terms in
    ``c = <x, X>/r^2`` of the base's gradient count."""
    x, v = point_and_tangent(torch.float64, 1.5, 0.6, shape, seed=5)
    X = (v.detach() + 0.7 * x.detach()).requires_grad_()
    y = fn(x, X, 1.5)
    route(fn, y, x, X)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = torch.autograd.grad(y, (x, X), g)
    want = torch.autograd.grad(ref(x, X, 1.5), (x, X), g)
    torch.testing.assert_close(y, ref(x, X, 1.5), atol=1e-12, rtol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("fn,ref", [(S.trivialize_exp_radius, ref_trivialize_exp),
                                    (S.trivialize_projective_radius,
                                     ref_trivialize_projective)])
@pytest.mark.parametrize("shape", [(6,), (3, 6)])
def test_trivialize_with_a_normal_component_in_forward_mode(fn, ref, shape):
    """The forward-mode derivative (dual numbers and ``torch.func.jvp``) along both inputs
    at an ``X`` off the tangent space, against the formula's."""
    import torch.autograd.forward_ad as fwAD

    x, v = point_and_tangent(torch.float64, 1.5, 0.6, shape, seed=5)
    x, X = x.detach(), v.detach() + 0.7 * x.detach()
    gen = torch.Generator().manual_seed(7)
    dx, dX = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    want = torch.func.jvp(lambda a, b: ref(a, b, 1.5), (x, X), (dx, dX))[1]
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(x, dx), fwAD.make_dual(X, dX), 1.5)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, want, atol=1e-12, rtol=0)
    got = torch.func.jvp(lambda a, b: fn(a, b, 1.5), (x, X), (dx, dX))[1]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32])
@pytest.mark.parametrize("fn,ref", MAPS)
@pytest.mark.parametrize("shape", [(3, 5), (5,)])
def test_reads_without_grad_mode_build_no_node(fn, ref, dtype, shape, mode, monkeypatch):
    """Without grad mode a map returns its values with no autograd node (the optimizers'
    generic path and inference call them so): bit for bit the batched node's forward, and
    the formula's value."""
    x, v = point_and_tangent(dtype, 2.5, 0.7, shape)
    monkeypatch.setattr(S, "VECTOR_NODES", False)
    expected = fn(x, v, 2.5).detach()
    torch.testing.assert_close(expected, ref(x, v, 2.5).detach(), rtol=0,
                               atol=1e-5 if dtype == torch.float32 else 1e-13)

    def no_node(fn):  # the nodes' C++ apply, looked up per call
        raise AssertionError("an autograd node was applied")

    monkeypatch.setattr(S, "raw_apply", no_node)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        y = fn(x, v, 2.5)
    assert y.grad_fn is None and not y.requires_grad
    assert torch.equal(y, expected)
