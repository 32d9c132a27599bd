"""The refresh protocol links parameters and trivializations, also after a deep copy."""

import copy

import torch

import dtriv


def _linked(module: torch.nn.Module, name: str = "weight") -> bool:
    plist = module.parametrizations[name]
    ref = getattr(plist.original, "_dtriv_trivialization", None)
    return ref is not None and ref() is plist[0]


def test_deepcopy_relinks_the_orthogonal_twin_and_refresh_acts_on_the_copy():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 6)
    dtriv.orthogonal(layer)
    clone = copy.deepcopy(layer)
    assert not hasattr(clone.parametrizations.weight.original, "_dtriv_trivialization")
    found = list(dtriv.trivializations(clone))
    assert len(found) == 1 and found[0][0] is clone and found[0][1] == "weight"
    assert _linked(clone)
    with torch.no_grad():
        clone.parametrizations.weight.original.add_(0.1 * torch.randn(6, 6))
    before = clone.weight.detach().clone()
    original_weight = layer.weight.detach().clone()
    dtriv.refresh(clone)
    torch.testing.assert_close(clone.weight, before, atol=1e-6, rtol=0)
    # the source module is untouched by the copy's refresh
    torch.testing.assert_close(layer.weight, original_weight, atol=0, rtol=0)


def test_deepcopy_relinks_a_dtriv_trivialization():
    layer = torch.nn.Linear(5, 5)
    dtriv.constrain(layer, "weight", dtriv.Orthogonal(5))
    clone = copy.deepcopy(layer)
    list(dtriv.trivializations(clone))
    assert _linked(clone)
