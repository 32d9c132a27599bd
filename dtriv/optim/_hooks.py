"""The step hooks and the profiler range of torch's optimizers, run by an optimizer's own
``step``.

torch wraps the ``step`` of every optimizer class (``Optimizer.profile_hook_step``, applied
by ``Optimizer.__init__`` to a class whose ``step`` is not marked ``hooked``): the wrapper
opens the profiler range ``Optimizer.step#<class>.step`` at every step, profiler or not,
and calls the global and per-optimizer step pre- and post-hooks around the step. Measured on
CPU, the wrapper cost 21 to 24 us per step of :class:`~dtriv.optim.RiemannianSGD` on a
sphere vector of 4096 entries (more than the update itself: 85 against 64 us a step) and
9 us per step of :class:`~dtriv.optim.DynamicTrivialization` around Adam. dtriv's
optimizers define their ``step`` by :func:`hooked_step`: marked ``hooked``, it calls
:func:`run_step`, which does what the wrapper does (1.7 us) and opens the range only while a
profiler records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks as _global_post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _global_pre_hooks

__all__ = ["clear_grads", "hooked_step", "run_step"]

#: whether a profiler (of any kind: kineto, NVTX, ITT) is recording
_profiler_enabled = torch._C._autograd._profiler_enabled


def hooked_step(body: str, doc: str) -> Callable[..., Any]:
    """An optimizer class's ``step(*args, **kwargs)``: its method ``body`` under
    :func:`run_step`, marked ``hooked`` so that torch does not wrap it. A subclass that
    defines a ``step`` of its own is wrapped by torch as usual (its hooks and range run
    there), and this ``step``, called from it, then runs ``body`` alone: the hooks run once.
    ``doc``: the docstring of the step."""

    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if type(self).step is not step:
            return getattr(self, body)(*args, **kwargs)
        return run_step(self, getattr(type(self), body), args, kwargs)

    step.hooked = True  # type: ignore[attr-defined]
    step.__doc__ = doc
    return step


def run_step(opt: torch.optim.Optimizer, body: Callable[..., Any], args: tuple,
             kwargs: dict[str, Any]) -> Any:
    """``body(opt, *args, **kwargs)`` with what torch's step wrapper adds: the global and
    per-optimizer step pre-hooks (each gets ``(opt, (opt, *args), kwargs)`` and may return
    replacements for the last two), ``opt._optimizer_step_code()`` (the profiler's entry
    point), the post-hooks, and, while a profiler records, the range
    ``Optimizer.step#<class>.step`` around them."""
    if _profiler_enabled():
        with torch.autograd.profiler.record_function(
                f"Optimizer.step#{type(opt).__name__}.step"):
            return _with_hooks(opt, body, args, kwargs)
    return _with_hooks(opt, body, args, kwargs)


def _with_hooks(opt: torch.optim.Optimizer, body: Callable[..., Any], args: tuple,
                kwargs: dict[str, Any]) -> Any:
    args = (opt, *args)  # torch's hooks get the step's arguments with the optimizer first
    pre = opt._optimizer_step_pre_hooks
    if _global_pre_hooks or pre:
        for hook in (*_global_pre_hooks.values(), *pre.values()):
            result = hook(opt, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        "step pre-hook: expected None or a tuple (new_args, new_kwargs), "
                        f"got {result!r}"
                    )
                args, kwargs = result
    out = body(*args, **kwargs)
    opt._optimizer_step_code()
    post = opt._optimizer_step_post_hooks
    if post or _global_post_hooks:
        for hook in (*post.values(), *_global_post_hooks.values()):
            hook(opt, args, kwargs)
    return out


def clear_grads(opt: torch.optim.Optimizer, set_to_none: bool) -> bool:
    """``p.grad = None`` for every parameter of ``opt``: what torch's
    ``Optimizer.zero_grad(set_to_none=True)`` does, without the profiler range
    ``Optimizer.zero_grad#<class>.zero_grad`` that it opens at every call (6 of its 8 us for
    one parameter). Returns whether it did so; it leaves every other case to torch's
    ``zero_grad`` (``set_to_none=False``, a profiler recording, ``torch.compile`` tracing)."""
    if not set_to_none or _profiler_enabled() or torch.compiler.is_compiling():
        return False
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = None
    return True
