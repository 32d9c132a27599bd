"""The optimizer wrapper across the lifecycle of the model it trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from dtriv.manifolds import Orthogonal, Stiefel
from dtriv.optim import DynamicTrivialization
from dtriv.parametrize import constrain
from dtriv.parametrize import orthogonal as dtriv_orthogonal

REGISTER = {
    "constrain": lambda m, r: constrain(m, "weight", Stiefel(6, 4), retraction=r),
    "twin": lambda m, r: dtriv_orthogonal(m, "weight", orthogonal_map=r),
    "torch": lambda m, r: P.orthogonal(m, "weight", orthogonal_map=r),
}
MAPS = {"constrain": ("cayley", "exp"), "twin": ("cayley", "matrix_exp"),
        "torch": ("cayley", "matrix_exp")}


@pytest.mark.parametrize("then", ["constrain", "twin", "torch"])
@pytest.mark.parametrize("first", ["constrain", "twin", "torch"])
@pytest.mark.parametrize("refreshed_before", [False, True])
def test_a_parametrization_registered_again_is_refreshed(first, then, refreshed_before):
    # remove_parametrizations keeps the parameter object (so that the optimizer need not be
    # rebuilt), and registering again makes that same object the new ``original``: the
    # wrapper dropped the removed target and never refreshed the new parametrization
    torch.manual_seed(0)
    lin = nn.Linear(4, 6)
    REGISTER[first](lin, MAPS[first][0])
    original = lin.parametrizations.weight.original
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=0.1), K=2, modules=lin)
    x = torch.randn(5, 4)

    def step():
        opt.zero_grad()
        lin(x).square().sum().backward()
        opt.step()

    for _ in range(2 if refreshed_before else 1):
        step()
    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    REGISTER[then](lin, MAPS[then][1])
    assert lin.parametrizations.weight.original is original
    for _ in range(2 if refreshed_before else 3):
        step()  # the last one refreshes
    assert opt.refreshes == 2  # at steps 2 and 4
    assert [t.original for t in opt.targets] == [original]
    preimage = -torch.eye(6, 4) if then == "torch" else torch.zeros(6, 4)  # torch's is -I
    assert torch.equal(lin.parametrizations.weight.original.detach(), preimage)
    assert Stiefel(6, 4).distance(lin.weight).item() < 1e-5


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("nesterov", [False, True])
def test_riemannian_sgd_steps_a_module_converted_mid_run(count, nesterov):
    # model.double() after some steps left the momentum buffers in float32: the fused Stiefel
    # step raised "expected scalar type Double but found Float" where torch's SGD steps on.
    # Oracle: an optimizer loaded with the same state (load_state_dict converts it)
    from dtriv.optim import ManifoldParameter, RiemannianSGD

    torch.manual_seed(0)
    manifold = Stiefel(6, 4)
    model = nn.ParameterList([ManifoldParameter(manifold.sample(), manifold)
                              for _ in range(count)])
    opt = RiemannianSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov)
    targets = [torch.randn(6, 4) for _ in range(count)]

    def step(model, opt, dtype):
        opt.zero_grad()
        sum((p * t.to(dtype)).sum() for p, t in zip(model, targets)).backward()
        opt.step()

    for _ in range(2):
        step(model, opt, torch.float32)
    model.double()
    twin = nn.ParameterList([ManifoldParameter(p.detach().clone(), manifold, check=False)
                             for p in model])
    twin_opt = RiemannianSGD(twin.parameters(), lr=0.05, momentum=0.9, nesterov=nesterov)
    twin_opt.load_state_dict(opt.state_dict())
    for _ in range(2):
        step(model, opt, torch.float64)
        step(twin, twin_opt, torch.float64)
    for p, q in zip(model, twin):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
        assert opt.state[p]["momentum_buffer"].dtype == torch.float64


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_module_conversion_that_swaps_parameters_after_riemannian_steps(optimizer):
    # the optimizer kept a weak reference to each point it wrote: torch.utils.swap_tensors
    # (Module._apply under set_swap_module_params_on_conversion(True)) refused the parameter
    # ("Cannot swap t1 because it has weakref associated with it"); torch's optimizers hold
    # none. The conversion replaces the ManifoldParameter by a plain one (documented).
    from dtriv.optim import ManifoldParameter, RiemannianAdam, RiemannianSGD

    torch.manual_seed(0)
    manifold = Stiefel(6, 4)
    model = nn.ParameterList([ManifoldParameter(manifold.sample(), manifold) for _ in range(2)])
    make = {"adam": RiemannianAdam, "sgd": RiemannianSGD}[optimizer]
    opt = make(model.parameters(), lr=0.05)
    sum(p.sum() for p in model).backward()
    opt.step()
    expected = [p.detach().double() for p in model]
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)
    for p, e in zip(model, expected):
        assert torch.equal(p.detach(), e)


@pytest.mark.parametrize("register", ["constrain", "twin"])
def test_a_weight_constrained_after_the_wrapper_was_built_is_refreshed(register):
    # torch keeps the optimizer's parameter as the new parametrization's original, so the
    # optimizer trains it; the wrapper, which had scanned before, never refreshed it (K = inf)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Tanh(), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match="got none"):  # nothing to refresh yet
        opt = DynamicTrivialization(torch.optim.SGD(model.parameters(), lr=0.1), K=2)
    if register == "constrain":
        constrain(model[0], "weight", Orthogonal(6))
    else:
        dtriv_orthogonal(model[0])
    plist = model[0].parametrizations.weight
    base0 = plist[0].base.clone()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.refreshes == 1
    assert [t.original for t in opt.targets] == [plist.original]
    assert torch.count_nonzero(plist.original) == 0  # refreshed: the free tensor reset
    assert not torch.equal(plist[0].base, base0)  # and the base moved to the point
    W = model[0].weight.detach()
    torch.testing.assert_close(W.T @ W, torch.eye(6), rtol=0, atol=1e-5)
