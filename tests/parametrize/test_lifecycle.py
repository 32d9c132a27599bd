"""The lifecycle of modules holding dtriv parametrizations: conversions, copies, loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtriv.manifolds import Stiefel
from dtriv.parametrize import constrain, orthogonal

REGISTER = {
    "constrain": lambda m: constrain(m, "weight", Stiefel(8, 6)),
    "twin": lambda m: orthogonal(m, "weight", use_trivialization=True),
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
    layer = nn.Linear(6, 8)
    REGISTER[kind](layer)
    with torch.no_grad():
        original = layer.parametrizations.weight.original
        original.add_(0.1 * torch.randn(original.shape).tril())
    return layer


@pytest.mark.parametrize("kind", sorted(REGISTER))
@pytest.mark.parametrize("read", ["none", "forward", "backward"])
def test_dtype_conversion_that_swaps_parameters(swap_params_on_conversion, kind, read):
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
def test_load_state_dict_that_swaps_parameters(swap_params_on_conversion, kind):
    source, layer = _layer(kind, seed=1), _layer(kind, seed=2)
    layer(torch.randn(3, 6)).sum().backward()  # a memoized value
    layer.load_state_dict(source.state_dict())
    torch.testing.assert_close(layer.weight, source.weight, rtol=0, atol=0)
