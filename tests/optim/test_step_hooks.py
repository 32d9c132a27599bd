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


def _record(opt, log: list):
    """Per-optimizer and global pre and post hooks that log their calls."""
    return [
        register_optimizer_step_pre_hook(lambda o, a, k: log.append(("global pre", a[1:], k))),
        opt.register_step_pre_hook(lambda o, a, k: log.append(("pre", a[1:], k))),
        opt.register_step_post_hook(lambda o, a, k: log.append(("post", a[1:], k))),
        register_optimizer_step_post_hook(
            lambda o, a, k: log.append(("global post", a[1:], k))),
    ]


@pytest.mark.parametrize("ours,theirs,kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_hooks_run_once_per_step_in_torch_order(ours, theirs, kwargs):
    logs = {}
    closure = lambda: torch.tensor(1.0)  # noqa: E731
    for name, cls in (("ours", ours), ("torch", theirs)):
        opt = cls(_params(), lr=0.1, **kwargs)
        log = logs[name] = []
        handles = _record(opt, log)
        try:
            opt.step()
            opt.step(closure)
        finally:
            for h in handles:
                h.remove()
        assert opt.state  # it stepped
    assert logs["ours"] == logs["torch"]
    assert [e[0] for e in logs["ours"]] == ["global pre", "pre", "post", "global post"] * 2
    assert len(logs["ours"]) == 8


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

    log: list = []
    opt = Clipped(_params(), lr=0.1, momentum=0.9)
    handles = _record(opt, log)
    try:
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert [e[0] for e in log] == ["global pre", "pre", "post", "global post"]
    assert opt.state


class _TorchWrapped(DynamicTrivialization):
    """The wrapper with a step of its own, which torch wraps with its hooks and range: the
    oracle of what the wrapper's step does itself."""

    def step(self, closure=None):
        return self._step(closure)


def _record_typed(opt, log: list):
    """Hooks that log the optimizer's class for the global ones, closures as "closure"."""
    def entry(o, kind, a, k):
        args = tuple("closure" if callable(x) else x for x in a[1:])
        name = type(o).__name__.replace("_TorchWrapped", "DynamicTrivialization")
        return (name, kind, args, k)

    return [
        register_optimizer_step_pre_hook(lambda o, a, k: log.append(entry(o, "global pre", a, k))),
        opt.register_step_pre_hook(lambda o, a, k: log.append(entry(o, "pre", a, k))),
        opt.register_step_post_hook(lambda o, a, k: log.append(entry(o, "post", a, k))),
        register_optimizer_step_post_hook(
            lambda o, a, k: log.append(entry(o, "global post", a, k))),
    ]


def test_the_wrapper_runs_the_hooks_as_torch_would():
    logs = {}
    closure = lambda: torch.tensor(1.0)  # noqa: E731
    for name, cls in (("ours", DynamicTrivialization), ("torch", _TorchWrapped)):
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 4)
        twins.orthogonal(layer)
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        opt = cls(torch.optim.SGD(layer.parameters(), lr=0.1), K=1)
        log = logs[name] = []
        handles = _record_typed(opt, log)
        try:
            opt.step()
            opt.step(closure)
        finally:
            for h in handles:
                h.remove()
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
