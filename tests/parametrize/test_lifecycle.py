"""The lifecycle of modules holding dtriv parametrizations: conversions, copies, loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtriv.manifolds import Stiefel
from dtriv.parametrize import constrain, orthogonal

# (out_features, registration): tall weights, and square ones, whose maps' nodes save the
# original itself for their backward (so the memoized value's graph references it)
REGISTER = {
    "constrain": (8, lambda m: constrain(m, "weight", Stiefel(8, 6))),
    "constrain square expm": (6, lambda m: constrain(m, "weight", Stiefel(6, 6),
                                                     retraction="expm")),
    "constrain square cayley": (6, lambda m: constrain(m, "weight", Stiefel(6, 6),
                                                       retraction="cayley")),
    "twin": (8, lambda m: orthogonal(m, "weight", use_trivialization=True)),
    **{f"twin square {name}": (6, lambda m, name=name: orthogonal(
        m, "weight", orthogonal_map=name, use_trivialization=True))
       for name in ("matrix_exp", "cayley", "householder")},
}


@pytest.fixture
def swap_params_on_conversion():
    """``torch.__future__``'s flag under which ``Module._apply`` (``.to``, ``.double()``)
    and ``load_state_dict`` swap each parameter's contents with ``torch.utils.swap_tensors``
    (which refuses a tensor that has a weak reference) instead of assigning ``.data``."""
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(old)


def _layer(kind: str, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    out_features, register = REGISTER[kind]
    layer = nn.Linear(6, out_features)
    register(layer)
    with torch.no_grad():
        original = layer.parametrizations.weight.original
        original.add_(0.1 * torch.randn(original.shape).tril())
    return layer


#: the square twins' matrix_exp and cayley nodes save the original itself for their double
#: backward: while the caller holds an output whose graph is alive, swap_tensors refuses it
#: (torch's orthogonal saves only tensors computed from it)
HELD_GRAPH_REFUSES = {"twin square matrix_exp", "twin square cayley"}


@pytest.mark.parametrize("kind", sorted(REGISTER))
@pytest.mark.parametrize("read", ["none", "forward", "backward"])
def test_dtype_conversion_that_swaps_parameters(swap_params_on_conversion, kind, read, request):
    if read == "forward" and kind in HELD_GRAPH_REFUSES:
        request.applymarker(pytest.mark.xfail(raises=RuntimeError, strict=True))
    # the memo held a weak reference to the parameter (and to the base): swap_tensors refused
    # it ("Cannot swap t1 because it has weakref associated with it"); torch's orthogonal
    # converts
    layer = _layer(kind)
    x = torch.randn(3, 6)
    if read != "none":
        y = layer(x)
        if read == "backward":
            y.square().sum().backward()
    expected = layer.weight.detach().double()
    original = layer.parametrizations.weight.original
    layer.double()
    assert layer.parametrizations.weight.original is original  # swapped, not replaced
    assert layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-6)
    layer(x.double()).square().sum().backward()
    assert layer.parametrizations.weight.original.grad.dtype == torch.float64


@pytest.mark.parametrize("kind", sorted(REGISTER))
@pytest.mark.parametrize("backward", [True, False])
def test_load_state_dict_that_swaps_parameters(swap_params_on_conversion, kind, backward):
    source, layer = _layer(kind, seed=1), _layer(kind, seed=2)
    if backward:
        layer(torch.randn(3, 6)).sum().backward()  # a memoized value
    else:
        layer.weight.detach()  # a memoized value whose graph is alive (held by the memo)
    layer.load_state_dict(source.state_dict())
    torch.testing.assert_close(layer.weight, source.weight, rtol=0, atol=0)
