"""Once per forward: an RNN reading its constrained kernel at every step computes it once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import nn

from dtriv.manifolds import Orthogonal
from dtriv.parametrize import cache_per_forward, cached, constrain

F64 = torch.float64
STEPS = 200


class RNN(nn.Module):
    def __init__(self, n_in=3, n_hidden=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.input = nn.Linear(n_in, n_hidden).double()
        self.recurrent = nn.Linear(n_hidden, n_hidden, bias=False).double()
        constrain(self.recurrent, "weight", Orthogonal(n_hidden))
        with torch.no_grad():  # a non-trivial point of the chart
            self.recurrent.parametrizations.weight.original.normal_(0, 0.3)
        self.n_hidden = n_hidden

    def forward(self, x):  # x: (steps, batch, n_in)
        h = x.new_zeros(x.shape[1], self.n_hidden)
        for x_t in x:
            h = torch.tanh(self.recurrent(h) + self.input(x_t))
        return h


def count_retractions(model):
    """Wrap the manifold's retract on this trivialization; returns the call counter."""
    triv = model.recurrent.parametrizations.weight[0]
    manifold = triv.manifold
    retract = manifold.retract
    counter = {"calls": 0}

    def counting(*args, **kwargs):
        counter["calls"] += 1
        return retract(*args, **kwargs)

    manifold.retract = counting
    return counter


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS, 4, 3, generator=g, dtype=F64)


def loss_and_grads(model, x):
    model.zero_grad()
    loss = model(x).square().sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_uncached_forward_computes_the_kernel_at_every_step():
    model = RNN()
    counter = count_retractions(model)
    model(inputs())
    assert counter["calls"] == STEPS


def test_cache_per_forward_computes_once_with_equal_gradients():
    x = inputs()
    plain = RNN(seed=2)
    loss_plain, grads_plain = loss_and_grads(plain, x)

    model = RNN(seed=2)
    counter = count_retractions(model)
    handle = cache_per_forward(model)
    loss, grads = loss_and_grads(model, x)
    assert counter["calls"] == 1
    assert torch.allclose(loss, loss_plain, rtol=1e-12, atol=0)
    assert grads.keys() == grads_plain.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_plain[name], rtol=1e-10, atol=1e-12), name
    # the cache lives for one forward: the next forward recomputes (once)
    assert torch_parametrize._cache_enabled == 0 and torch_parametrize._cache == {}
    model(x)
    assert counter["calls"] == 2
    # removing the hooks restores the uncached behaviour
    handle.remove()
    model(x)
    assert counter["calls"] == 2 + STEPS


def test_cache_sees_parameter_updates_between_forwards():
    x = inputs()
    model = RNN(seed=3)
    cache_per_forward(model)
    before = model(x).detach()
    step = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        model.recurrent.parametrizations.weight.original.add_(step)
    after = model(x).detach()
    reference = RNN(seed=3)
    with torch.no_grad():
        reference.recurrent.parametrizations.weight.original.add_(step)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, reference(x).detach(), rtol=1e-12, atol=1e-14)


def test_exception_in_forward_leaves_the_cache():
    class Failing(RNN):
        def forward(self, x):
            super().forward(x)
            raise KeyError("boom")

    model = Failing(seed=4)
    cache_per_forward(model)
    with pytest.raises(KeyError, match="boom"):
        model(inputs())
    assert torch_parametrize._cache_enabled == 0 and torch_parametrize._cache == {}


def test_context_manager_removes_hooks_and_nests_with_cached():
    x = inputs()
    model = RNN(seed=5)
    counter = count_retractions(model)
    with cache_per_forward(model):
        model(x)
        assert counter["calls"] == 1
        # inside an explicit cached() the value lives until the outer block ends
        with cached():
            model(x)
            model(x)
            assert torch_parametrize._cache_enabled == 1
        assert counter["calls"] == 2
    assert torch_parametrize._cache_enabled == 0
    assert not model._forward_pre_hooks and not model._forward_hooks
    model(x)
    assert counter["calls"] == 2 + STEPS


def test_hooks_on_a_submodule_and_on_the_model_compose():
    x = inputs()
    model = RNN(seed=6)
    counter = count_retractions(model)
    cache_per_forward(model)
    cache_per_forward(model.recurrent)  # inner hooks nest inside the outer ones
    model(x)
    assert counter["calls"] == 1
    assert torch_parametrize._cache_enabled == 0
