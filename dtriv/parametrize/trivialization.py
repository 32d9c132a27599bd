r"""The trivialization of a manifold: a parametrization ``X -> retract(base, tangent(base, X))``.

A :class:`Trivialization` is an ``nn.Module`` registered with
:func:`torch.nn.utils.parametrize.register_parametrization` (or, more simply, with
:func:`dtriv.parametrize.constrain`). It maps a free tensor ``X`` (the registered
parameter, ``module.parametrizations[name].original``) onto a manifold ``M``:

.. math::

    \phi_B(X) = R_B(T_B(X)),

where ``B`` is the *base* (a buffer on ``M``), ``T_B = M.tangent(B, .)`` turns the free
tensor into a tangent vector at ``B`` (the left-invariant ``B skew(X)`` for the square
group, the projection ``P_B(X)`` otherwise) and ``R_B`` is one of ``M.retractions``. For
the orthogonal group with ``retraction="expm"`` this is ``B expm(skew(X))``.

*Dynamic trivialization* (Lezcano-Casado 2019): gradient descent runs on ``X`` in the flat
space ``R^{...}``; every few steps :meth:`Trivialization.refresh` moves the base to the
current point, ``B <- phi_B(X)``, and resets ``X <- 0``, so the map is always used near the
origin where it is a good chart. With ``dynamic=False`` the base is the *reference point*
fixed at registration (the module's weight, projected onto ``M``) and never refreshed: a
static trivialization (the dynamic one with ``K = infinity``).

The tensors are updated in place (``copy_``/``zero_`` under ``no_grad``), so optimizers,
DDP replicas and ``state_dict`` keep referring to the same objects.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor

from dtriv.manifolds.base import Manifold
from dtriv.parametrize.cache import ForwardMemo, Memoized
from dtriv.retractions._common import (
    check_flag,
    is_meta,
    outside_compiled_graphs,
    without_any_autocast,
    without_autocast,
)
from dtriv.retractions._common import eps as _eps

__all__ = ["Trivialization"]

_EXTRA_STATE = "_extra_state"


class _Link:
    """A weak reference that a ``deepcopy`` re-targets to the copy of its referent.

    ``copy.deepcopy`` treats ``weakref.ref`` as atomic, so a copied model would point to
    the original one. A link copied together with its referent points to the referent's
    copy; copied alone it is dead (returns ``None``).
    """

    __slots__ = ("_ref",)

    def __init__(self, obj: Any = None) -> None:
        self._ref = None if obj is None else weakref.ref(obj)

    def __call__(self) -> Any:
        return None if self._ref is None else self._ref()

    def __deepcopy__(self, memo: dict) -> _Link:
        obj = self()
        return _Link(memo.get(id(obj)) if obj is not None else None)

    def __reduce__(self):
        return (_Link, ())


def _identity(manifold: Manifold) -> str:
    """A description that two equal manifolds share: the root class and its arguments.

    ``Orthogonal(4)`` and ``Stiefel(4, 4)`` describe the same set, so the class is the
    first one under :class:`Manifold` in the MRO (``Stiefel`` for both), and the arguments
    are the public instance attributes.
    """
    mro = type(manifold).__mro__
    root = next(
        (c for c in reversed(mro[: mro.index(Manifold)]) if Manifold in c.__bases__),
        type(manifold),
    )
    args = ", ".join(
        f"{k}={v!r}" for k, v in sorted(vars(manifold).items()) if not k.startswith("_")
    )
    return f"{root.__name__}({args})"


class Trivialization(Memoized):
    r"""Parametrize a tensor on ``manifold`` by a base point and a free tensor.

    .. math::

        \text{forward}(X) = R_B(T_B(X)) =
        \texttt{manifold.trivialize(base, X, retraction)}
        = \texttt{manifold.retract(base, manifold.tangent(base, X), retraction)}.

    Args:
        manifold: a :class:`dtriv.manifolds.Manifold` (``Stiefel``, ``Orthogonal``,
            ``SpecialOrthogonal``, ``Sphere``, ``SpectrallyBounded``, ...).
        retraction: one of ``manifold.retractions``; default
            ``manifold.default_retraction``.
        dynamic: ``True`` (default) for a dynamic trivialization, whose :meth:`refresh`
            moves the base; ``False`` for a static one: the base is the reference point set
            at registration and never moves, and assignments use the true inverse of the
            retraction at that point.
        strict: when a value off the manifold is assigned (``module.weight = W``),
            ``False`` projects it onto the manifold and ``True`` raises ``ValueError`` with
            the constraint error. The weight found at registration is always projected.
        flatten: how the tensor is read as points of the manifold. ``False``: batched, the
            trailing dimensions are one point (``(..., n, k)`` for ``Stiefel(n, k)``).
            ``True``: the whole tensor is one point, with dimension ``dim`` moved first and
            the rest flattened (a conv kernel ``(out, in, kh, kw)`` is the matrix
            ``out x (in kh kw)``, as in ``spectral_norm``). ``None`` (default): batched when
            the trailing shape is the manifold's, else flattened when the sizes allow it.
        dim: the dimension moved first when flattening (default 0).

    **Registration.** :func:`~torch.nn.utils.parametrize.register_parametrization` calls
    :meth:`right_inverse` on the module's current tensor ``W``: the base becomes ``W``
    (projected onto the manifold when off it) and the parameter becomes zero, so
    the module keeps its weight (never a random sample).

    **Meta tensors.** A module built on ``torch.device("meta")`` registers, evaluates and
    backpropagates (the maps take their data-independent paths) with the shapes and dtypes it
    has on a real device, and the same ``state_dict`` keys; ``to_empty`` and
    ``load_state_dict`` then give it its values. Meta tensors have no values, so assignments
    (registration included) keep them as they are, without the membership check or the
    projection (``strict`` checks nothing on meta), and :meth:`refresh` does not re-project.

    **Buffers and state.** ``base`` has the point shape (the matrix shape when flattened).
    The extra state (``..._extra_state`` in ``state_dict``) records the manifold, the
    retraction and the reading of the tensor; loading a state dict saved with a different
    one is an error naming the key, reported like torch's size mismatches.

    **Once per forward.** The value is memoized (:class:`~dtriv.parametrize.ForwardMemo`):
    reads that follow return the same tensor, with its graph, until the parameter or the base
    changes (an optimizer step, :meth:`refresh`, an assignment, ``load_state_dict``), the grad
    mode changes, or backward consumes the graph. So a weight read at every step of an RNN is
    computed once per forward and backpropagated through once, with the gradients of the
    recompute-per-read forward. ``memoize = False`` (attribute) recomputes at every read.

    Cost: one tangent map and one retraction of the manifold per evaluation (for
    ``Stiefel(n, k)``: O(n k^2) tall, O(n^3) square); a read that hits the memo costs about a
    microsecond.

    The parametrization must be the first of its tensor's list (the one that receives the
    registered parameter), which :func:`dtriv.parametrize.constrain` ensures.
    """

    base: Tensor | None
    #: whether reads reuse the memoized value (see the class doc); ``False``: recompute per read
    memoize: bool = True

    def __init__(
        self,
        manifold: Manifold,
        retraction: str | None = None,
        dynamic: bool = True,
        strict: bool = False,
        *,
        flatten: bool | None = None,
        dim: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(manifold, Manifold):
            raise ValueError(
                f"manifold: expected a dtriv.manifolds.Manifold, got {type(manifold).__name__}"
            )
        if retraction is None:
            retraction = manifold.default_retraction
        if retraction not in manifold.retractions:
            raise ValueError(
                f"retraction: expected one of {', '.join(manifold.retractions)} for "
                f"{manifold!r}, got {retraction!r}"
            )
        if flatten is not None and not isinstance(flatten, bool):  # (1 == True: not `in`)
            raise ValueError(f"flatten: expected None, True or False, got {flatten!r}")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"dim: expected an integer, got {dim!r}")
        self.manifold = manifold
        self.retraction = retraction
        check_flag(dynamic, "dynamic")
        check_flag(strict, "strict")
        self.dynamic = dynamic
        self.strict = strict
        self.flatten = flatten
        self.dim = dim
        #: name used in error messages (``constrain`` sets it to the tensor's name)
        self.tensor_name = "value"
        #: the tensor shape and whether it is flattened; fixed by the first right_inverse
        self._tensor_shape: tuple[int, ...] | None = None
        self._flat = False
        self._owner = _Link()
        self._loading = False
        self._memo = ForwardMemo()
        self.register_buffer("base", None)

    # ------------------------------------------------------------------ description
    def extra_repr(self) -> str:
        s = f"manifold={self.manifold!r}, retraction={self.retraction!r}"
        if not self.dynamic:
            s += ", dynamic=False"
        if self.strict:
            s += ", strict=True"
        if self._flat:
            s += f", flatten=True, dim={self.dim}"
        return s

    @property
    def point_shape(self) -> tuple[int, ...] | None:
        """The shape of ``base``: the tensor's shape, or the manifold's when flattened."""
        return None if self.base is None else tuple(self.base.shape)

    # ------------------------------------------------------------------ tensor <-> point
    def _expected(self) -> str:
        shape = ", ".join(str(s) for s in self.manifold.shape)
        return f"(..., {shape})"

    def _resolve(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of ``shape`` is read flattened; ``ValueError`` if it cannot be."""
        mshape = tuple(self.manifold.shape)
        m = len(mshape)
        batched_ok = len(shape) >= m and tuple(shape[len(shape) - m:]) == mshape
        would_flatten = self.flatten or (self.flatten is None and not batched_ok)
        if would_flatten and len(shape) >= 1 and not -len(shape) <= self.dim < len(shape):
            raise ValueError(
                f"dim: expected an integer in [{-len(shape)}, {len(shape) - 1}] (a dimension of "
                f"{self.tensor_name}, of shape {tuple(shape)}, to put first when flattening it "
                f"for {self.manifold!r}), got {self.dim}"
            )
        flat_ok = len(shape) >= 1 and math.prod(shape) == math.prod(mshape)
        if flat_ok and m >= 2:
            d = self.dim if self.dim >= 0 else self.dim + len(shape)
            flat_ok = 0 <= d < len(shape) and shape[d] == mshape[0]
        if self.flatten is None:
            if batched_ok:
                return False
            if flat_ok:
                return True
        elif self.flatten and flat_ok:
            return True
        elif not self.flatten and batched_ok:
            return False
        how = {
            None: f"{self._expected()} or one that flattens (dim={self.dim} first) to {mshape}",
            True: f"one that flattens (dim={self.dim} first) to {mshape}",
            False: self._expected(),
        }[self.flatten]
        raise ValueError(
            f"{self.tensor_name}: expected a tensor of shape {how} for {self.manifold!r}, "
            f"got shape {tuple(shape)}"
        )

    def _to_point(self, X: Tensor) -> Tensor:
        if not self._flat:
            return X
        return X.movedim(self.dim, 0).reshape(self.manifold.shape)

    def _from_point(self, P: Tensor) -> Tensor:
        if not self._flat:
            return P
        assert self._tensor_shape is not None
        moved = list(self._tensor_shape)
        moved.insert(0, moved.pop(self.dim))
        return P.reshape(moved).movedim(0, self.dim)

    def _square_group(self) -> bool:
        """Whether the manifold is the square group, whose free coordinates are ``skew(X)``."""
        return bool(getattr(self.manifold, "square", False))

    # ------------------------------------------------------------------ the map
    @outside_compiled_graphs
    def forward(self, X: Tensor) -> Tensor:
        r""":math:`R_B(T_B(X))`: the point of the manifold that ``X`` denotes at the base."""
        # the buffer read directly: ``self.base`` goes through Module.__getattr__ (about a
        # microsecond per read on the path of every forward)
        base = self._buffers.get("base")
        if base is None:
            raise RuntimeError(
                "Trivialization has no base point yet: it is set by right_inverse, which "
                "register_parametrization calls when the trivialization is the first "
                "parametrization of a tensor (use dtriv.parametrize.constrain)"
            )
        return self._value(X, base)

    def _evaluate(self, X: Tensor) -> Tensor:
        """The map itself, without the memo; with autocast off (the maps compute in the
        parameter's precision; under ``torch.autocast`` the layer that reads the weight casts
        it, as for any float32 weight). The test of autocast is written here rather than as a
        decorator: a Python call less on the path of every forward (a few microseconds of a
        sphere parametrization's forward and backward on a vector of 4096, about 100)."""
        if torch._C._is_any_autocast_enabled():
            return self._map_without_autocast(X)
        return self._map(X)

    def _map(self, X: Tensor) -> Tensor:
        base = self._buffers["base"]
        if not self._flat:  # the common case: no reshaping around the map
            return self.manifold.trivialize(base, X, self.retraction)
        return self._from_point(self.manifold.trivialize(base, self._to_point(X), self.retraction))

    _map_without_autocast = without_autocast(_map)

    # ------------------------------------------------------------------ assignment
    def _on_manifold(self, W: Tensor, strict: bool) -> Tensor:
        """``W`` (a point-shaped tensor) checked against the manifold, projected if needed.

        A meta tensor has no values: it is taken as it is (neither checked, even with
        ``strict``, nor projected), as a point already on the manifold would be."""
        if is_meta(W):
            return W.clone()
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"{self.tensor_name}: expected finite entries, got NaN or inf")
        ok, reason = self.manifold.check(W, explain=True)
        if ok:
            return W.clone()
        if strict:
            raise ValueError(
                f"{self.tensor_name}: expected a point of {self.manifold!r} (strict=True): "
                f"{reason}; use strict=False to project it onto the manifold"
            )
        return self.manifold.project(W)

    @torch.no_grad()
    def right_inverse(self, W: Tensor) -> Tensor:
        """The free tensor to store when the parametrized tensor is assigned ``W``.

        With a dynamic trivialization (and at registration) the base becomes ``W`` (checked;
        projected when off the manifold unless ``strict``) and the result is zero. With a
        static one, once the reference point is set, the result is the true inverse of the
        map: ``X`` with ``T_B(X) = R_B^{-1}(W)`` (for the square group
        ``X = B^H R_B^{-1}(W)``, e.g. ``logm(B^H W)`` for ``expm``, ``cayley_inverse`` for
        ``cayley``); ``NotImplementedError`` saying why when the retraction has none.
        """
        if not isinstance(W, Tensor):
            raise TypeError(f"{self.tensor_name}: expected a torch.Tensor, got {type(W).__name__}")
        self._forget()
        shape = tuple(W.shape)
        if self._tensor_shape is None:
            flat = self._resolve(shape)
        elif shape != self._tensor_shape:
            raise ValueError(
                f"{self.tensor_name}: expected a tensor of shape {self._tensor_shape} "
                f"for {self.manifold!r}, got shape {shape}"
            )
        else:
            flat = self._flat
        if self.base is not None and W.dtype != self.base.dtype:
            raise ValueError(
                f"{self.tensor_name}: expected dtype {self.base.dtype}, got {W.dtype}"
            )
        if not (W.is_floating_point() or W.is_complex()):
            raise ValueError(
                f"{self.tensor_name}: expected a floating point or complex tensor, "
                f"got dtype {W.dtype}"
            )
        self._tensor_shape, self._flat = shape, flat
        # at registration (no base yet) the module's weight is always projected
        P = self._on_manifold(self._to_point(W).detach(), self.strict and self.base is not None)
        if self.base is None:
            self.base = P
            return torch.zeros_like(W)
        if self.dynamic:
            self.base.copy_(P)
            return torch.zeros_like(W)
        return self._from_point(self._static_inverse(P))

    def _static_inverse(self, P: Tensor) -> Tensor:
        assert self.base is not None
        try:
            V = self.manifold.retract_inverse(self.base, P, self.retraction)
        except NotImplementedError as e:
            raise NotImplementedError(
                f"{self.tensor_name}: a static trivialization (dynamic=False) assigns through "
                f"the inverse of its retraction at the reference point, and {e}; use "
                "dynamic=True (the assigned value becomes the base) or a retraction with an "
                "inverse"
            ) from e
        except ValueError as e:  # the inverse names its own argument: say whose value it is
            raise ValueError(
                f"{self.tensor_name}: the assigned value is not reached by the static "
                f"{self.retraction!r} map at the reference point (the inverse of the map "
                f"reads it relative to that point): {e}"
            ) from e
        if self._square_group():
            return self.base.mH @ V
        return V

    # ------------------------------------------------------------------ refresh
    def _original(self) -> Tensor:
        owner = self._owner()
        if owner is None:
            raise RuntimeError(
                "refresh: this trivialization does not know its parameter; call "
                "refresh(original) with module.parametrizations[name].original, or register "
                "it with dtriv.parametrize.constrain"
            )
        if len(owner) == 0 or owner[0] is not self:
            raise RuntimeError(
                "refresh: the trivialization must be the first parametrization of its tensor "
                "(it then receives the registered parameter), got a later position"
            )
        return owner.original

    @without_any_autocast
    @torch.no_grad()
    def refresh(self, original: Tensor | None = None) -> None:
        """Move the base to the current point and zero the free tensor, in place.

        ``base <- forward(original)``, re-projected onto the manifold when its constraint
        error exceeds :meth:`reproject_atol`, or polished (one cheap correction step) when it
        exceeds :meth:`polish_atol` (so float drift never accumulates), then
        ``original <- 0``; the weight is unchanged (up to that re-projection). ``original``
        defaults to the parameter this trivialization was registered on by ``constrain``.
        Cost: one forward, plus one projection when re-projecting.
        """
        if not self.dynamic:
            raise RuntimeError(
                "refresh: a static trivialization (dynamic=False) keeps its reference point; "
                "register it with dynamic=True to refresh it"
            )
        if original is None:
            original = self._original()
        if self.base is None:
            raise RuntimeError("refresh: the trivialization has no base point yet")
        if not isinstance(original, Tensor):
            raise TypeError(f"refresh: expected original a torch.Tensor, got "
                            f"{type(original).__name__}")
        if self._tensor_shape is not None and tuple(original.shape) != self._tensor_shape:
            raise ValueError(f"refresh: expected original of shape {self._tensor_shape}, "
                             f"got {tuple(original.shape)}")
        self._forget()
        P = self.manifold.retract(
            self.base, self.manifold.tangent(self.base, self._to_point(original)), self.retraction
        )
        if not is_meta(P):  # a meta tensor has no constraint error to correct
            error = self.manifold.distance(P)
            if bool((error > self.reproject_atol(P.dtype)).any()):
                P = self.manifold.project(P)
            elif bool((error > self.polish_atol(P.dtype)).any()):
                P = self.manifold.polish(P)
        self.base.copy_(P)
        original.zero_()

    def polish_atol(self, dtype: torch.dtype) -> float:
        """The constraint error above which :meth:`refresh` polishes the base.

        ``sqrt(max(shape)) eps``: a rounding-level error of a freshly computed point. Above it,
        :meth:`Manifold.polish` (for Stiefel one Newton–Schulz step, two matmuls) brings the
        base back to rounding level, so the error of a trivialization refreshed at every step
        stays at rounding level instead of growing as a random walk.
        """
        return math.sqrt(max(self.manifold.shape)) * _eps(dtype)

    def reproject_atol(self, dtype: torch.dtype) -> float:
        """The constraint error above which :meth:`refresh` re-projects the base.

        A twentieth of ``manifold.tolerance(dtype)`` (``5 max(shape) eps``, capped, for the
        manifolds of :mod:`dtriv.manifolds`): above the error of a fresh projection
        (``<= 2 n eps`` for an orthonormal factor), so a base is not re-projected at every
        refresh, and well inside the tolerance of ``manifold.check`` (float32, ``n = 8``:
        ``4.8e-6``).
        """
        return self.manifold.tolerance(dtype) / 20

    # ------------------------------------------------------------------ state
    def _description(self) -> dict[str, Any]:
        return {
            "manifold": _identity(self.manifold),
            "retraction": self.retraction,
            "flatten": bool(self._flat),
            "dim": self._dim_of(self.dim) if self._flat else None,
            "repr": repr(self.manifold),
        }

    def _dim_of(self, dim: Any) -> Any:
        """``dim`` counted from the front (``-1`` and ``ndim - 1`` are one reading), once the
        tensor's rank is known; other values as they are."""
        if isinstance(dim, int) and not isinstance(dim, bool) and dim < 0 and self._tensor_shape:
            return dim + len(self._tensor_shape)
        return dim

    def get_extra_state(self) -> dict[str, Any]:
        """The manifold identity, retraction and tensor reading, checked when loading."""
        return self._description()

    def _mismatch(self, state: Any) -> str | None:
        mine = self._description()
        if not isinstance(state, dict):
            return f"expected a dict describing the trivialization, got {type(state).__name__}"
        if state.get("manifold") != mine["manifold"]:
            return (
                f"the checkpoint was saved on {state.get('repr', state.get('manifold'))}, "
                f"this module is constrained to {mine['repr']}"
            )
        theirs = {**state, "dim": self._dim_of(state.get("dim"))}  # saved before normalising
        for key in ("retraction", "flatten", "dim"):
            if theirs.get(key) != mine[key]:
                return (
                    f"the checkpoint's trivialization has {key} {theirs.get(key)!r}, "
                    f"this module's has {mine[key]!r}"
                )
        return None

    def set_extra_state(self, state: Any) -> None:
        """Check that ``state`` describes this trivialization; ``ValueError`` if not."""
        if self._loading:
            return  # checked (and reported with its key) by _load_from_state_dict
        problem = self._mismatch(state)
        if problem is not None:
            raise ValueError(f"state: {problem}")

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        key = prefix + _EXTRA_STATE
        if key in state_dict:
            problem = self._mismatch(state_dict[key])
            if problem is not None:
                error_msgs.append(f"manifold mismatch for {key}: {problem}.")
        self._loading = True
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                error_msgs,
            )
        finally:
            self._loading = False
