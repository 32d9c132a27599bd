"""Evaluate each parametrized tensor once per forward, and torch's parametrize re-exports.

A model that reads a parametrized tensor many times in one forward (an RNN cell reads its
recurrent kernel at every time step) would recompute the parametrization at every read, as
torch's parametrizations do outside :func:`torch.nn.utils.parametrize.cached`.

**By default** dtriv's parametrizations (:class:`~dtriv.parametrize.Trivialization`, and the
``orthogonal`` twin) do not: each keeps a :class:`ForwardMemo` of its last value, which later
reads return while the parameter, the base, the grad mode and the rest of what the value depends
on are unchanged, and which is no longer handed out once backward has consumed its graph (backward
reaches the node that made the value) or an optimizer step / ``refresh`` / assignment /
``load_state_dict`` has changed the tensors. The map is thus computed once per forward and backward
runs through it once, with no code in the model. :func:`memoize` ``(model, False)`` (or
``parametrization.memoize = False``) opts out. See :class:`ForwardMemo` for what is cached
and when it is dropped.

For parametrizations that are not dtriv's (torch's own, a user's), the one line

.. code-block:: python

    dtriv.parametrize.cache_per_forward(model)

makes every call of ``model`` run inside ``cached()``: a forward pre-hook enters the
context and a forward hook registered with ``always_call=True`` leaves it, also when the
forward raises. Nothing else changes:

* **Nesting.** ``cached()`` counts its entries and only the outermost exit clears the
  cache, so the hooks compose with an explicit ``with cached():`` around the call (the
  values then live until that outer block ends) and with hooks on submodules; both compose
  with the memo of dtriv's parametrizations (torch's cache then calls the parametrization
  once, and the memo holds that value).
* **Gradients.** The first read in a forward computes the tensor with its autograd graph;
  later reads return the same tensor, so the graph of the map is built once and backward
  sums the gradients of all the reads through it: the gradients equal those of the
  uncached forward. The cache is dropped when the forward returns, so the next forward (after
  an optimizer step or a refresh) recomputes the tensor. A first read under ``no_grad``
  would be cached without a graph: read parametrized tensors with the same grad mode
  throughout a forward.
* **Limits** (those of ``cached()``): not for ``torch.jit`` scripting or tracing. Under
  ``torch.compile`` the values are computed once per compiled call as well.

**Under** ``torch.compile`` dtriv's parametrizations run outside the compiled graphs
(:func:`~dtriv.retractions._common.outside_compiled_graphs`): the maps choose their degrees,
scalings and iteration counts from norms read on the host and check their factorizations
there; traced by dynamo, each such read was a graph break and each new choice (a larger
generator after some steps, a smaller one after a refresh) a recompilation (dynamic
trivialization reached torch's recompilation limit within ten steps), and the map ran once
per read. Run outside the graph, the map is the same eager code as without compilation
(values equal bit for bit), its memo serves the later reads of a forward, and the graphs
compiled around it at the first step serve every later one: one graph break per read of the
weight. ``torch.compile(..., fullgraph=True)`` therefore refuses these parametrizations;
``torch.export`` traces the maps' data-independent paths.

The handle it returns removes both hooks (``handle.remove()``) and is a context manager
that removes them on exit (``with cache_per_forward(model): ...``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize as torch_parametrize
from torch.nn.utils.parametrize import (
    cached,
    is_parametrized,
    remove_parametrizations,
)
from torch.optim.optimizer import register_optimizer_step_post_hook

from dtriv.retractions._common import backward_ran, check_flag, reports_backward_of

__all__ = [
    "CachePerForward",
    "ForwardMemo",
    "cache_per_forward",
    "cached",
    "is_parametrized",
    "memoize",
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


# ---------------------------------------------------------------------------- the memo
_PLAIN = (Tensor, nn.Parameter)


def _memo_allowed(X: Any, base: Any) -> bool:
    """Whether a parametrization may reuse its last value: eager code on plain tensors.

    Not while dynamo or ``torch.export`` traces the map (the graph computes it itself;
    dtriv's parametrizations run outside ``torch.compile``'s graphs, as eager code where this
    holds), ``torch.jit`` tracing or scripting, or ``torch.func`` transforms (``vmap``,
    ``grad``, ...); not for tensor subclasses (functorch wrappers, fake or meta-programming
    tensors).
    """
    return (
        not torch.compiler.is_compiling()
        and type(X) in _PLAIN
        and (base is None or type(base) in _PLAIN)
        and torch._C._get_tracing_state() is None
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def _version(t: Tensor) -> int:
    """``t._version``; ``-1`` for inference tensors (they have no version counter)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _state(X: Tensor, base: Tensor | None) -> tuple:
    """What the memoized value depends on besides the identity of ``X`` and ``base``.

    Not the device: a tensor moved to another device has another storage, whose address
    (``data_ptr``) differs (devices do not share addresses), and ``Module.to`` also replaces
    the base buffer. Not autocast: the parametrizations compute with it off (``_evaluate``),
    so their value is the same inside and outside ``torch.autocast``. Written out (no helper
    calls): it runs at every read of a memoized tensor, and in a sphere parametrization's
    forward and backward on a vector of 4096 it cost 3.5 of about 100 microseconds."""
    try:
        x_version = X._version
    except RuntimeError:  # an inference tensor has no version counter
        x_version = -1
    if base is None:
        base_version = base_ptr = -1
    else:
        try:
            base_version = base._version
        except RuntimeError:
            base_version = -1
        base_ptr = base.data_ptr()  # ``base.data = ...``: no version bump, a new storage
    hooks = _top_saved_tensors_hooks(True)
    return (
        x_version,
        X.data_ptr(),  # ``X.data = ...`` changes the storage without bumping the version
        X.dtype,
        X.requires_grad,
        base_version,
        base_ptr,
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        None if hooks is None else weakref.ref(hooks[0]),  # see _top_saved_tensors_hooks
    )


