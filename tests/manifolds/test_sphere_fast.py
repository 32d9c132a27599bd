"""The sphere's trivialization path (tangent projection + retraction) against the formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import dtriv
from dtriv.manifolds import Sphere


@pytest.mark.parametrize("retraction", ["exp", "projective"])
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("radius", [1.0, 3.0])
def test_parametrized_weight_equals_the_formula(retraction, dynamic, radius):
    torch.manual_seed(0)
    m = nn.Linear(6, 4, dtype=torch.float64)
    dtriv.parametrize.sphere(m, radius=radius, retraction=retraction, dynamic=dynamic)
    plist = m.parametrizations.weight
    B = plist[0].base
    X = 0.3 * torch.randn(4, 6, dtype=torch.float64)

    def formula(X):
        V = X - B * (B * X).sum(-1, keepdim=True) / radius**2
        if retraction == "projective":
            W = B + V
            return radius * W / W.norm(dim=-1, keepdim=True)
        t = V.norm(dim=-1, keepdim=True) / radius
        return torch.cos(t) * B + radius * torch.sin(t) / V.norm(dim=-1, keepdim=True) * V

    with torch.no_grad():
        plist.original.copy_(X)
    assert torch.allclose(m.weight, formula(X), atol=1e-12, rtol=0)
    C = torch.randn(4, 6, dtype=torch.float64)
    (m.weight * C).sum().backward()
    Xr = X.clone().requires_grad_()
    (formula(Xr) * C).sum().backward()
    assert torch.allclose(plist.original.grad, Xr.grad, atol=1e-12, rtol=0)

    M = plist[0].manifold
    assert gradcheck(lambda X: M.retract(B, M.tangent(B, X), retraction),
                     (X.clone().requires_grad_(),))


def test_bad_input_errors_still_name_the_argument():
    S = Sphere(5)
    with pytest.raises(ValueError, match=r"B: expected a tensor of shape \(\.\.\., 5\)"):
        S.retract(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="V: expected a floating point"):
        S.proj_tangent(torch.ones(5), torch.ones(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="method: expected one of exp, projective"):
        S.retract(torch.ones(5), torch.zeros(5), "qr")
    with pytest.raises(TypeError, match="X: expected a torch.Tensor"):
        S.tangent(torch.ones(5), [1.0] * 5)


def _composed(S, B, X, method):
    return S.retract(B, S.tangent(B, X), method)


@pytest.mark.parametrize("method", ["exp", "projective"])
@pytest.mark.parametrize("radius", [1.0, 2.5])
@pytest.mark.parametrize("scale", [0.3, 0.0, 2.0])
def test_trivialize_is_retract_of_tangent_with_its_derivatives(method, radius, scale):
    torch.manual_seed(1)
    S = Sphere(7, radius)
    B = S.sample(3, dtype=torch.float64).requires_grad_()
    X = (scale * torch.randn(3, 7, dtype=torch.float64)).requires_grad_()
    out, ref = S.trivialize(B, X, method), _composed(S, B, X, method)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    G = torch.randn_like(out)
    got = torch.autograd.grad(out, (B, X), G)
    want = torch.autograd.grad(ref, (B, X), G)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)

    def f(b, x):
        return S.trivialize(b, x, method)

    assert gradcheck(f, (B, X))
    # second derivatives, also at X = 0 (the point right after a refresh)
    assert torch.autograd.gradgradcheck(f, (B, X))


@pytest.mark.parametrize("method", ["exp", "projective"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                         (torch.float16, 2e-3)])
def test_trivialize_in_lower_precision_matches_float64(method, dtype, atol):
    torch.manual_seed(2)
    S = Sphere(4096)
    B = S.sample(5, dtype=torch.float64)
    X = 0.1 * torch.randn(5, 4096, dtype=torch.float64)
    ref = _composed(S, B, X, method)
    out = S.trivialize(B.to(dtype), X.to(dtype), method)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)


@pytest.mark.parametrize("batch, n", [(3, 7), (9, 4096)])  # both sides of _ONE_PASS_NUMEL
def test_projective_trivialize_small_and_large_match_the_composition(batch, n):
    from dtriv.retractions.sphere import _ONE_PASS_NUMEL

    assert (batch * n >= _ONE_PASS_NUMEL) == (n == 4096)
    torch.manual_seed(4)
    S = Sphere(n, 2.0)
    B = S.sample(batch, dtype=torch.float64)
    X = (0.2 * torch.randn(batch, n, dtype=torch.float64)).requires_grad_()
    out, ref = S.trivialize(B, X, "projective"), _composed(S, B, X, "projective")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    G = torch.randn_like(out)
    (got,), (want,) = torch.autograd.grad(out, X, G), torch.autograd.grad(ref, X, G)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_trivialization_evaluates_through_the_manifold_hook():
    calls = []

    class Counting(Sphere):
        def trivialize(self, B, X, method):
            calls.append(method)
            return super().trivialize(B, X, method)

    m = nn.Linear(5, 3, dtype=torch.float64)
    dtriv.parametrize.constrain(m, "weight", Counting(5), "projective")
    with torch.no_grad():
        m.parametrizations.weight.original.normal_()
    before = len(calls)
    W = m.weight
    assert calls[before:] == ["projective"]
    torch.testing.assert_close(W.norm(dim=-1), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("method", ["exp", "projective"])
def test_trivialize_under_torch_func_transforms(method):
    # the transforms take torch's Function.apply path (the fast C++ call is bypassed)
    torch.manual_seed(3)
    S = Sphere(6)
    B = S.sample(4, dtype=torch.float64)
    X = 0.4 * torch.randn(4, 6, dtype=torch.float64)
    C = torch.randn(4, 6, dtype=torch.float64)

    def loss(b, x):
        return (S.trivialize(b, x, method) * C).sum()

    got = torch.func.grad(loss, argnums=1)(B, X)
    Xr = X.clone().requires_grad_()
    (S.trivialize(B, Xr, method) * C).sum().backward()
    torch.testing.assert_close(got, Xr.grad, rtol=0, atol=1e-12)
