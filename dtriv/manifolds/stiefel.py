"""The Stiefel manifold, the orthogonal/unitary group and the special orthogonal group."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dtriv.manifolds.base import Manifold
from dtriv.retractions import _lu, registry
from dtriv.retractions._common import (
    no_host_reads,
    skew,
    sym,
    tracing,
    upcast_half,
    values_checkable,
)
from dtriv.retractions.lie import cayley_inverse, cayley_of_skew, expm, expm_of_skew, logm
from dtriv.retractions.stiefel import (
    polar_factor,
    special_polar_factor,
    stiefel_cayley,
    stiefel_exp,
    stiefel_exp_canonical,
    stiefel_polar,
    stiefel_polar_newton_schulz,
    stiefel_qr,
)

__all__ = ["Stiefel", "Orthogonal", "SpecialOrthogonal", "generator_init"]

_TALL_MAPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cayley": stiefel_cayley,
    "exp": stiefel_exp,
    "exp_canonical": stiefel_exp_canonical,
    "qr": stiefel_qr,
    "polar": stiefel_polar,
    "polar_ns": stiefel_polar_newton_schulz,
}
_SQUARE_INVERSE = {"expm": logm, "cayley": cayley_inverse}
# f(skew(Y)) = f_of_skew(Y / 2) (exact: halving is exact), one autograd node with the gradient
# with respect to Y, which needs only the skew part (cheaper backward for expm)
_SQUARE_OF_SKEW = {"expm": expm_of_skew, "cayley": cayley_of_skew}
_INITS = ("henaff", "cayley")


def _check_size(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


def _generator_init(n, init, batch, generator, dtype, device) -> Tensor:
    if init not in _INITS:
        raise ValueError(f"init: expected one of {', '.join(_INITS)}, got {init!r}")
    real = _real_dtype(dtype)
    m = n // 2
    r = torch.rand(*batch, m, generator=generator, dtype=real, device=device)
    if init == "henaff":
        s = (2 * r - 1) * math.pi
    else:
        u = r * (math.pi / 2)
        s = -torch.sqrt((1 - torch.cos(u)) / (1 + torch.cos(u)))
    A = torch.zeros(*batch, n, n, dtype=real, device=device)
    idx = torch.arange(0, 2 * m, 2, device=device)
    A[..., idx, idx + 1] = s
    A[..., idx + 1, idx] = -s
    return A.to(dtype)


def generator_init(
    n: int,
    init: str,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""The skew matrix ``A`` of an orthogonal-RNN initialisation, so that ``W = expm(A)``.

    ``A = blockdiag(S_1, ..., S_{n // 2}[, 0])`` with
    :math:`S_i = \begin{pmatrix} 0 & s_i \\ -s_i & 0\end{pmatrix}` (for odd ``n`` the last
    diagonal entry is 0, so ``W`` has a 1 there). ``expm(S_i)`` is the rotation by the angle
    :math:`s_i`, so the eigenvalues of ``W`` are :math:`e^{\pm i s_i}` (and 1 for odd ``n``).

    * ``init="henaff"`` (Henaff, Szlam & LeCun 2016): :math:`s_i \sim U(-\pi, \pi)`, so the
      eigen-angles :math:`|s_i|` of ``W`` are uniform on :math:`(0, \pi)`.
    * ``init="cayley"`` (the "torus" initialisation of Helfrich, Willmott & Ye 2018):
      :math:`u_i \sim U(0, \pi/2)`, :math:`s_i = -\sqrt{(1 - \cos u_i)/(1 + \cos u_i)}
      = -\tan(u_i/2) \in (-1, 0]`. Through the Cayley map of that paper,
      :math:`(I - A)^{-1}(I + A)` (``dtriv``'s ``cayley(2 A)``), the eigen-angles are
      :math:`2\arctan|s_i| = u_i`, uniform on :math:`(0, \pi/2)`. Through ``expm`` they are
      :math:`|s_i| = \tan(u_i / 2)`, with distribution function
      :math:`F(t) = \tfrac{4}{\pi}\arctan t` on :math:`[0, 1]`.

    ``A`` is real (cast to ``dtype``, which defaults to ``torch.get_default_dtype()``;
    a complex dtype gives the same matrix, skew-Hermitian). Cost: O(n^2) to fill.
    """
    n = _check_size(n, "n")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    return _generator_init(n, init, (), generator, dtype, device)


