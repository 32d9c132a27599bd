"""Machinery shared by the Riemannian optimizers: argument checks, buckets, Euclidean steps.

A Riemannian optimizer here is a subclass of a torch optimizer (``SGD``, ``Adam``) that

* hands the Euclidean parameters of every group (plain tensors) to the torch optimizer's
  own ``step``, so that they get exactly the torch update (same code, same state);
* splits the manifold parameters (:class:`~dtriv.optim.ManifoldParameter`) of a group into
  *buckets* of equal manifold, shape, dtype, device and retraction, stacks each bucket into
  one batch ``(m, *shape)`` and calls the manifold maps once per bucket, not once per
  parameter (the maps are batched over leading dimensions);
* on the fused Stiefel and sphere paths (:func:`fused_path`), keeps a bucket of several
  parameters in persistent stacked buffers (:meth:`RiemannianMixin._stacked`) and tracks
  which points it wrote itself (:meth:`RiemannianMixin._on_manifold`), so that the Stiefel
  retraction may skip its checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from dtriv.manifolds.base import Manifold
from dtriv.retractions._common import outside_compiled_graphs, without_any_autocast
from dtriv.retractions._scratch import Arena

from . import _sphere, _stiefel
from ._hooks import clear_grads, hooked_step
from .parameter import manifold_of

__all__ = ["check_nonnegative", "check_lr", "Bucket", "RiemannianMixin"]


def check_nonnegative(value: Any, name: str) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a finite number ``>= 0``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a non-negative number, got {value!r}") from None
    if not (v >= 0.0 and math.isfinite(v)):
        raise ValueError(f"{name}: expected a non-negative finite number, got {value!r}")


def check_lr(lr: Any) -> None:
    """``ValueError`` unless the learning rate is a non-negative finite number."""
    check_nonnegative(lr, "lr")


def check_unit_interval(value: Any, name: str) -> None:
    """``ValueError`` unless ``0 <= value < 1``."""
    check_nonnegative(value, name)
    if not float(value) < 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")


def stack(tensors: list[Tensor], out: Tensor | None = None) -> Tensor:
    """Stack into a batch ``(m, ...)`` (into ``out`` when given); a single tensor becomes a
    view (no copy) of its detached alias: the updates write into it in place, which on a view
    of a leaf that requires grad ``torch.compile`` refuses."""
    if len(tensors) == 1:
        return tensors[0].detach().unsqueeze(0)
    return torch.stack(tensors, out=out)


def copy_rows(dst: list[Tensor], src: Tensor) -> None:
    """``dst[i].copy_(src[i])`` for all rows, with one fused foreach call."""
    torch._foreach_copy_(dst, list(src.unbind(0)))


def _rows_of(buffer: Tensor, tensors: list[Tensor]) -> bool:
    """Whether ``tensors[i]`` is exactly the memory of ``buffer[i]`` for every ``i``."""
    if len(tensors) != buffer.shape[0]:
        return False
    base, step = buffer.data_ptr(), buffer[0].numel() * buffer.element_size()
    shape, dtype, strides = buffer.shape[1:], buffer.dtype, buffer.stride()[1:]
    for i, t in enumerate(tensors):
        if (
            t.data_ptr() != base + i * step
            or t.dtype != dtype
            or t.shape != shape
            or t.stride() != strides
        ):
            return False
    return True


def own_memory(params: list[Tensor]) -> bool:
    """Whether each of ``params`` is the whole of its own storage: no offset into a larger
    tensor, no storage shared with another of them, none in shared memory
    (``share_memory_()``, as Hogwild training uses). Only such parameters may be re-pointed
    to the rows of a stacked buffer (:meth:`RiemannianMixin._stacked`): re-pointing a view
    of a larger tensor, or one of two parameters tied to the same memory, would silently
    separate it from the memory the rest of the model reads."""
    seen = set()
    for p in params:
        storage = p.untyped_storage()
        if (p.storage_offset() != 0 or storage.nbytes() != p.numel() * p.element_size()
                or p.is_shared() or storage.data_ptr() in seen):
            return False
        seen.add(storage.data_ptr())
    return True


def _stack_keeping_layout(tensors: list[Tensor]) -> Tensor:
    """``torch.stack`` of the (detached) tensors, whose rows keep the tensors' layout when they
    all are column-major matrices (``t.mT`` contiguous: the q-factors of ``torch.linalg.qr``,
    transposed weights): re-pointed to such rows, a parameter keeps its strides, and so do its
    gradients (DistributedDataParallel's gradient buckets are laid out from the parameters'
    strides at construction, and warn at every step when they change)."""
    detached = [t.detach() for t in tensors]
    first = detached[0]
    if (first.dim() >= 2 and not first.is_contiguous() and first.mT.is_contiguous()
            and all(t.stride() == first.stride() for t in detached)):
        return torch.stack([t.mT for t in detached]).mT
    return torch.stack(detached)


def fused_path(manifold: Manifold, X: Tensor):
    """The module of the fused path that updates a bucket of ``manifold`` with points like
    ``X`` (:mod:`dtriv.optim._stiefel`, :mod:`dtriv.optim._sphere`: the same functions, on a
    batch view of the points, in place), or ``None``: the generic path (the manifold's
    maps).

    The answer depends on the manifold's class (whether it redefines a map) and the points'
    dtype only, so it is looked up once per pair (:data:`_FUSED_PATHS`; the tests of the
    class's methods cost 2.5 us of a 57 us step on a sphere vector of 4096)."""
    key = (type(manifold), X.dtype)
    try:
        return _FUSED_PATHS[key]
    except KeyError:
        pass
    path = None
    if _stiefel.fast_stiefel(manifold, X):
        path = _stiefel
    elif _sphere.fast_sphere(manifold, X):
        path = _sphere
    _FUSED_PATHS[key] = path
    return path


#: :func:`fused_path` per (manifold class, dtype)
_FUSED_PATHS: dict[tuple[type, torch.dtype], Any] = {}


class Bucket:
    """Manifold parameters of one group updated together by one batched call.

    Attributes: ``manifold``, ``method`` (the retraction name), ``params`` and, during an
    update, ``arena`` (the :class:`~dtriv.retractions._scratch.Arena` its temporaries come
    from).
    """

    __slots__ = ("manifold", "method", "params", "arena")

    def __init__(self, manifold: Manifold, method: str, params: list[Tensor]) -> None:
        self.manifold = manifold
        self.method = method
        self.params = params
        self.arena: Arena | None = None

    def stacked_grads(self) -> Tensor:
        """The parameters' gradients stacked ``(m, ...)`` (a view for one parameter; else in
        a scratch buffer of the update's arena, reused from step to step)."""
        grads = [p.grad for p in self.params]
        out = None
        if len(grads) > 1 and self.arena is not None:
            out = self.arena.empty((len(grads),) + tuple(grads[0].shape))
        return stack(grads, out)


def _manifold_key(manifold: Manifold) -> tuple:
    """What makes two manifolds one bucket: the same type and equal attributes (exact values:
    ``repr`` rounds, e.g. the bounds of ``SpectrallyBounded``); a manifold with attributes
    that cannot be hashed is a bucket of its own."""
    try:
        key = (type(manifold), tuple(sorted(vars(manifold).items())))
        hash(key)
    except TypeError:
        return (type(manifold), id(manifold))
    return key


def resolve_retraction(spec: Any, manifold: Manifold) -> str:
    """The retraction name a group's ``retraction`` entry selects for ``manifold``.

    ``spec`` is ``None`` (the manifold's :attr:`default_retraction`), a name, or a mapping
    from manifold classes (or their names) to names; a manifold absent from the mapping
    uses its default.
    """
    if spec is None:
        return manifold.default_retraction
    if isinstance(spec, Mapping):
        for cls in type(manifold).__mro__:
            for key in (cls, cls.__name__):
                if key in spec:
                    return resolve_retraction(spec[key], manifold)
        return manifold.default_retraction
    if not isinstance(spec, str):
        raise ValueError(
            "retraction: expected None, a retraction name or a mapping from manifold "
            f"classes to names, got {spec!r}"
        )
    if spec not in manifold.retractions:
        raise ValueError(
            f"retraction: expected one of {', '.join(manifold.retractions)} for {manifold!r}, "
            f"got {spec!r}"
        )
    return spec


def _storable_spec(spec: Any) -> Any:
    """A group's ``retraction`` entry with the class keys of a mapping replaced by their names
    (:func:`resolve_retraction` looks up both), as ``torch.load(weights_only=True)`` reads it."""
    if isinstance(spec, Mapping) and any(isinstance(key, type) for key in spec):
        # a class key wins over its name, as in the lookup: written last
        items = sorted(spec.items(), key=lambda item: isinstance(item[0], type))
        return {key.__name__ if isinstance(key, type) else key: _storable_spec(value)
                for key, value in items}
    return spec


def _unhooked_step(cls: type) -> Callable:
    """``cls.step`` without the profiling/hook layer torch adds to optimizer classes.

    The step hooks of the Riemannian optimizer run once, around its own ``step``; the
    Euclidean part reuses the torch class's step body and must not run them again.
    """
    fn = cls.step
    while getattr(fn, "hooked", False) and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


class RiemannianMixin:
    """Param-group handling shared by :class:`RiemannianSGD` and :class:`RiemannianAdam`.

    Subclasses set ``_torch_optimizer`` (the torch class whose ``step`` updates the
    Euclidean parameters) and implement ``_update_bucket(group, bucket)``.
    """

    _torch_optimizer: type[torch.optim.Optimizer]
    #: state entries that are tangent vectors (projected by :meth:`stabilize`)
    _tangent_state: tuple[str, ...] = ()
    param_groups: list[dict[str, Any]]
    state: Any

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("retraction", None)
        # the constructor's defaults for later groups (pickling keeps ``defaults`` only)
        self.__dict__.setdefault("_default_retraction_spec", self.defaults.get("retraction"))
        self.__dict__.setdefault("_default_stabilize", self.defaults.get("stabilize"))
        for group in self.param_groups:
            group.setdefault("stabilize", None)
            group.setdefault("step", 0)

    def _stacked(self, params: list[Tensor], name: str | None = None) -> Tensor:
        """A persistent batch ``(m, *shape)`` whose rows are the memory of the parameters
        (``name=None``) or of their state entries ``name``, so that a bucket is updated in
        place without stacking and unstacking copies at every step.

        The first call (and any call after a row stopped being that memory: a parameter's
        ``.data`` or a state entry replaced, e.g. by ``load_state_dict``) stacks the current
        values into a new buffer and re-points the parameters' ``.data`` (or the state
        entries) to its rows; the values are unchanged. Later calls check the rows' memory
        (addresses, shapes) and return the same buffer. A new buffer replaces every cached
        stack that shared one of its tensors, so the cache keeps at most one stack per tensor
        (and per ``name``).
        """
        tensors = [p if name is None else self.state[p][name] for p in params]
        cache = self.__dict__.setdefault("_stacks", {})
        key = (name, tuple(id(p) for p in params))
        buffer = cache.get(key)
        if buffer is not None and _rows_of(buffer, tensors):
            return buffer
        buffer = _stack_keeping_layout(tensors)
        # re-pointing a parameter keeps its value: the points this optimizer wrote stay marked
        written = [p for p in params if self._on_manifold([p])] if name is None else []
        for p, row in zip(params, buffer.unbind(0)):
            if name is None:
                p.data = row
            else:
                self.state[p][name] = row
        self._mark_on_manifold(written)
        cache[key] = buffer
        # the stacks these rows left are stale for them: drop their entries, so that the cache
        # holds at most one entry per tensor (buckets that change from step to step, as the
        # parameters that get a gradient do under conditional computation, would otherwise
        # add an entry, and keep its buffer, at every new combination)
        ids = set(key[1])
        for other in [k for k in cache if k[0] == name and k != key and not ids.isdisjoint(k[1])]:
            del cache[other]
        return buffer

    def _stackable(self, params: list[Tensor]) -> bool:
        """Whether the bucket ``params`` (several parameters) lives in persistent stacked
        buffers (:meth:`_stacked`): its parameters are the rows of their buffer already, or
        each owns its memory (:func:`own_memory`)."""
        buffer = self.__dict__.get("_stacks", {}).get((None, tuple(id(p) for p in params)))
        return (buffer is not None and _rows_of(buffer, params)) or own_memory(params)

    def _on_manifold(self, params: list[Tensor]) -> bool:
        """Whether every parameter still holds the point this optimizer wrote last (same
        tensor, memory and version counter): then it lies on its manifold to rounding and
        the fused retractions may skip their conditioning checks. A write through
        ``p.data`` bumps no version counter, so the fused QR also tests the points
        themselves (:func:`dtriv.optim._stiefel.near_orthonormal`)."""
        marks = self.__dict__.get("_written")
        if not marks:
            return False
        for p in params:
            mark = marks.get(id(p))
            if mark is None or mark[0] is not p or mark[1:] != (p.data_ptr(), p._version):
                return False
        return True

    def _mark_on_manifold(self, params: list[Tensor]) -> None:
        """Record that ``params`` were just written by a retraction (see :meth:`_on_manifold`).

        The mark holds the parameter itself (as ``param_groups`` do), not a weak reference:
        ``torch.utils.swap_tensors``, which converts parameters under
        ``torch.__future__.set_swap_module_params_on_conversion(True)``, refuses a tensor
        with one (a swap changes the memory, so the mark no longer matches)."""
        marks = self.__dict__.setdefault("_written", {})
        for p in params:
            marks[id(p)] = (p, p.data_ptr(), p._version)

    def state_dict(self) -> dict[str, Any]:
        """Torch's state dict, plus ``"on_manifold"``: the indices (torch's numbering of the
        parameters, group after group) of the parameters that still hold the point this
        optimizer wrote (see :meth:`_on_manifold`), so that a run resumed from it takes the
        same (fused) steps as one never interrupted, bit for bit. A top-level entry: the
        per-parameter states stay torch's, whatever the state-dict hooks do with them. A
        group's ``retraction`` mapping is stored with class names for its class keys (which
        select the same retractions), so that ``torch.load`` reads it with its default
        ``weights_only=True``, which refuses classes."""
        packed = super().state_dict()  # type: ignore[misc]
        packed["on_manifold"] = [i for i, p in enumerate(self._params()) if self._on_manifold([p])]
        for group in packed["param_groups"]:  # (torch's packed groups are copies)
            group["retraction"] = _storable_spec(group.get("retraction"))
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Torch's ``load_state_dict``; the parameters listed ``"on_manifold"`` are marked as
        written by this optimizer at their current value. Load the model's parameters first:
        a parameter written after this call is not trusted (its version changes), and the
        fused QR tests the points themselves in any case
        (:func:`dtriv.optim._stiefel.near_orthonormal`)."""
        flagged = state_dict.get("on_manifold", ())
        params = self._params()
        for index, entries in state_dict.get("state", {}).items():
            if isinstance(index, int) and 0 <= index < len(params) and isinstance(entries, dict):
                manifold = manifold_of(params[index])
                if manifold is not None:
                    self._check_loaded_state(params[index], manifold, entries, index)
        super().load_state_dict(state_dict)  # type: ignore[misc]  (the same parameters)
        self._mark_on_manifold([params[i] for i in flagged if 0 <= i < len(params)])

    def _check_loaded_state(self, p: Tensor, manifold: Manifold, entries: dict[str, Any],
                            index: int) -> None:
        """``ValueError`` naming a state entry of the manifold parameter ``p`` (number
        ``index``) in a state dict about to be loaded that this optimizer cannot use (the
        subclasses' checks: a state saved by another optimizer, say), before anything is
        loaded."""

    def _params(self) -> list[Tensor]:
        """The parameters in torch's state-dict numbering (group after group)."""
        return [p for group in self.param_groups for p in group["params"]]

    step = hooked_step("_riemannian_step", """``step(closure=None)``: one step on every
        parameter; ``closure`` re-evaluates the loss (optional).

        The step hooks (:meth:`~torch.optim.Optimizer.register_step_pre_hook` and
        ``..._post_hook``, per optimizer and global) and the profiler's
        ``Optimizer.step#<class>.step`` range are those of torch's optimizers, run here
        instead of by the wrapper torch puts around an optimizer class's ``step`` (see
        :mod:`dtriv.optim._hooks`).""")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; the default case without its profiler range while no
        profiler records (:func:`~dtriv.optim._hooks.clear_grads`)."""
        if not clear_grads(self, set_to_none):  # type: ignore[arg-type]
            super().zero_grad(set_to_none)  # type: ignore[misc]

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        """``ValueError`` naming a hyperparameter of ``group`` (its values over the defaults)
        that is out of range (the subclasses' checks)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Torch's ``add_param_group``, after the checks of the group's hyperparameters (the
        values it sets, over the defaults: the constructor's checks, which torch does not make
        for a group's own values), its ``retraction`` and ``stabilize``; real manifold
        parameters only."""
        if isinstance(param_group, dict):
            self._check_hyperparameters({**self.defaults, **param_group})
        param_group.setdefault("retraction", self._default_retraction_spec)
        param_group.setdefault("stabilize", self._default_stabilize)
        param_group.setdefault("step", 0)
        stabilize = param_group["stabilize"]
        if stabilize is not None and (
            isinstance(stabilize, bool) or not isinstance(stabilize, int) or stabilize < 1
        ):
            raise ValueError(
                f"stabilize: expected None or a positive integer, got {stabilize!r}"
            )
        super().add_param_group(param_group)  # type: ignore[misc]
        group = self.param_groups[-1]
        for p in group["params"]:
            manifold = manifold_of(p)
            if manifold is not None:
                resolve_retraction(group["retraction"], manifold)  # validates
                if p.is_complex():
                    raise ValueError(
                        "params: expected real manifold parameters, got a complex one "
                        f"of shape {tuple(p.shape)}"
                    )

    # ---------------------------------------------------------------- splitting
    @staticmethod
    def _euclidean(group: dict[str, Any]) -> list[Tensor]:
        return [p for p in group["params"] if manifold_of(p) is None]

    def _buckets(self, group: dict[str, Any]) -> Iterator[Bucket]:
        found = []
        for p in group["params"]:
            if p.grad is None:
                continue
            manifold = manifold_of(p)
            if manifold is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"(parameter of shape {tuple(p.shape)} on {manifold!r})"
                )
            found.append((p, manifold, resolve_retraction(group["retraction"], manifold)))
        if len(found) == 1:  # one bucket: no key to compute (a third of this call)
            p, manifold, method = found[0]
            return iter((Bucket(manifold, method, [p]),))
        buckets: dict[tuple, Bucket] = {}
        for p, manifold, method in found:
            key = (_manifold_key(manifold), method, tuple(p.shape), p.dtype, p.device)
            if key not in buckets:
                buckets[key] = Bucket(manifold, method, [])
            buckets[key].params.append(p)
        return iter(buckets.values())

    def _euclidean_step(self) -> None:
        """Run the torch optimizer's step on the Euclidean parameters of every group."""
        groups = self.param_groups
        filtered = []
        for group in groups:
            params = self._euclidean(group)
            if params:
                filtered.append({**group, "params": params})
        if not filtered:
            return
        step = _unhooked_step(self._torch_optimizer)
        self.param_groups = filtered
        try:
            step(self)
        finally:
            self.param_groups = groups

    def _riemannian_step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._euclidean_step()
        self._manifold_step()
        return loss

    # Under torch.compile the manifold updates run as eager code: they read values on the
    # host (which QR a bucket takes, the step counts of the stacked buffers), so traced they
    # broke the graph at each read and recompiled as those values changed; the Euclidean
    # parameters' torch step is still traced.
    @outside_compiled_graphs
    @without_any_autocast
    @torch.no_grad()
    def _manifold_step(self) -> None:
        """The update of every manifold parameter (bucket by bucket), and stabilization."""
        for group in self.param_groups:
            for bucket in self._buckets(group):
                # the update's temporaries (stacked gradients, ...) come from an arena
                with Arena(bucket.params[0].detach()) as bucket.arena:
                    self._update_bucket(group, bucket)
                bucket.arena = None
            group["step"] = group.get("step", 0) + 1
            if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                self._stabilize_group(group)

    @without_any_autocast
    @torch.no_grad()
    def stabilize(self) -> None:
        """Project every manifold parameter onto its manifold and its momenta onto the
        tangent space there (float drift of long runs with non-projecting retractions)."""
        for group in self.param_groups:
            self._stabilize_group(group)

    def _stabilize_group(self, group: dict[str, Any]) -> None:
        buckets: dict[tuple, list[Tensor]] = {}
        manifolds: dict[tuple, Manifold] = {}
        for p in group["params"]:
            manifold = manifold_of(p)
            if manifold is None:
                continue
            key = (_manifold_key(manifold), tuple(p.shape), p.dtype, p.device)
            buckets.setdefault(key, []).append(p)
            manifolds[key] = manifold
        for key, params in buckets.items():
            manifold = manifolds[key]
            X = manifold.project(stack(params))
            copy_rows(params, X)
            for name in self._tangent_state:
                rows = [i for i, p in enumerate(params) if self.state[p].get(name) is not None]
                if not rows:
                    continue
                vectors = [self.state[params[i]][name] for i in rows]
                copy_rows(vectors, manifold.proj_tangent(X[rows], stack(vectors)))

    def _update_bucket(self, group: dict[str, Any], bucket: Bucket) -> None:
        raise NotImplementedError