#: The innermost active saved-tensor hooks (``(pack, unpack)``, or ``None``), which
#: :func:`_state` keeps as a weak reference to the pack function (equal while that same
#: function is alive). ``torch.utils.checkpoint`` (non-reentrant) runs each checkpointed region
#: under hooks of its own and in backward runs the region again under other hooks, where it
#: must save the same tensors as in the forward: a value computed in one region is therefore
#: not handed out in another, nor in a recomputation (which then computes the map again, as
#: the forward did).
_top_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks


#: :class:`_Sample` reads this many runs of :data:`SAMPLE_RUN` consecutive entries
SAMPLE_RUNS = 4
SAMPLE_RUN = 16
_SAMPLE_INDEX: dict[tuple[int, int], np.ndarray] = {}


def _sample_index(numel: int, itemsize: int) -> np.ndarray:
    """Byte positions of the entries a :class:`_Sample` reads in a contiguous tensor of
    ``numel`` entries of ``itemsize`` bytes (cached): :data:`SAMPLE_RUNS` runs of
    :data:`SAMPLE_RUN` consecutive entries, evenly spread from the first entry to the last."""
    key = (numel, itemsize)
    index = _SAMPLE_INDEX.get(key)
    if index is None:
        run = min(SAMPLE_RUN, numel)
        starts = np.unique(np.linspace(0, numel - run, SAMPLE_RUNS).round().astype(np.int64))
        entries = (starts[:, None] + np.arange(run)).ravel()
        index = _SAMPLE_INDEX[key] = (entries[:, None] * itemsize + np.arange(itemsize)).ravel()
    return index