class Stiefel(Manifold):
    r"""The Stiefel manifold :math:`\{X \in \mathbb{K}^{n \times k} : X^H X = I_k\}`.

    ``Stiefel(n, k)`` with ``n >= k`` (tall) holds the matrices with orthonormal columns.
    Wide shapes (``n < k``) are the matrices with orthonormal rows,
    :math:`X X^H = I_n`: every method transposes its inputs to the tall
    ``(k, n)`` problem and its result back. ``k = None`` or ``k = n`` is the orthogonal
    group :math:`O(n)` (the unitary group :math:`U(n)` for complex tensors);
    ``special=True`` (square only) is :math:`SO(n)`, real only. The field
    :math:`\mathbb{K}` (real or complex) is the dtype of the tensors.

    * **Metric**: the embedded (Euclidean) one,
      :math:`\langle U, V\rangle = \operatorname{Re}\operatorname{tr}(U^H V)`.
    * **Tangent space** at ``B``: :math:`\{V : B^H V + V^H B = 0\}`; projection
      :math:`P_B(V) = V - B \operatorname{sym}(B^H V)`,
      :math:`\operatorname{sym}(M) = (M + M^H)/2`, O(n k^2). It is also the Riemannian
      gradient of the embedded metric.
    * **Projection** onto the manifold: the polar factor :math:`U W^H` of the thin SVD
      :math:`X = U \Sigma W^H` (Higham 1986), O(n k^2). For :math:`SO(n)`, if
      :math:`\det(U W^H) = -1` the last column of ``U`` (least singular value) is flipped,
      which gives the nearest rotation (Kabsch 1976).
    * **Retractions** (:attr:`retractions`, the first is the default):

      - square (the group): ``"expm"`` :math:`B \exp(\operatorname{skew}(B^H V))`,
        ``"cayley"`` :math:`B\,\operatorname{cay}(\operatorname{skew}(B^H V))` with
        :math:`\operatorname{cay}(A) = (I - A/2)^{-1}(I + A/2)` (for a tangent ``V``,
        :math:`B^H V` is already skew; the skew part keeps the result on the group for any
        ``V``), O(n^3); and ``"qr"``, ``"polar"``, ``"polar_ns"`` as below. Inverses:
        :math:`B \log(B^H X)`, :math:`B\,\operatorname{cay}^{-1}(B^H X)`.
      - tall: ``"cayley"`` (low-rank Cayley, Wen & Yin 2013), ``"exp"`` (embedded-metric
        geodesic, Edelman, Arias & Smith 1998), ``"exp_canonical"`` (canonical-metric
        geodesic), ``"qr"`` (q-factor of ``B + V`` with positive ``diag(R)``),
        ``"polar"`` (polar factor of ``B + V``) and ``"polar_ns"`` (its Newton–Schulz
        approximation), all O(n k^2) from :mod:`dtriv.retractions.stiefel`; inverses where
        that module registers one.
    * **Constraint error** (:meth:`distance`): :math:`\max|X^H X - I|` (for wide shapes
      :math:`\max|X X^H - I|`), and for :math:`SO(n)` also :math:`1 - \operatorname{sign}
      \det X` (0 on :math:`SO(n)`, 2 for a reflection).
    * **Sampling** (:meth:`sample`): ``init="haar"``, the Haar (uniform) law, as the q-factor
      of a standard (complex) Gaussian matrix with the phases of ``diag(R)`` moved into
      ``Q`` (Mezzadri 2007); for :math:`SO(n)` the first column is multiplied by
      :math:`\det Q`, which keeps the law invariant under :math:`SO(n)`. Square only:
      ``init="henaff"`` and ``init="cayley"``, ``expm`` of :func:`generator_init`.
    * **Dimension** (:attr:`dim` gives the real one): :math:`nk - k(k+1)/2` for real tensors
      (``n >= k``; :math:`n(n-1)/2` for :math:`O(n)` and :math:`SO(n)`); for complex tensors
      :math:`2nk - k^2`.
    * **Free coordinates** (:meth:`chart`, :meth:`tangent`): square, ``skew(X)`` and the
      left-invariant tangent :math:`B \operatorname{skew}(X)`; otherwise ``X`` and
      :math:`P_B(X)`.

    References: Edelman, Arias & Smith, *The geometry of algorithms with orthogonality
    constraints*, SIAM J. Matrix Anal. Appl. 20 (1998); Absil, Mahony & Sepulchre,
    *Optimization Algorithms on Matrix Manifolds* (2008), Ex. 3.6.2 and 4.1.3; Wen & Yin,
    *A feasible method for optimization with orthogonality constraints*, Math. Program.
    142 (2013); Mezzadri, *How to generate random matrices from the classical compact
    groups*, Notices AMS 54 (2007); pymanopt's ``Stiefel``; geotorch's ``SO``/``Stiefel``.
    """

    def __init__(self, n: int, k: int | None = None, special: bool = False) -> None:
        n = _check_size(n, "n")
        k = n if k is None else _check_size(k, "k")
        if special and n != k:
            raise ValueError(
                f"special: SO(n) needs a square shape (k = n), got n={n}, k={k}"
            )
        self.n, self.k, self.special = n, k, bool(special)
        self.square = n == k
        self.wide = n < k
        self._p, self._q = max(n, k), min(n, k)

    def _signature(self) -> str:
        return f"n={self.n}, k={self.k}" + (", special=True" if self.special else "")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, self.k)

    @property
    def dim(self) -> int:
        p, q = self._p, self._q
        return p * q - q * (q + 1) // 2

    @property
    def retractions(self) -> tuple[str, ...]:
        if self.square:
            return ("expm", "cayley", "qr", "polar", "polar_ns")
        return ("cayley", "exp", "exp_canonical", "qr", "polar", "polar_ns")

    def validate(self, X: Tensor, name: str = "X") -> None:
        super().validate(X, name)
        if self.special and X.is_complex():
            raise ValueError(
                f"{name}: expected a real tensor for {self!r} (SO(n) is real), "
                f"got dtype {X.dtype}"
            )

    # transposition to the tall problem (its own inverse)
    def _t(self, X: Tensor) -> Tensor:
        return X.mT if self.wide else X

    # ------------------------------------------------------------------ membership
    def _constraints(self, X: Tensor) -> list[tuple[str, Tensor]]:
        T = self._t(X)
        eye = torch.eye(self._q, dtype=X.dtype, device=X.device)
        err = (T.mH @ T - eye).abs().amax(dim=(-2, -1))
        label = "max|X X^H - I|" if self.wide else "max|X^H X - I|"
        out = [(f"the orthonormality error {label}", err)]
        if self.special:
            det_err = 1 - torch.sign(_lu.det(X))
            out.append(("1 - sign(det X) (det X = +1 required)", det_err))
        return out

    # ------------------------------------------------------------------ geometry
    @upcast_half
    def project(self, X: Tensor) -> Tensor:
        """The polar factor of ``X`` (nearest point in Frobenius norm), by a thin SVD.

        Differentiable, with the stable backward of
        :func:`dtriv.retractions.stiefel.polar_factor` (finite at repeated singular values,
        e.g. on the manifold). For SO(n) it is
        :func:`dtriv.retractions.stiefel.special_polar_factor`: points whose polar factor is a
        reflection get the last singular vector flipped (selected per point, without a host
        read), with a backward that is finite unless that least singular value is repeated.
        Half precision is computed in float32.

        Raises:
            ValueError: for non-finite entries, which have no polar factor (the SVD would
                raise or return NaN); not checked where values cannot be read on the host
                (meta tensors, ``vmap``, tracing).
        """
        self.validate(X)
        if (X.numel() and values_checkable(X) and not tracing()
                and not bool(torch.isfinite(X).all())):
            raise ValueError("X: expected finite entries, got NaN or infinite ones: a "
                             "non-finite matrix has no nearest point of the manifold")
        if self.special:
            return special_polar_factor(X)
        return self._t(polar_factor(self._t(X)))

    def polish(self, X: Tensor) -> Tensor:
        r"""One Newton–Schulz step towards the polar factor: :math:`X (3I - X^H X) / 2`.

        For :math:`X = Q(I + E)` with :math:`Q` orthonormal and :math:`E` Hermitian, the step
        leaves :math:`Q(I - \tfrac{3}{2}E^2 + O(E^3))`: the constraint error goes from
        :math:`\epsilon` to :math:`O(\epsilon^2)` (down to rounding) at the cost of two
        matmuls, :math:`O(n k^2)`, instead of an SVD. Points farther than 0.1 from the
        manifold (constraint error) are projected instead, as are meta tensors and traced calls
        (:func:`~dtriv.retractions._common.no_host_reads`: the distance cannot be read).
        Determinants keep their sign.
        """
        self.validate(X)
        if no_host_reads(X):
            return self.project(X)
        T = self._t(X)
        G = T.mH @ T
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        if G.numel() and bool(((G - eye).abs().amax() > 0.1).item()):
            return self.project(X)
        return self._t(T @ (1.5 * eye - 0.5 * G))

    def proj_tangent(self, B: Tensor, V: Tensor) -> Tensor:
        r""":math:`V - B \operatorname{sym}(B^H V)` (on the transposes for wide shapes)."""
        self.validate(B, "B")
        self.validate(V, "V")
        if V.dtype != B.dtype:
            raise ValueError(f"V: expected the dtype of B, {B.dtype}, got {V.dtype}")
        Bt, Vt = self._t(B), self._t(V)
        return self._t(Vt - Bt @ sym(Bt.mH @ Vt))

    def chart(self, X: Tensor) -> Tensor:
        """``skew(X)`` for the square group, else ``X``."""
        self.validate(X)
        return skew(X) if self.square else X

    def tangent(self, B: Tensor, X: Tensor) -> Tensor:
        """``B @ skew(X)`` for the square group (left-invariant), else ``proj_tangent(B, X)``."""
        if self.square:
            self.validate(B, "B")
            return B @ self.chart(X)
        return self.proj_tangent(B, self.chart(X))

    def trivialize(self, B: Tensor, X: Tensor, method: str) -> Tensor:
        r"""The map of a trivialization at ``B`` (see :meth:`Manifold.trivialize`).

        For the square group with a Lie-algebra map ``f`` (``expm``, ``cayley``) it is
        :math:`B f(\operatorname{skew}(X))`: the composition
        ``retract(B, tangent(B, X))`` is :math:`B f(\operatorname{skew}(B^H B
        \operatorname{skew}(X)))`, and :math:`B^H B = I` on the manifold, so the two
        products that form the tangent and pull it back (and their two backward products
        each) cancel. Unchecked; cost: the map plus one :math:`n \times n` product (forward
        and backward). Other shapes and methods: the composition.
        """
        if self.square and method in _SQUARE_OF_SKEW:
            return B @ _SQUARE_OF_SKEW[method](X * 0.5)
        return super().trivialize(B, X, method)

    # ------------------------------------------------------------------ retractions
    def _retract(self, B: Tensor, V: Tensor, method: str) -> Tensor:
        if self.square and method in _SQUARE_OF_SKEW:
            return B @ _SQUARE_OF_SKEW[method]((B.mH @ V) * 0.5)
        return self._t(_TALL_MAPS[method](self._t(B), self._t(V)))

    def _inverse(self, method: str) -> Callable[[Tensor, Tensor], Tensor] | None:
        if self.square and method in _SQUARE_INVERSE:
            inv = _SQUARE_INVERSE[method]
            return lambda B, X: B @ inv(B.mH @ X)
        inv = registry.get("stiefel", method).inverse
        if inv is None:
            return None
        return lambda B, X: self._t(inv(self._t(B), self._t(X)))

    # ------------------------------------------------------------------ sampling
    def _sample(self, batch, generator, dtype, device, init) -> Tensor:
        if self.special and dtype.is_complex:
            raise ValueError(f"dtype: expected a real dtype for {self!r}, got {dtype}")
        if init in _INITS:
            if not self.square:
                raise ValueError(
                    f"init: {init!r} needs a square shape (k = n), got {self!r}; "
                    "use init='haar'"
                )
            A = _generator_init(self.n, init, batch, generator, dtype, device)
            return expm(A)
        if init != "haar":
            raise self._bad_init(init, ("haar",) + (_INITS if self.square else ()))
        Z = torch.randn(*batch, self._p, self._q, generator=generator, dtype=dtype,
                        device=device)
        Q, R = torch.linalg.qr(Z)
        d = R.diagonal(dim1=-2, dim2=-1)
        phase = torch.where(d == 0, torch.ones_like(d), d / d.abs())
        Q = Q * phase.unsqueeze(-2)
        if self.special:
            det = _lu.det(Q)
            Q = torch.cat([Q[..., :1] * det[..., None, None], Q[..., 1:]], dim=-1)
        return self._t(Q)


class Orthogonal(Stiefel):
    r"""The orthogonal group :math:`O(n)` (unitary :math:`U(n)` for complex tensors):
    ``Stiefel(n, n)``. See :class:`Stiefel` for the metric, retractions and references."""

    def __init__(self, n: int) -> None:
        super().__init__(n, n)

    def _signature(self) -> str:
        return f"n={self.n}"


class SpecialOrthogonal(Stiefel):
    r"""The special orthogonal group :math:`SO(n) = \{X \in O(n) : \det X = 1\}`:
    ``Stiefel(n, n, special=True)``; real only. See :class:`Stiefel`."""

    def __init__(self, n: int) -> None:
        super().__init__(n, n, special=True)

    def _signature(self) -> str:
        return f"n={self.n}"
