"""The step hooks and the profiler range of the Riemannian optimizers and of the
DynamicTrivialization wrapper are torch's: the same calls, in the same order, with the same
arguments as around a torch optimizer's step (dtriv/optim/_hooks.py)."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from dtriv.manifolds import Sphere
from dtriv.optim import DynamicTrivialization, ManifoldParameter, RiemannianAdam, RiemannianSGD
from dtriv.parametrize import twins

OPTIMIZERS = [(RiemannianSGD, torch.optim.SGD, {"momentum": 0.9}),
              (RiemannianAdam, torch.optim.Adam, {})]


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    point = ManifoldParameter(Sphere(6).sample(generator=g, dtype=torch.float64), Sphere(6))
    plain = torch.nn.Parameter(torch.randn(3, dtype=torch.float64, generator=g))
    for p in (point, plain):
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
    return [point, plain]


def _logged_steps(opt, closure) -> list:
    """Two steps of ``opt`` (without, then with ``closure``) under per-optimizer and global
    pre and post hooks that log ``(optimizer class, hook, arguments, keyword arguments)``,
    closures as "closure" (a wrapper builds its own around the user's)."""
    log: list = []

    def hook(kind):
        def record(o, a, k):
            args = tuple("closure" if callable(x) else x for x in a[1:])
            name = type(o).__name__.replace("_TorchWrapped", "DynamicTrivialization")
            log.append((name, kind, args, k))
        return record

    handles = [register_optimizer_step_pre_hook(hook("global pre")),
               opt.register_step_pre_hook(hook("pre")), opt.register_step_post_hook(hook("post")),
               register_optimizer_step_post_hook(hook("global post"))]
    try:
        opt.step()
        opt.step(closure)
    finally:
        for h in handles:
            h.remove()
    return log


def _closure():
    return torch.tensor(1.0)


@pytest.mark.parametrize("ours,theirs,kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_hooks_run_once_per_step_in_torch_order(ours, theirs, kwargs):
    logs = {}
    for name, cls in (("ours", ours), ("torch", theirs)):
        opt = cls(_params(), lr=0.1, **kwargs)
        logs[name] = [e[1:] for e in _logged_steps(opt, _closure)]  # (class names differ)
        assert opt.state  # it stepped
    assert logs["ours"] == logs["torch"]
    assert [e[0] for e in logs["ours"]] == ["global pre", "pre", "post", "global post"] * 2
    assert [e[1] for e in logs["ours"]] == [()] * 4 + [("closure",)] * 4


@pytest.mark.parametrize("ours,theirs,kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_a_pre_hook_may_replace_the_arguments(ours, theirs, kwargs):
    seen = []
    opt = ours(_params(), lr=0.1, **kwargs)
    opt.register_step_pre_hook(
        lambda o, a, k: ((a[0],), {"closure": lambda: seen.append(1) or 2.0}))
    assert opt.step() == 2.0 and seen == [1]
    opt2 = ours(_params(), lr=0.1, **kwargs)
    opt2.register_step_pre_hook(lambda o, a, k: "nonsense")
    with pytest.raises(RuntimeError, match="pre-hook"):
        opt2.step()


@pytest.mark.parametrize("ours,theirs,kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_the_step_is_one_profiler_range(ours, theirs, kwargs):
    opt = ours(_params(), lr=0.1, **kwargs)
    with torch.profiler.profile() as prof:
        opt.step()
    names = [e.name for e in prof.events()]
    assert names.count(f"Optimizer.step#{ours.__name__}.step") == 1


def test_the_profiler_sees_the_step_code_entry_point():
    # torch's profiler (its memory profiler, with Python stacks) marks optimizer steps by the
    # call of Optimizer._optimizer_step_code
    opt = RiemannianAdam(_params(), lr=0.1)
    with torch.profiler.profile(with_stack=True) as prof:
        opt.step()
    assert sum(e.name.endswith("_optimizer_step_code") for e in prof.events()) == 1


def test_a_subclass_step_runs_the_hooks_once():
    class Clipped(RiemannianSGD):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad.clamp_(-1, 1)
            return super().step(closure)

    opt = Clipped(_params(), lr=0.1, momentum=0.9)
    log = _logged_steps(opt, _closure)
    assert [e[1] for e in log] == ["global pre", "pre", "post", "global post"] * 2
    assert opt.state


class _TorchWrapped(DynamicTrivialization):
    """The wrapper with a step of its own, which torch wraps with its hooks and range: the
    oracle of what the wrapper's step does itself."""

    def step(self, closure=None):
        return self._step(closure)


def test_the_wrapper_runs_the_hooks_as_torch_would():
    logs = {}
    for name, cls in (("ours", DynamicTrivialization), ("torch", _TorchWrapped)):
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 4)
        twins.orthogonal(layer)
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        opt = cls(torch.optim.SGD(layer.parameters(), lr=0.1), K=1)
        logs[name] = _logged_steps(opt, _closure)
        assert opt.steps == 2 and opt.refreshes == 2
        with torch.profiler.profile() as prof:
            opt.step()
        names = [e.name for e in prof.events()]
        assert names.count(f"Optimizer.step#{cls.__name__}.step") == 1
    # the wrapper's own hooks around the inner optimizer's (global ones fire for both)
    assert logs["ours"] == logs["torch"]
    assert [(e[0], e[1]) for e in logs["ours"][:6]] == [
        ("DynamicTrivialization", "global pre"), ("DynamicTrivialization", "pre"),
        ("SGD", "global pre"), ("SGD", "global post"),
        ("DynamicTrivialization", "post"), ("DynamicTrivialization", "global post")]


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("ours,theirs,kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_zero_grad_is_torchs(ours, theirs, kwargs, set_to_none):
    results = {}
    for name, cls in (("ours", ours), ("torch", theirs)):
        params = _params()
        opt = cls(params, lr=0.1, **kwargs)
        opt.zero_grad(set_to_none=set_to_none)
        results[name] = [p.grad for p in params]
        with torch.profiler.profile() as prof:
            opt.zero_grad(set_to_none=set_to_none)
        names = [e.name for e in prof.events()]
        assert names.count(f"Optimizer.zero_grad#{cls.__name__}.zero_grad") == 1
    if set_to_none:
        assert results["ours"] == results["torch"] == [None, None]
    else:
        for g, h in zip(results["ours"], results["torch"]):
            assert torch.equal(g, h) and not g.any()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_wrappers_zero_grad_is_the_inner_optimizers(set_to_none):
    class Counting(torch.optim.SGD):  # a zero_grad of its own is called as it is
        calls = 0

        def zero_grad(self, set_to_none=True):
            Counting.calls += 1
            super().zero_grad(set_to_none)

    for inner in (torch.optim.SGD, torch.optim.Adam, Counting):
        layer = torch.nn.Linear(4, 4)
        twins.orthogonal(layer)
        opt = DynamicTrivialization(inner(layer.parameters(), lr=0.1))
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        with torch.profiler.profile() as prof:
            opt.zero_grad(set_to_none=set_to_none)
        names = [e.name for e in prof.events()]
        assert names.count(f"Optimizer.zero_grad#{inner.__name__}.zero_grad") == 1
        opt.zero_grad(set_to_none=set_to_none)
        for p in layer.parameters():
            assert p.grad is None if set_to_none else not p.grad.any()
    assert Counting.calls == 2
