"""Evaluate each parametrized tensor once per forward, and torch's parametrize re-exports.

A model that reads a parametrized tensor many times in one forward (an RNN cell reads its
recurrent kernel at every time step) recomputes the parametrization at every read, unless
the reads happen inside :func:`torch.nn.utils.parametrize.cached`. The one line

.. code-block:: python

    dtriv.parametrize.cache_per_forward(model)

makes every call of ``model`` run inside ``cached()``: a forward pre-hook enters the
context and a forward hook registered with ``always_call=True`` leaves it, also when the
forward raises. Nothing else changes:

* **Nesting.** ``cached()`` counts its entries and only the outermost exit clears the
  cache, so the hooks compose with an explicit ``with cached():`` around the call (the
  values then live until that outer block ends) and with hooks on submodules.
* **Gradients.** The first read in a forward computes the tensor with its autograd graph;
  later reads return the same tensor, so the graph of the map is built once and backward
  sums the gradients of all the reads through it: the gradients equal those of the
  uncached forward. The cache is dropped when the forward returns, so the next forward (after
  an optimizer step or a refresh) recomputes the tensor. A first read under ``no_grad``
  would be cached without a graph: read parametrized tensors with the same grad mode
  throughout a forward.
* **Limits** (those of ``cached()``): not for ``torch.jit`` scripting or tracing. Under
  ``torch.compile`` the values are computed once per compiled call as well.

The handle it returns removes both hooks (``handle.remove()``) and is a context manager
that removes them on exit (``with cache_per_forward(model): ...``).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from torch import nn
from torch.nn.utils.parametrize import (
    cached,
    is_parametrized,
    register_parametrization,
    remove_parametrizations,
)

__all__ = [
    "CachePerForward",
    "cache_per_forward",
    "cached",
    "is_parametrized",
    "register_parametrization",
    "remove_parametrizations",
]


class CachePerForward:
    """Hooks that run every call of a module inside :func:`cached` (see the module doc).

    Create it with :func:`cache_per_forward`. ``remove()`` unregisters the hooks (and closes
    any context still open, which only happens when called from inside the forward);
    ``with`` removes them on exit.
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        self._open: list[Any] = []
        self._pre = module.register_forward_pre_hook(self._enter)
        self._post = module.register_forward_hook(self._exit, always_call=True)
        self.active = True

    def _enter(self, module: nn.Module, args: Any) -> None:
        context = cached()
        context.__enter__()
        self._open.append(context)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        """Unregister the hooks; later calls of the module are not cached."""
        self._pre.remove()
        self._post.remove()
        while self._open:
            self._open.pop().__exit__(None, None, None)
        self.active = False

    def __enter__(self) -> CachePerForward:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def cache_per_forward(module: nn.Module) -> CachePerForward:
    """Compute every parametrized tensor read by ``module`` once per call of ``module``.

    Registers a forward pre-hook that enters :func:`torch.nn.utils.parametrize.cached` and
    a forward hook (``always_call=True``) that leaves it, so the cache holds for exactly one
    forward and is cleared even when the forward raises. Returns a handle whose ``remove()``
    unregisters the hooks and which, used as a context manager, removes them on exit.
    Cost: two hook calls per forward; each parametrized tensor is computed at its first read.
    """
    return CachePerForward(module)
