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
