"""Shared helpers of the retraction maps: argument checks, precision handling, skew parts.

Every map in :mod:`dtriv.retractions` is a pure function on tensors batched over the
leading dimensions. Half precision (``float16``, ``bfloat16``, ``complex32``) is computed in
single precision and cast back, since the factorizations these maps rely on (solve, QR, SVD,
eigh) are neither implemented nor accurate in half precision.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _lu

_HALF = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
if hasattr(torch, "complex32"):
    _HALF[torch.complex32] = torch.complex64

F = TypeVar("F", bound=Callable[..., Tensor])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a map computes in for inputs of ``dtype`` (half precision -> single)."""
    return _HALF.get(dtype, dtype)


def autocast_off(device_type: str):
    """A context in which autocast is off on ``device_type`` (``"cpu"``, ``"cuda"``, ...)."""
    return torch.autocast(device_type=device_type, enabled=False)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (one fast check when it is off everywhere;
    autocast on another device's type leaves this one's tensors alone)."""
    if not torch._C._is_any_autocast_enabled():
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta, ...)
        return False


def without_autocast(fn: F) -> F:
    """Decorate a map so that it runs with autocast off on the device of its first tensor
    argument: inside ``torch.autocast`` its products would run in half precision and meet its
    float32 tensors (the maps' accuracy needs the precision of their inputs throughout)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch._C._is_any_autocast_enabled():  # the common case: one call, no search
            return fn(*args, **kwargs)
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is not None and autocast_on(first.device.type):
            with autocast_off(first.device.type):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


#: the device types whose autocast :func:`autocast_disabled` turns off
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")


def autocast_disabled() -> contextlib.ExitStack:
    """A context in which autocast is off on every device type where it is on (nothing to do,
    one call, when it is off everywhere)."""
    stack = contextlib.ExitStack()
    if torch._C._is_any_autocast_enabled():
        for device_type in AUTOCAST_DEVICE_TYPES:
            if autocast_on(device_type):
                stack.enter_context(autocast_off(device_type))
    return stack


def without_any_autocast(fn: F) -> F:
    """Decorate a function that updates or refreshes points (an optimizer's update, a base
    refresh) so that it runs with autocast off on every device type: called inside
    ``torch.autocast``, its products would run in half precision and write rounded points
    into the float32 tensors (a refresh moved the weight by 3e-3 and an orthonormal point by
    1e-2 in bfloat16), or meet its float32 tensors in an in-place operation."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch._C._is_any_autocast_enabled():
            return fn(*args, **kwargs)
        with autocast_disabled():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def backward_without_autocast(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator: the ``backward`` and ``jvp`` of an ``autograd.Function`` run with autocast
    off. The maps compute their forward with autocast off (:func:`without_autocast`), but a
    backward called inside ``torch.autocast`` (not recommended by torch, yet what a loop that
    calls ``loss.backward()`` in the ``with`` block does) ran under it: its products in half
    precision met the saved float32 factors (``lu_solve``: "Expected LU and B to have the same
    dtype") or reached kernels without a half-precision version (``triangular_solve`` in
    bfloat16). Torch's own derivative formulas still follow autocast there, as for torch's
    parametrizations."""
    for name in ("backward", "jvp"):
        method = cls.__dict__.get(name)
        if method is None:
            continue
        fn = method.__func__ if isinstance(method, staticmethod) else method

        @functools.wraps(fn)
        def wrapper(ctx, *args, _fn=fn):
            if not torch._C._is_any_autocast_enabled():
                return _fn(ctx, *args)
            with autocast_disabled():
                return _fn(ctx, *args)

        setattr(cls, name, staticmethod(wrapper))
    return cls


def outside_compiled_graphs(fn: F) -> F:
    """Decorate a function (or method) so that ``torch.compile`` runs it as eager code
    instead of tracing it: under dynamo the call is one graph break, and the function runs
    as without compilation (no graph breaks inside it, no recompilation as the values it
    reads on the host change). ``torch.export`` still traces it (its maps then take their
    data-independent paths, :func:`tracing`). Outside ``torch.compile`` it is a direct call
    (about 0.2 microseconds more; ``torch.compiler.disable`` alone costs 0.6 at every call).
    """
    eager = torch.compiler.disable(fn, recursive=True)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            return eager(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def upcast_half(fn: F) -> F:
    """Decorate a map so that half-precision tensor arguments are computed in float32, and
    with autocast off (:func:`without_autocast`).

    Tensor positional and keyword arguments in half precision are cast up; tensor results
    (a tensor or a tuple of tensors) are cast back to the dtype of the first tensor argument.
    """

    def upcast(*args, **kwargs):
        # the first argument is the tensor in every map: no search over the arguments then
        first = args[0] if args and isinstance(args[0], Tensor) else next(
            (a for a in args if isinstance(a, Tensor)), None)
        if first is None or first.dtype not in _HALF:
            return fn(*args, **kwargs)
        out_dtype = first.dtype

        def up(a):
            return a.to(_HALF[a.dtype]) if isinstance(a, Tensor) and a.dtype in _HALF else a

        result = fn(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        if isinstance(result, Tensor):
            return result.to(out_dtype)
        if isinstance(result, tuple):
            return type(result)(r.to(out_dtype) if isinstance(r, Tensor) else r for r in result)
        return result

    upcast_without_autocast = without_autocast(upcast)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # autocast tested here rather than by stacking :func:`without_autocast`, and a map of
        # a tensor not in half precision called directly: one Python call for most maps
        if torch._C._is_any_autocast_enabled():
            return upcast_without_autocast(*args, **kwargs)
        if args and isinstance(args[0], Tensor) and args[0].dtype not in _HALF:
            return fn(*args, **kwargs)
        return upcast(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_matrix(X: Tensor, name: str, *, square: bool = False, tall: bool = False) -> None:
    """Raise ``ValueError`` unless ``X`` is a (batched) matrix of the required form."""
    if not isinstance(X, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(X).__name__}")
    if X.ndim < 2:
        raise ValueError(
            f"{name}: expected a matrix or a batch of matrices (ndim >= 2), "
            f"got a tensor of shape {tuple(X.shape)}"
        )
    n, k = X.shape[-2], X.shape[-1]
    if square and n != k:
        raise ValueError(
            f"{name}: expected square matrices (..., n, n), got shape {tuple(X.shape)}"
        )
    if tall and n < k:
        raise ValueError(
            f"{name}: expected tall matrices (..., n, k) with n >= k, got shape {tuple(X.shape)}"
        )


def check_floating(X: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``X`` has a floating point or complex dtype."""
    if not (X.is_floating_point() or X.is_complex()):
        raise ValueError(
            f"{name}: expected a floating point or complex tensor, got dtype {X.dtype}"
        )


def check_flag(value: object, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False`` (not merely truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def check_same_shape(A: Tensor, B: Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``A`` and ``B`` have the same shape."""
    if A.shape != B.shape:
        raise ValueError(
            f"{name_b}: expected the shape of {name_a}, {tuple(A.shape)}, got {tuple(B.shape)}"
        )


def skew(A: Tensor) -> Tensor:
    r"""Skew-Hermitian part :math:`(A - A^H)/2`."""
    return (A - A.mH) / 2


def sym(A: Tensor) -> Tensor:
    r"""Hermitian part :math:`(A + A^H)/2`."""
    return (A + A.mH) / 2


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a real or complex dtype."""
    if dtype.is_complex:
        dtype = torch.empty((), dtype=dtype).real.dtype
    return torch.finfo(dtype).eps


#: whether a ``torch.func`` transform (grad, vmap, jvp, ...) is active around the call
transforms_active = torch._C._are_functorch_transforms_active
#: whether a tensor is a ``torch.func`` wrapper (a batched or gradient-tracking level around
#: the tensor that holds the values: it has no storage of its own)
is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
#: the tensor a ``torch.func`` wrapper of a finished transform holds (``Function.apply`` hands
#: that to ``forward``), else the tensor itself
unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _count_transforms(kind: torch._C._functorch.TransformType) -> int:
    """How many ``torch.func`` transforms of ``kind`` are active around the call."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return sum(i.key() == kind for i in retrieve_all_functorch_interpreters())


def nested_forward_ad() -> bool:
    """Whether two or more ``torch.func`` forward-mode transforms are active around the call
    (``jacfwd(jacfwd(f))``, ``jvp`` of a ``jvp``). In torch 2.13 the forward-mode derivative
    of a custom ``autograd.Function`` under another forward-mode transform is taken as zero
    (its ``jvp`` is not differentiated at the outer level), so the maps take their reference
    compositions of differentiable torch ops there. Outside transforms: one flag read."""
    if not transforms_active():
        return False
    return _count_transforms(torch._C._functorch.TransformType.Jvp) >= 2


def derivative_transform_around() -> bool:
    """Whether a ``torch.func`` transform around the call may differentiate a forward-mode
    derivative taken inside it: a reverse-mode one (``grad``, ``vjp``, ``jacrev``) or a
    second forward-mode one (:func:`nested_forward_ad`). Outside transforms: one flag read."""
    if not transforms_active():
        return False
    return (_count_transforms(torch._C._functorch.TransformType.Grad) > 0
            or nested_forward_ad())


def jvp_transform_active() -> bool:
    """Whether a ``torch.func`` forward-mode transform (``jvp``, ``jacfwd``, ``hessian``'s
    outer one) is active around the call. Outside transforms: one flag read."""
    if not transforms_active():
        return False
    return _count_transforms(torch._C._functorch.TransformType.Jvp) > 0


def vmap_active() -> bool:
    """Whether a ``torch.func.vmap`` is active around the call (also inside ``jacfwd`` and
    ``hessian``, which vmap over their basis), where no value can be read on the host
    (``bool(t)``, ``.item()``: data-dependent control flow). Under ``grad``, ``vjp``,
    ``jacrev``'s forward and ``jvp`` alone a value can be read, so the maps' value checks
    (a point antipodal to the base, an eigenvalue at -1) still raise there. Outside
    transforms: one flag read."""
    if not transforms_active():
        return False
    return _count_transforms(torch._C._functorch.TransformType.Vmap) > 0


def values_checkable(t: Tensor) -> bool:
    """Whether a map's checks of its values (a singular factor, a point antipodal to the
    base, an eigenvalue at -1) can read ``t`` on the host: ``t`` has values (not a meta
    tensor, :func:`is_meta`) and no ``vmap`` is around the call (:func:`vmap_active`). Where
    they cannot, the checks are skipped, as each map's docstring says."""
    return not t.is_meta and not vmap_active()


def forward_ad_active() -> bool:
    """Whether a forward-mode derivative can be asked of the call: a ``torch.func`` transform
    is active (``jvp``, ``jacfwd``, ...) or a ``torch.autograd.forward_ad.dual_level`` is
    open. Nodes whose forward costs microseconds save tensors for their ``jvp``
    (``ctx.save_for_forward``, about a microsecond per tensor) only then."""
    return transforms_active() or _forward_ad._current_level >= 0


def jvp_differentiated(X: Tensor) -> bool:
    """Whether the ``jvp`` of an ``autograd.Function`` that reads its saved input ``X`` may
    itself be differentiated in reverse mode (``jacrev(jacfwd(f))``, or a dual tensor whose
    tangent requires grad), so that it must compute from ``X`` with differentiable operations
    rather than from saved constants. Under ``torch.func`` transforms the saved ``X`` hides
    its grad level (``requires_grad`` reads False): taken as yes there."""
    return torch.is_grad_enabled() and (X.requires_grad or transforms_active())


def solve(A: Tensor, B: Tensor, *, left: bool = True) -> Tensor:
    r""":math:`A^{-1} B` (``left=False``: :math:`B A^{-1}`): ``torch.linalg.solve``, except
    under ``torch.func`` transforms, where it is a product with ``torch.linalg.inv(A)``.

    In torch 2.13 the forward-mode derivative of ``torch.linalg.solve`` is wrong under
    ``vmap`` of ``jacfwd`` (first derivatives off by orders of magnitude) and treats the LU
    factors as constants, so ``jacrev(jacfwd(...))`` and ``jacfwd(jacfwd(...))`` miss terms;
    ``inv``'s derivatives (:math:`-A^{-1}\,dA\,A^{-1}`) are right in every composition.
    So does a dual tensor's forward mode (``torch.autograd.forward_ad``) when its tangent is
    differentiated by ``backward``: there too it is a product with the inverse. Eager code
    (two flag reads more) keeps the solve."""
    if not forward_ad_active():
        return _lu.solve(A, B, left=left)
    return _lu.inv(A) @ B if left else B @ _lu.inv(A)


#: the largest ``n`` of the ``n x n`` constants that :func:`cached_outside_transforms` keeps
#: (a 512 x 512 float64 identity is 2 MiB; beyond, allocating one is a small part of the
#: O(n^3) work that needs it, and keeping 32 of them would hold gigabytes at n = 8192)
CACHED_CONSTANT_MAX_N = 512


def cached_outside_transforms(maxsize: int, sized: bool = True) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)`` for functions that build read-only constant tensors
    (from a size, their first argument when ``sized``, a dtype and a device), bypassed under
    ``torch.func`` transforms (a tensor made inside one may be tied to its level: kept, it
    broke a later transform with torch's "level <= current_level" assertion) and for sizes
    above :data:`CACHED_CONSTANT_MAX_N`."""

    def decorate(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def wrapper(n, *args):
            if (sized and n > CACHED_CONSTANT_MAX_N) or transforms_active():
                return fn(n, *args)
            return cached(n, *args)

        wrapper.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        wrapper.cache_info = cached.cache_info  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


@cached_outside_transforms(maxsize=32)
def cached_eye(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``n x n`` identity, one tensor per size, dtype and device (read-only: never write
    to it; for the hot paths that would otherwise allocate it at every call)."""
    return torch.eye(n, dtype=dtype, device=device)


def tracing() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.export`` is recording the call: a value read on
    the host (a norm that picks a degree or an iteration count) would be frozen into the
    trace, or stop the export, so the maps take their data-independent reference paths."""
    return torch._C._get_tracing_state() is not None or torch.compiler.is_exporting()


def is_meta(t: Tensor) -> bool:
    """Whether ``t`` is on the ``meta`` device: it has a shape, a dtype and strides but no
    values, and reading one on the host (``.item()``, ``bool(t)``, ``float(t)``) raises.

    A model built on ``torch.device("meta")`` (shape inference, FLOP counting, deferred
    initialisation: ``to_empty`` then ``load_state_dict``) runs the maps on such tensors. The
    checks of a value (membership of a manifold, a singular factorization, non-finite
    entries) are then skipped, not raised: there is nothing to check. One attribute read
    (``Tensor.is_meta``: about 60 ns, against 430 ns for ``t.device.type == "meta"``)."""
    return t.is_meta


def no_host_reads(t: Tensor) -> bool:
    """Whether a map must take its data-independent reference path for ``t``: ``t`` is a meta
    tensor (:func:`is_meta`: no values to read) or ``torch.jit.trace``/``torch.export`` is
    recording the call (:func:`tracing`: a value read would be frozen into the trace). The
    device is read first: the eager case costs about 60 ns more than :func:`tracing` alone."""
    return t.is_meta or tracing()


def one_point_on_cpu(X: Tensor) -> bool:
    """Whether the batch ``X`` (points stacked along the first dimension) holds one point on
    the CPU: the numbers of a step on it (norms, dot products, step sizes) are cheaper read
    and combined on the host (no device synchronisation) than as tensor ops on single
    numbers."""
    return X.shape[0] == 1 and X.device.type == "cpu"


def tril_copy(X: Tensor, diagonal: int = 0) -> Tensor:
    """``torch.tril(X, diagonal)`` as a copy then the in-place ``tril_``, which only clears the
    upper part: torch's out-of-place ``tril`` is slower from 128 x 128 on (measured, float32:
    128 x 128 9.4 against 6.0 us, 512 x 512 116 against 22 us, (4096, 64) 154 against 21 us,
    (20, 256, 256) 381 against 109 us). For code that autograd does not record (an
    ``autograd.Function``'s forward, a backward without ``create_graph``): recorded, it would
    be two nodes. Under ``torch.func`` transforms (``tril_`` has no batching rule) and off CPU
    (measured there only), torch's ``tril``."""
    if transforms_active() or X.device.type != "cpu":
        return torch.tril(X, diagonal)
    return torch.empty_like(X, memory_format=torch.contiguous_format).copy_(X).tril_(diagonal)


def geqrf(A: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.geqrf(A)``, also for meta tensors, for which torch has no kernel: then
    uninitialised meta tensors of LAPACK's shapes and layout (``a`` of the shape of ``A``,
    column-major; ``tau`` of shape ``(..., min(m, n))``)."""
    if A.is_meta:
        a = torch.empty_like(A.mT, memory_format=torch.contiguous_format).mT
        return a, A.new_empty(*A.shape[:-2], min(A.shape[-2], A.shape[-1]))
    return torch.geqrf(A)


def eager_context() -> bool:
    """Whether the call runs in plain eager code: no ``torch.func`` transform, ``torch.jit``
    tracing or ``torch.compile`` around it (where ``out=`` buffers, host reads and layout
    tricks are allowed)."""
    return not (transforms_active() or tracing() or torch.compiler.is_compiling())


def reports_backward(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator: the nodes of this ``autograd.Function`` record that their backward ran.

    The backward sets ``ctx.backward_ran = True`` before it computes, which
    :func:`backward_ran` reads on the node (``tensor.grad_fn``). The once-per-forward memo of
    the parametrizations (:class:`dtriv.parametrize.ForwardMemo`) must learn when backward has
    consumed the graph of a value; for a value made by such a node it reads this flag instead
    of registering a pre-hook on the node, whose call from the autograd engine into Python
    costs about 16 microseconds per backward on a CPU (3% of a 64 x 64 map's forward and
    backward).
    """
    backward = cls.backward

    def recording_backward(ctx, *grads):
        ctx.backward_ran = True
        return backward(ctx, *grads)

    recording_backward.__doc__ = backward.__doc__
    cls.backward = staticmethod(recording_backward)  # type: ignore[method-assign]
    cls.reports_backward = True  # type: ignore[attr-defined]
    return cls


def reports_backward_of(node: object) -> bool:
    """Whether ``node`` (a ``grad_fn``) belongs to a :func:`reports_backward` Function."""
    return getattr(getattr(node, "_forward_cls", None), "reports_backward", False)


def backward_ran(node: object) -> bool:
    """Whether the backward of a :func:`reports_backward` node has run."""
    return getattr(node, "backward_ran", False)


_RAW_APPLY: dict[type, Callable[..., Any]] = {}


def raw_apply(fn: type[torch.autograd.Function]) -> Callable[..., Any]:
    """The C++ ``apply`` of ``fn`` (what ``Function.apply`` calls once it has bound the
    arguments), looked up once per class."""
    apply = _RAW_APPLY.get(fn)
    if apply is None:
        apply = _RAW_APPLY[fn] = super(torch.autograd.Function, fn).apply  # type: ignore[misc]
    return apply


def apply_function(fn: type[torch.autograd.Function], *args):
    """``fn.apply(*args)``, without its per-call argument binding where that is a no-op.

    ``Function.apply`` unwraps dead functorch wrappers from the tensor arguments, binds the
    arguments to ``forward``'s signature with :func:`inspect.signature` and calls the C++
    ``apply``. With every argument given positionally the binding changes nothing, yet it costs
    tens of microseconds: more than the work of a small map. Outside ``torch.func`` transforms
    and ``torch.compile`` this calls the C++ ``apply`` directly on the unwrapped arguments;
    inside them, ``fn.apply`` itself.
    """
    if transforms_active() or torch.compiler.is_compiling():
        return fn.apply(*args)
    return raw_apply(fn)(*[unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args])