class _Sample:
    """Some entries of a parameter, to tell whether it was written since.

    A write through ``X.data`` (a target network's soft update ``p.data.copy_(...)``), and
    torch's fused optimizers, bump no version counter; they change the sampled entries when
    they change every entry. Keeps a byte view of a contiguous CPU tensor's storage (through
    NumPy: reading the sample back costs about half a microsecond, with no torch op), the
    byte positions (:func:`_sample_index`) and their bytes (so a NaN compares equal to
    itself). Made by :meth:`of`, which gives other tensors no sample: on an accelerator,
    reading it back would synchronise the device at every read.
    """

    __slots__ = ("_bytes", "_index", "_values")

    def __init__(self, data: np.ndarray, index: np.ndarray) -> None:
        self._bytes, self._index = data, index
        self._values = data[index].tobytes()

    @classmethod
    def of(cls, X: Tensor) -> _Sample | None:
        """The sample of ``X``, or ``None`` when ``X`` is not a non-empty dense CPU tensor,
        contiguous or transposed from one, whose bytes NumPy can view."""
        if X.device.type != "cpu" or X.layout != torch.strided or X.numel() == 0:
            return None
        alias = X.detach()
        if not alias.is_contiguous() and X.ndim >= 2:
            alias = alias.mT  # a transposed view (a wide weight): its storage in order
        if not alias.is_contiguous():
            return None
        try:
            data = alias.reshape(-1).view(torch.uint8).numpy()
        except (RuntimeError, TypeError):  # a conjugate or negative view, ...: no sample
            return None
        return cls(data, _sample_index(X.numel(), X.element_size()))

    def unchanged(self) -> bool:
        """Whether the sampled entries hold the bytes they held when sampled."""
        return self._bytes[self._index].tobytes() == self._values


class _Copy:
    """A whole copy of a tensor passed in place of a parameter, to tell whether it was written
    since (:meth:`unchanged`, the interface of :class:`_Sample`).

    ``torch.autograd.gradcheck`` (and any finite difference) through
    ``torch.func.functional_call`` perturbs one entry of such a tensor at a time through
    ``.data``, which bumps no version counter and which a sample would miss, between forwards
    it never backpropagates: without the copy the memo would hand back the unperturbed value,
    and the numerical Jacobian would read zero. Kept only for a plain leaf tensor that
    requires grad and is not a parameter (what ``functional_call`` passes); a read that hits
    costs one comparison pass over the tensor (and, on an accelerator, a synchronisation),
    far below the map it saves but not free: a ``functional_call`` training loop that reads
    one leaf kernel 50 times per forward measured 9.0 against 7.9 ms per step at 256 x 256 on
    CPU. Pass parameters, or turn the memo off, where that matters.
    """

    __slots__ = ("_tensor", "_copy")

    def __init__(self, X: Tensor) -> None:
        self._tensor = X
        self._copy = X.detach().clone()

    @staticmethod
    def wanted(X: Tensor) -> bool:
        """Whether ``X`` is such a tensor: a plain leaf that requires grad, not a parameter."""
        return type(X) is Tensor and X.is_leaf and X.requires_grad

    def unchanged(self) -> bool:
        """Whether the tensor holds the values it held when copied (a NaN reads as changed:
        the value is then recomputed)."""
        return torch.equal(self._tensor.detach(), self._copy)


def _unchanged(entry: tuple) -> bool:
    """Whether the samples of a memo entry are unchanged: that of ``X`` (a value without a
    graph, of a tensor :meth:`_Sample.of` samples) and that of an inference value."""
    sample, value_sample = entry[6], entry[7]
    return (sample is None or sample.unchanged()) and (
        value_sample is None or value_sample.unchanged())


#: whether the nodes of a type record their backward (:func:`_watch`)
_REPORTS: dict[type, bool] = {}


def _watch(node: Any) -> Any:
    """What tells the memo that backward has reached ``node``: the node itself when it records
    its backward (:func:`~dtriv.retractions._common.reports_backward`), else a list that a
    pre-hook on it fills (the node's output gradients: a builtin ``append``, no Python frame
    runs during backward, and it returns None, so the gradients are unchanged). Whether a
    node records its backward is a property of its type, looked up once per type."""
    kind = type(node)
    reports = _REPORTS.get(kind)
    if reports is None:
        reports = _REPORTS[kind] = reports_backward_of(node)
    if reports:
        return node
    seen: list = []
    node.register_prehook(seen.append)
    return seen


