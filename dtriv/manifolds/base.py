"""The abstract interface every manifold of :mod:`dtriv` implements.

A :class:`Manifold` describes a set of tensors of one trailing shape, embedded in the
Euclidean (or unitary) space of that shape. It holds no data and no training state: a
point is a plain tensor, possibly with extra leading batch dimensions, and every method
works on such batches.

The metric is the embedded one, :math:`\\langle U, V\\rangle = \\operatorname{Re}
\\operatorname{tr}(U^H V)`, so the orthogonal projection onto a tangent space is also the
map from a Euclidean gradient to the Riemannian gradient.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
from torch import Tensor

from dtriv.retractions._common import compute_dtype, eps, is_meta

__all__ = ["Manifold"]


class Manifold(abc.ABC):
    r"""A manifold of tensors of trailing shape :attr:`shape`, with the embedded metric.

    Subclasses implement :attr:`shape`, :attr:`dim`, :attr:`retractions`,
    :meth:`_constraints`, :meth:`project`, :meth:`proj_tangent`, :meth:`_retract` and
    :meth:`_sample`; the rest (membership checks, dispatch by retraction name, transport,
    inner product, tangent sampling) is shared.

    **Tolerance.** The default absolute tolerance of :meth:`check` is
    ``tolerance_factor * max(shape) * eps(dtype)`` with ``tolerance_factor = 100``. The
    constraint errors of an orthonormal factor computed by QR, SVD or a matrix exponential
    grow like ``c * n * eps`` with ``c`` of order one (measured: ``c <= 2`` for
    ``n <= 1024``), so a sample or a few retraction steps stay well inside it; in float32
    it is ``1.2e-5`` for ``n = 1`` and ``1.2e-2`` for ``n = 1024``. It is capped at
    ``tolerance_factor * sqrt(eps(dtype))`` (``3.5e-2`` in float32, reached from
    ``n = 2897``; ``1.5e-6`` in float64, beyond any practical ``n``), without which the bound
    would pass 1 in float32 from ``n = 83,887`` and admit the zero vector as a unit vector.
    Rounding errors grow far more slowly than ``n * eps`` in practice (a (65536, 8) Stiefel
    sample in float32: about ``1e-5``). In half precision that cap itself passes 1 (``8.8`` in
    bfloat16, ``3.1`` in float16: every Linear initialization would pass for orthogonal), so
    the tolerance is also at most :attr:`max_tolerance` ``= 0.1``, which binds there only
    (``13 eps`` in bfloat16; a half-precision orthonormal matrix, rounded from an exact one,
    has an error of at most ``eps / 2``, measured for ``n`` from 16 to 1024).
    """

    #: Factor of the default tolerance ``tolerance_factor * max(shape) * eps(dtype)``.
    tolerance_factor: float = 100.0
    #: Upper bound of the default tolerance, whatever the dtype (it binds in half precision).
    max_tolerance: float = 0.1

    # ------------------------------------------------------------------ description
    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """The trailing shape of one point."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """The intrinsic (real) dimension of the manifold."""

    @property
    @abc.abstractmethod
    def retractions(self) -> tuple[str, ...]:
        """Names accepted by :meth:`retract`; the first one is the default."""

    @property
    def default_retraction(self) -> str:
        """The retraction :meth:`retract` uses when no ``method`` is given."""
        return self.retractions[0]

    def _signature(self) -> str:
        """The arguments shown by ``repr``, e.g. ``"n=5, k=3"``."""
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._signature()})"

    # ------------------------------------------------------------------ validation
    def validate(self, X: Tensor, name: str = "X") -> None:
        """Raise ``TypeError`` unless ``X`` is a tensor, ``ValueError`` unless it is a floating
        tensor of trailing shape :attr:`shape`.

        The message names the argument, the expected shape and the shape it got.
        """
        if not isinstance(X, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(X).__name__}")
        shape = self.shape
        expected = "(..., " + ", ".join(str(s) for s in shape) + ")"
        if X.ndim < len(shape) or tuple(X.shape[X.ndim - len(shape):]) != shape:
            raise ValueError(
                f"{name}: expected a tensor of shape {expected} for {self!r}, "
                f"got shape {tuple(X.shape)}"
            )
        if not (X.is_floating_point() or X.is_complex()):
            raise ValueError(
                f"{name}: expected a floating point or complex tensor, got dtype {X.dtype}"
            )

    def _batch_shape(self, X: Tensor) -> tuple[int, ...]:
        return tuple(X.shape[: X.ndim - len(self.shape)])

    # ------------------------------------------------------------------ membership
    def tolerance(self, dtype: torch.dtype) -> float:
        """Default absolute tolerance: ``tolerance_factor * min(max(shape) * eps(dtype),
        sqrt(eps(dtype)))``, at most :attr:`max_tolerance` (see the class's note)."""
        e = eps(dtype)
        return min(self.tolerance_factor * min(max(self.shape) * e, math.sqrt(e)),
                   self.max_tolerance)

    @abc.abstractmethod
    def _constraints(self, X: Tensor) -> list[tuple[str, Tensor]]:
        """The constraints of the manifold as ``(description, error)`` pairs.

        ``error`` is a non-negative real tensor of the batch shape of ``X``; it is zero
        exactly on the manifold.
        """

    def distance(self, X: Tensor) -> Tensor:
        """Constraint error (max over the constraints, each in max-norm), of the batch shape.

        It is zero on the manifold and is compared with :meth:`tolerance` by :meth:`check`.
        """
        self.validate(X)
        errors = [err for _, err in self._constraints(X.to(compute_dtype(X.dtype)))]
        return torch.stack(errors).amax(dim=0) if len(errors) > 1 else errors[0]

    def check(
        self, X: Tensor, atol: float | None = None, explain: bool = False
    ) -> bool | tuple[bool, str]:
        """Whether every point of the batch ``X`` satisfies the constraints up to ``atol``.

        ``atol`` defaults to :meth:`tolerance` of the dtype of ``X``. With ``explain=True``
        return ``(ok, reason)``: the reason names the worst violated condition, its error,
        the tolerance and (for a batch) the index of the worst point.

        A meta tensor (``torch.device("meta")``: a shape and a dtype, no values) is not
        checked: ``True``, with the reason "not checked". The shape and dtype are validated as
        for any tensor; a model built on meta registers its parametrizations, whose
        assignments check membership, and gets its values later (``load_state_dict``).
        """
        self.validate(X)
        if is_meta(X):  # no values to check
            reason = "X is a meta tensor: it has no values, not checked"
            return (True, reason) if explain else True
        if atol is None:
            atol = self.tolerance(X.dtype)
        batch = self._batch_shape(X)
        if not bool(torch.isfinite(X).all()):
            bad = ~torch.isfinite(X).flatten(start_dim=X.ndim - len(self.shape)).all(dim=-1)
            where = self._index(bad.to(torch.float64), batch)
            return (False, f"X{where} has non-finite entries") if explain else False
        if X.numel() == 0:
            return (True, "X is an empty batch") if explain else True
        for description, err in self._constraints(X.to(compute_dtype(X.dtype))):
            worst = float(err.max())
            if not worst <= atol:
                if not explain:
                    return False
                where = self._index(err, batch)
                return False, (
                    f"X{where} is not on {self!r}: {description} is {worst:.3e}, "
                    f"exceeds atol = {atol:.3e}"
                )
        if not explain:
            return True
        return True, f"X is on {self!r}: constraint error {float(self.distance(X).max()):.3e} " \
            f"<= atol = {atol:.3e}"

    @staticmethod
    def _index(err: Tensor, batch: tuple[int, ...]) -> str:
        if not batch:
            return ""
        flat = int(err.reshape(-1).argmax())
        idx = []
        for size in reversed(batch):
            idx.append(flat % size)
            flat //= size
        return "[" + ", ".join(str(i) for i in reversed(idx)) + "]"

    # ------------------------------------------------------------------ geometry
    @abc.abstractmethod
    def project(self, X: Tensor) -> Tensor:
        """The nearest point of the manifold to ``X`` (Frobenius norm)."""

    def polish(self, X: Tensor) -> Tensor:
        """A cheap correction of a point ``X`` that is already close to the manifold.

        Used to cancel rounding drift (e.g. at every refresh of a trivialization) where a full
        :meth:`project` would cost more than needed. Here it is :meth:`project`; manifolds with
        a cheaper local correction override it.
        """
        return self.project(X)

    @abc.abstractmethod
    def proj_tangent(self, B: Tensor, V: Tensor) -> Tensor:
        """Orthogonal projection of ``V`` onto the tangent space at ``B`` (embedded metric)."""

    def inner(self, B: Tensor, U: Tensor, V: Tensor) -> Tensor:
        r"""Embedded metric :math:`\operatorname{Re}\sum \bar U V` over the point dims.

        ``B`` is unused (the metric does not depend on the base point); the result has the
        batch shape.
        """
        self.validate(U, "U")
        self.validate(V, "V")
        dims = tuple(range(-len(self.shape), 0))
        return (U.conj() * V).real.sum(dim=dims)

    def transport(self, B: Tensor, B_new: Tensor, V: Tensor) -> Tensor:
        """Vector transport by projection: ``proj_tangent(B_new, V)``; ``B`` is unused."""
        return self.proj_tangent(B_new, V)

    def chart(self, X: Tensor) -> Tensor:
        """The free coordinates of an unconstrained tensor ``X`` (here ``X`` itself)."""
        self.validate(X)
        return X

    def tangent(self, B: Tensor, X: Tensor) -> Tensor:
        """The tangent vector at ``B`` denoted by the free tensor ``X``:
        ``proj_tangent(B, chart(X))``."""
        return self.proj_tangent(B, self.chart(X))

    def trivialize(self, B: Tensor, X: Tensor, method: str) -> Tensor:
        r"""The map of a trivialization at the base ``B``: :math:`R_B(T_B(X))`.

        :math:`T_B` is :meth:`tangent` (the tangent vector at ``B`` that the free tensor ``X``
        denotes) and :math:`R_B` the retraction ``method``, so this is
        ``retract(B, tangent(B, X), method)``, which it returns here. ``method`` is one of
        :attr:`retractions`, checked by the caller once (at the registration of a
        :class:`~dtriv.parametrize.Trivialization`, which calls this at every evaluation).
        Manifolds override it to fuse the two maps (one autograd node instead of two, no
        validation per call); the value and its derivatives must equal the composition.

        Cost: that of :meth:`tangent` plus that of the retraction.
        """
        return self.retract(B, self.tangent(B, X), method)

    # ------------------------------------------------------------------ retractions
    def _method(self, method: str | None) -> str:
        if method is None:
            return self.default_retraction
        if method not in self.retractions:
            raise ValueError(
                f"method: expected one of {', '.join(self.retractions)} for {self!r}, "
                f"got {method!r}"
            )
        return method

    def retract(self, B: Tensor, V: Tensor, method: str | None = None) -> Tensor:
        """Move from ``B`` along the tangent ``V`` with the retraction named ``method``.

        ``method`` is one of :attr:`retractions` (default :attr:`default_retraction`);
        an unknown name raises ``ValueError`` listing the available ones. ``V`` has the dtype
        of ``B`` and a shape that broadcasts with it (one point with a batch of tangents, or
        the reverse): the result has the broadcast shape.
        """
        method = self._method(method)
        self.validate(B, "B")
        self.validate(V, "V")
        self._check_pair(B, V, "V")
        return self._retract(*self._broadcast_pair(B, V), method)

    @staticmethod
    def _check_pair(B: Tensor, V: Tensor, name: str, same_dtype: bool = True) -> None:
        """Raise ``ValueError`` unless ``V`` (named ``name``) has the dtype of ``B`` (when
        ``same_dtype``) and a shape that broadcasts with that of ``B`` (one point with a
        batch, or the reverse)."""
        if same_dtype and V.dtype != B.dtype:
            raise ValueError(f"{name}: expected the dtype of B, {B.dtype}, got {V.dtype}")
        if V.shape != B.shape:
            try:
                torch.broadcast_shapes(B.shape, V.shape)
            except RuntimeError:
                raise ValueError(
                    f"{name}: expected a shape that broadcasts with that of B, "
                    f"{tuple(B.shape)}, got {tuple(V.shape)}"
                ) from None

    @staticmethod
    def _broadcast_pair(B: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        """``B`` and ``V`` expanded to their common shape (views), as they are when equal: the
        maps behind :meth:`_retract` and :meth:`_inverse` take equal shapes."""
        if B.shape == V.shape:
            return B, V
        B, V = torch.broadcast_tensors(B, V)
        return B, V

    @abc.abstractmethod
    def _retract(self, B: Tensor, V: Tensor, method: str) -> Tensor:
        """The retraction ``method`` (already validated) at ``B`` applied to ``V``."""

    def retract_inverse(self, B: Tensor, X: Tensor, method: str | None = None) -> Tensor:
        """The tangent ``V`` at ``B`` with ``retract(B, V, method) == X``, where available
        (shapes broadcast as in :meth:`retract`).

        Raises ``NotImplementedError`` saying why when the retraction has no inverse.
        """
        method = self._method(method)
        self.validate(B, "B")
        self.validate(X, "X")
        self._check_pair(B, X, "X")
        inverse = self._inverse(method)
        if inverse is None:
            raise NotImplementedError(
                f"{self!r}: the retraction {method!r} has no implemented inverse"
            )
        return inverse(*self._broadcast_pair(B, X))

    def _inverse(self, method: str) -> Callable[[Tensor, Tensor], Tensor] | None:
        """The inverse of the retraction ``method`` as a function ``(B, X) -> V``, or None."""
        return None

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        *batch: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        init: str = "haar",
    ) -> Tensor:
        """A sample of shape ``(*batch, *shape)``; ``init="haar"`` is the uniform law.

        ``dtype`` defaults to ``torch.get_default_dtype()``. The result is contiguous.
        """
        if len(batch) == 1 and isinstance(batch[0], (tuple, list, torch.Size)):
            batch = tuple(batch[0])
        for b in batch:
            if not isinstance(b, int) or b < 0:
                raise ValueError(
                    f"batch: expected non-negative integer sizes, got {tuple(batch)}"
                )
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not (dtype.is_floating_point or dtype.is_complex):
            raise ValueError(f"dtype: expected a floating point or complex dtype, got {dtype}")
        work = compute_dtype(dtype)  # half precision: drawn in float32, then rounded
        # contiguous (a QR factor is column-major): a parameter made from it then has the
        # layout of its gradients (torch warns of the "gradient layout contract" otherwise)
        return self._sample(tuple(batch), generator, work, device, init).to(dtype).contiguous()

    @abc.abstractmethod
    def _sample(
        self,
        batch: tuple[int, ...],
        generator: torch.Generator | None,
        dtype: torch.dtype,
        device: torch.device | str | None,
        init: str,
    ) -> Tensor:
        """The sample of :meth:`sample` with normalised arguments."""

    def _bad_init(self, init: str, choices: tuple[str, ...]) -> ValueError:
        return ValueError(
            f"init: expected one of {', '.join(choices)} for {self!r}, got {init!r}"
        )

    def random_tangent(self, B: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A random tangent vector at ``B``: the projection of a standard Gaussian tensor."""
        self.validate(B, "B")
        Z = torch.randn(B.shape, generator=generator, dtype=B.dtype, device=B.device)
        return self.proj_tangent(B, Z)