def _consumed(seen: Any) -> bool:
    """Whether backward has reached the node that :func:`_watch` returned ``seen`` for."""
    if seen is None:  # not watched: the value does not require grad
        return False
    if type(seen) is list:
        return bool(seen)
    return backward_ran(seen)


class ForwardMemo:
    r"""The last value of a parametrization, reused while nothing it depends on has changed.

    A parametrization ``P`` evaluated as ``memo(X, base, P.compute)`` computes ``P(X)`` once
    and returns that same tensor (with its autograd graph) to the following reads while all of
    these hold:

    * ``X`` and ``base`` are the same tensor objects, with the same ``_version`` (in-place
      updates: optimizer steps, ``refresh``, ``load_state_dict``, ``copy_`` bump it) and the
      same storage (``X.data = ...``, or ``torch.utils.swap_tensors``, with which ``Module.to``
      and ``load_state_dict`` convert parameters under
      ``torch.__future__.set_swap_module_params_on_conversion(True)``; a move to another
      device is a new storage) and dtype (the memo holds ``X`` and ``base`` themselves: a weak
      reference would make ``swap_tensors`` refuse them);
    * grad mode, inference mode and ``X.requires_grad`` are unchanged (autocast does not
      matter: dtriv's parametrizations compute with it off);
    * the reading thread made the value: threads that share a module each get their own
      value and graph, as without the memo, instead of one thread's backward freeing the
      graph that another thread's forward took (a checkpointed region that backward
      recomputes on another thread, as an accelerator's autograd threads do, computes the map
      again there: its forward computed it inside the region too, see below);
    * the innermost saved-tensor hooks are the same (none, or the same ``save_on_cpu``
      context): under non-reentrant ``torch.utils.checkpoint`` a value is shared within one
      checkpointed region only, so that backward's recomputation of the region saves the
      tensors its forward saved (see :data:`_top_saved_tensors_hooks`);
    * the value was not modified in place: its ``_version``, or, for a value made under
      ``torch.inference_mode`` (inference tensors have no version counter), a sample of its
      entries as below (a CPU value; on an accelerator such a value is not memoized);
    * for a value without a graph (read under ``no_grad`` or ``inference_mode``, or of a
      parameter that does not require grad), which no backward ever drops: a sample of the
      parameter's entries (:class:`_Sample`: four runs of 16 consecutive entries) is
      unchanged. Writes through ``tensor.data`` (as in ``p.data.copy_(ema)``, the soft update
      of a target network) bypass the version counter (so do torch's ``fused=True``
      optimizers, whose steps clear the memos of their parameters: :func:`_after_fused_step`);
      a write that changes every entry changes the sample (CPU tensors; half a microsecond per read;
      a value with a graph gets no sample, since taking one costs 15 to 40 us per forward in
      a training loop, 3 to 8% of a 64 x 64 map's forward and backward), except for a
      plain leaf tensor passed in place of the parameter (``torch.func.functional_call``),
      whose value is compared whole with a copy (:class:`_Copy`: ``gradcheck`` perturbs one
      entry at a time through ``.data``);
    * backward has not consumed its graph: the node that made the value (``value.grad_fn``)
      tells when backward reaches it, which is when (``retain_graph=False``) the graph of the
      map is freed; from then on the value is not handed out (the next read drops it and
      computes a fresh value with a fresh graph). A node of dtriv's own maps records it itself
      (:func:`~dtriv.retractions._common.reports_backward`: its backward sets a flag); any
      other node gets a pre-hook, the ``append`` of a list the memo owns (a builtin: no Python
      frame runs during backward, and the gradients are neither copied nor changed), so the
      list is non-empty once backward has reached the value. A value that is a leaf (the map
      returned a tensor that requires grad as is) is not memoized.

    So in a training loop the map is computed once per forward however many times the weight is
    read (an RNN cell reads it at every step), and backward runs through it once, with the sum
    of the gradients of all the reads: gradients equal those of the recompute-per-read forward
    (up to rounding). The owner also drops it explicitly (:meth:`clear`) on ``refresh``,
    ``right_inverse`` and ``load_state_dict``.

    Limits. A write through ``.data`` after a read in grad mode that is not backpropagated (a
    target network read without ``no_grad`` and detached, as in DDPG's reference code) is not
    seen until backward drops the value, and one that leaves every sampled entry of a value
    without a graph as it was (a few rows or columns, say) is not seen at all; read such a
    network under ``torch.no_grad()``, write under ``torch.no_grad()`` instead, or call
    :func:`memoize` ``(model)`` (which clears the memos) after the write. An optimizer step
    is seen: torch's optimizers write in place (a version bump), and a ``fused=True`` step
    clears the memos of its parameters, so a forward in grad mode whose output is never
    backpropagated (a metric between ``backward`` and ``step``, a head left out of the loss)
    cannot hand the next step a weight from before it. Two forwards between which nothing
    changed share one value and one graph of the map: backpropagate their losses together
    (``(loss_a + loss_b).backward()``), or the first backward with ``retain_graph=True``; a
    second ``backward`` through a graph that the first one freed raises torch's "backward
    through the graph a second time" error, exactly as under
    :func:`torch.nn.utils.parametrize.cached`. A value read in grad mode keeps its graph (the
    map's intermediates) alive until backward frees it, and the value (with the gradient a
    pre-hook received) alive until the next read (or :meth:`clear`): one value and at most one
    gradient of the tensor's size per parametrization held through the optimizer step; so are
    the ``X`` and ``base`` it was computed from, which matters only once they were replaced (a
    tensor substituted by ``torch.func.functional_call``, a base buffer that ``Module.to``
    replaced). (``weight.grad`` stays ``None``, as for torch's parametrized tensors.) The memo
    is bypassed (the map is computed at every read) where the map is traced (``torch.export``,
    ``torch.jit`` tracing, or dynamo for a parametrization that is not dtriv's own:
    dtriv's run outside ``torch.compile``'s graphs, as eager code that uses the memo), under
    ``torch.func`` transforms and for tensor subclasses; it is not copied by ``deepcopy`` or
    pickled.

    Cost of a read that hits: a handful of attribute reads (about a microsecond); of a miss,
    a few microseconds of bookkeeping besides the map, plus, for a value that a node other than
    dtriv's own made, the node pre-hook: about 16 us per forward and backward on CPU (against
    20 us for ``retain_grad()`` at ``n = 64`` and 37 us for a tensor hook; ``retain_grad()``
    also copies the gradient, about 0.15 of an ``n x n`` product at ``n = 512``).
    """

    __slots__ = ("_entry", "_key", "__weakref__")

    def __init__(self) -> None:
        #: ``id(X)`` under which :data:`_MEMO_OF` finds this memo (its last ``X``), or None
        self._key: int | None = None
        #: ``(X, base | None, state, value, value._version, seen, sample, value_sample)`` or
        #: None; ``X`` and ``base`` are held, not weakly referenced: ``torch.utils.swap_tensors``
        #: (``Module.to`` and ``load_state_dict`` under
        #: ``torch.__future__.set_swap_module_params_on_conversion(True)``) refuses a tensor
        #: with a weak reference (the parametrization holds both anyway);
        #: ``seen``: ``value.grad_fn`` when it records its backward
        #: itself, else the list its pre-hook appends to (``None``: not watched);
        #: :func:`_consumed` reads either; ``sample``: the :class:`_Sample` (or
        #: :class:`_Copy`) of ``X``; ``value_sample``: that of an inference value; the
        #: thread that computed it
        self._entry: tuple | None = None

    def clear(self) -> None:
        """Forget the memoized value; the next read recomputes it."""
        self._entry = None

    @property
    def value(self) -> Tensor | None:
        """The memoized tensor, or ``None`` (also once backward has consumed it: dropped)."""
        entry = self._entry
        if entry is not None and _consumed(entry[5]):
            self._entry = entry = None
        return None if entry is None else entry[3]

    def read(
        self, X: Tensor, base: Tensor | None, compute: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """``compute(X)``, or the memoized value of it when still valid (see the class doc)."""
        if not _memo_allowed(X, base):
            return compute(X)
        entry = self._entry
        state = None
        if entry is not None:
            if self._fresh(entry, X, base):
                state = _state(X, base)
                if entry[2] == state and _unchanged(entry):
                    return entry[3]
            self._entry = None  # frees the old value (and its graph) before computing anew
        if state is None:
            state = _state(X, base)
        value = compute(X)
        seen = None
        if value.requires_grad:
            if value.grad_fn is None:  # a leaf: backward accumulates into its ``.grad``
                return value
            seen = _watch(value.grad_fn)
        # a value without a graph, which no backward drops, also checks a sample of X for
        # writes that bump no version counter (see the class doc),
        # and so does a value of a tensor passed in place of the parameter, against a copy
        sample = (_Copy(X) if _Copy.wanted(X) else None) if value.requires_grad else (
            _Sample.of(X))
        value_sample = None
        if value.is_inference():  # no version counter shows an in-place edit of the value
            value_sample = _Sample.of(value)
            if value_sample is None:  # not sampled (an accelerator's): not memoized
                return value
        self._entry = (X, base, state, value, _version(value), seen, sample, value_sample,
                       threading.get_ident())
        _register(self, X)
        return value

    __call__ = read

    @staticmethod
    def _fresh(entry: tuple, X: Tensor, base: Tensor | None) -> bool:
        """The checks that need no ``_state``: backward, in-place writes, identities."""
        value = entry[3]
        return (
            not _consumed(entry[5])
            and _version(value) == entry[4]
            and entry[0] is X
            and (base is None or entry[1] is base)
            and entry[8] == threading.get_ident()  # the thread that made it
        )

    def __deepcopy__(self, memo: dict) -> ForwardMemo:
        return ForwardMemo()

    def __reduce__(self):
        return (ForwardMemo, ())


#: the memo whose value was last computed from a tensor, by ``id`` of the tensor (weak: a memo
#: that dies leaves it), for :func:`_after_fused_step`
_MEMO_OF: weakref.WeakValueDictionary[int, ForwardMemo] = weakref.WeakValueDictionary()
_STEP_HOOK: list[Any] = []


def _register(memo: ForwardMemo, X: Tensor) -> None:
    """File ``memo`` under ``id(X)`` (replacing its previous key, so that a memo fed a new
    tensor at each call, as ``functional_call`` does, holds one key), and install the global
    optimizer step hook once."""
    key = id(X)
    if memo._key == key:  # filed already (the usual case; a memo that lost its key has None)
        return
    if memo._key is not None and _MEMO_OF.get(memo._key) is memo:
        del _MEMO_OF[memo._key]
    previous = _MEMO_OF.get(key)
    if previous is not None:  # another memo fed the same tensor: it is no longer filed
        previous._key = None
    memo._key = key
    _MEMO_OF[key] = memo
    if not _STEP_HOOK:
        _STEP_HOOK.append(
            register_optimizer_step_post_hook(_after_fused_step))


def _after_fused_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """A global step post-hook of torch's optimizers: after a step of a ``fused=True`` group
    (torch's fused kernels write the parameters without bumping their version counters),
    clear the memos whose value was computed from one of its parameters. Without it, a value
    read in grad mode and never backpropagated (a metric computed between ``backward`` and
    ``step``, a head left out of this step's loss) would be handed to the next forward from
    before the step. Other optimizers bump the counters; for them this is one look at each
    group."""
    for group in optimizer.param_groups:
        if not group.get("fused"):
            continue
        for p in group["params"]:
            memo = _MEMO_OF.get(id(p))
            if memo is not None and memo._entry is not None and memo._entry[0] is p:
                memo.clear()


def check_model(model: object) -> None:
    """``ValueError`` naming ``model`` unless it is an ``nn.Module`` (the functions that walk
    a whole model)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def memoize(model: nn.Module, enabled: bool = True) -> int:
    """Turn the once-per-forward memo of every dtriv parametrization of ``model`` on or off.

    dtriv's :class:`~dtriv.parametrize.Trivialization` and the ``orthogonal`` twin memoize
    their value by default (:class:`ForwardMemo`); ``memoize(model, False)`` restores the
    recompute-at-every-read behaviour of torch's parametrizations (each read builds its own
    graph of the map). Sets the ``memoize`` attribute of each such parametrization (which may
    also be set one by one) and clears its memo. Returns how many were set.
    """
    check_model(model)
    check_flag(enabled, "enabled")
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "_memo", None), ForwardMemo):
            module.memoize = enabled
            module._memo.clear()
            count += 1
    return count


class Memoized(nn.Module):
    """Base of the parametrizations that keep their last value in a :class:`ForwardMemo`
    (``self._memo``; a subclass sets ``memoize`` and defines ``_evaluate(X)``, the value
    without the memo, and its ``forward`` returns :meth:`_value`): the memo is dropped
    before anything replaces the tensors it holds.

    ``Module.to`` / ``.double()`` (:meth:`_apply`) and ``load_state_dict``
    (:meth:`_load_from_state_dict`) under
    ``torch.__future__.set_swap_module_params_on_conversion(True)`` swap the original with
    ``torch.utils.swap_tensors``, which refuses a tensor that a memoized value's graph saves.
    A ``ParametrizationList`` converts its children before its own parameters, so
    ``_apply`` here runs first; it loads its parameters before its children, so loading
    also needs :func:`clear_memos_on_load` on the list."""

    def _value(self, X: Tensor, base: Tensor | None) -> Tensor:
        """``self._evaluate(X)`` through the memo (keyed also on ``base``) when
        ``self.memoize`` and not under ``torch.compile``."""
        if self.memoize and not torch.compiler.is_compiling():
            memo = self.__dict__.get("_memo")
            if memo is None:  # unpickled from a version without the memo
                memo = self._memo = ForwardMemo()
            return memo(X, base, self._evaluate)
        return self._evaluate(X)

    def _forget(self) -> None:
        """Drop the memoized value (the tensors it depends on are about to change)."""
        memo = self.__dict__.get("_memo")
        if memo is not None:
            memo.clear()

    def _apply(self, fn, recurse: bool = True):
        self._forget()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._forget()
        super()._load_from_state_dict(*args, **kwargs)


def clear_memos(plist: nn.Module, *_args: Any) -> None:
    """Clear the :class:`ForwardMemo` of every parametrization in ``plist`` (a
    ``ParametrizationList``); its signature is that of a ``load_state_dict`` pre-hook
    registered ``with_module=True`` (:func:`clear_memos_on_load`)."""
    for parametrization in plist:
        if isinstance(parametrization, Memoized):
            parametrization._forget()


def clear_memos_on_load(module: nn.Module, name: str) -> None:
    """Clear the memos of ``module.<name>``'s parametrizations before ``load_state_dict``
    writes its original.

    Under ``torch.__future__.set_swap_module_params_on_conversion(True)`` the original is
    swapped with the loaded tensor by ``torch.utils.swap_tensors``, which refuses a tensor
    that anything else references, and a memoized value's graph may save the original
    itself (the nodes of the maps that read ``X`` in their backward). The list loads its own
    parameters before its children, so the hook goes on the list (a module-level function:
    copies and pickles of the module keep it working). ``Module.to`` / ``.double()`` are
    handled by the parametrizations' ``_apply``, which runs before the list's."""
    plist = module.parametrizations[name]
    if clear_memos not in [getattr(h, "hook", h) for h in
                           plist._load_state_dict_pre_hooks.values()]:
        plist._register_load_state_dict_pre_hook(clear_memos, with_module=True)


# ---------------------------------------------------------------------------- fast reads
def _hooks_anywhere(plist: nn.Module, first: nn.Module) -> bool:
    """Whether a module hook (global, on the list or on the parametrization) would see a call:
    forward hooks, and backward hooks (``register_full_backward_hook`` and its pre-hook, which
    ``Module.__call__`` attaches to the call's outputs)."""
    return bool(
        _torch_module._global_forward_pre_hooks
        or _torch_module._global_forward_hooks
        or _torch_module._global_backward_pre_hooks
        or _torch_module._global_backward_hooks
        or plist._forward_pre_hooks
        or plist._forward_hooks
        or plist._backward_pre_hooks
        or plist._backward_hooks
        or first._forward_pre_hooks
        or first._forward_hooks
        or first._backward_pre_hooks
        or first._backward_hooks
    )


def install_fast_read(module: nn.Module, name: str) -> bool:
    """Serve reads of ``module.<name>`` from its parametrization's memo, or by a direct call.

    Reading a parametrized tensor goes through torch's property, the ``ParametrizationList``
    call (whose ``forward`` looks for a second parametrization with ``hasattr``, an
    ``AttributeError`` when there is none) and the parametrization's call (about 15
    microseconds) before the parametrization computes or its memo answers; an RNN reads its
    kernel at every step. This wraps the property that
    :func:`~torch.nn.utils.parametrize.register_parametrization` injected into the module's
    own class (torch creates one class per parametrized module) with a getter that, when the
    tensor has exactly one parametrization, torch's ``cached()`` is off, no module hook would
    observe the call and nothing is traced or compiled, returns

    * for a :class:`Memoized` parametrization that memoizes (a true ``memoize``) and has a
      base, the value of its memo, ``memo.read(X, base, _evaluate)``: what its
      ``forward`` returns, with the memo's checks (the memoized value while valid, else the map
      computed and memoized) and without the calls around them;
    * else ``parametrization.forward(*originals)``: what torch's getter computes
      (``ParametrizationList.forward`` with one parametrization is
      ``self[0](original)``, or ``self[0](original0, original1, ...)`` for a
      parametrization whose ``right_inverse`` returns several tensors), without the calls
      around it.

    In every other case it calls torch's getter, so values, hooks and torch's cache behave
    exactly as without it. The setter is torch's. ``remove_parametrizations`` deletes the
    wrapped property with torch's. Returns whether it was installed. Cost of a read that
    hits the memo: about 3 microseconds.
    """
    cls = type(module)
    prop = cls.__dict__.get(name)
    if not isinstance(prop, property) or prop.fget is None:
        return False
    if getattr(prop.fget, "_dtriv_fast_read", False):
        return True
    torch_get = prop.fget

    def get_parametrized(self: nn.Module) -> Tensor:
        plist = self._modules["parametrizations"]._modules[name]
        mods = plist._modules
        if (
            len(mods) == 1
            and not torch_parametrize._cache_enabled
            and not torch.compiler.is_compiling()
            and torch._C._get_tracing_state() is None
        ):
            first = mods.get("0")
            if first is not None and not _hooks_anywhere(plist, first):
                params = plist._parameters
                if plist.is_tensor:
                    X = params.get("original")
                    if X is not None:
                        memo = first.__dict__.get("_memo")
                        if (isinstance(first, Memoized) and isinstance(memo, ForwardMemo)
                                and first.memoize):
                            base = first._buffers.get("base")
                            if base is not None:
                                # what ``forward`` returns (``_value``), without the calls
                                return memo.read(X, base, first._evaluate)
                        return first.forward(X)
                else:
                    originals = [params.get(f"original{i}") for i in range(plist.ntensors)]
                    if all(t is not None for t in originals):
                        return first.forward(*originals)
        return torch_get(self)

    get_parametrized._dtriv_fast_read = True
    setattr(cls, name, property(get_parametrized, prop.fset, prop.fdel, prop.__doc__))
    return True
