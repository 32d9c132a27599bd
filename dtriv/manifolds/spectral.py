"""Matrices whose singular values lie in an interval ``[lower, upper]``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dtriv.manifolds.base import Manifold
from dtriv.manifolds.stiefel import Stiefel
from dtriv.retractions.spectral import clip_singular_values

__all__ = ["SpectrallyBounded"]


def _check_size(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name}: expected a real number, got {value!r}")
    return float(value)


class SpectrallyBounded(Manifold):
    r"""The set :math:`\{W \in \mathbb{K}^{n \times k} : \ell \le \sigma_i(W) \le u\}`.

    ``SpectrallyBounded(n, k, upper=u, lower=l)`` with :math:`0 \le \ell \le u`,
    :math:`u > 0`; with ``lower = 0`` it is the spectral-norm ball of radius ``upper``. The
    :math:`\sigma_i` are the :math:`\min(n, k)` singular values. For :math:`\ell < u` it is a
    closed set with non-empty interior in :math:`\mathbb{K}^{n\times k}` (a manifold with
    boundary), so its tangent cone at an interior point is the whole space.

    * **Metric**: the embedded one, :math:`\operatorname{Re}\operatorname{tr}(U^H V)`.
    * **Tangent projection**: the identity (the set has an interior), O(1).
    * **Projection** (nearest point in Frobenius norm): clip the singular values,
      :math:`U \operatorname{clamp}(\Sigma, \ell, u) V^H` (Lewis 1995: the nearest point of a
      unitarily invariant set acts on the singular values), O(n k min(n, k)) by an SVD.
    * **Retraction**: ``"clip"``, :math:`R_B(V) = \operatorname{proj}(B + V)`; it is a first
      order retraction at interior points. Inverse (exact, since ``X`` is in the set):
      ``X - B``.
    * **Constraint error** (:meth:`distance`): relative to ``upper``,
      :math:`\max(0, \sigma_{\max} - u, \ell - \sigma_{\min}) / u`.
    * **Sampling**: ``init="haar"`` draws :math:`W = U \operatorname{diag}(s) V^H` with ``U``
      (``n x r``) and ``V`` (``k x r``), :math:`r = \min(n, k)`, independent Haar points of
      the Stiefel manifolds and :math:`s_1, \dots, s_r` i.i.d. uniform on
      :math:`[\ell, u]`. The law is invariant under :math:`W \mapsto P W Q` for unitary
      ``P``, ``Q`` and its singular values are i.i.d. uniform; it is *not* the uniform
      (Lebesgue) law on the set, which would put almost all singular values near ``u``.
    * **Dimension** (:attr:`dim`, that of real tensors): :math:`nk` (:math:`2nk` for complex
      tensors).

    References: Lewis, *The convex analysis of unitarily invariant matrix functions*,
    J. Convex Anal. 2 (1995); Miyato et al., *Spectral normalization for GANs*, ICLR 2018.
    """

    def __init__(self, n: int, k: int, upper: float = 1.0, lower: float = 0.0) -> None:
        self.n = _check_size(n, "n")
        self.k = _check_size(k, "k")
        upper = _check_number(upper, "upper")
        lower = _check_number(lower, "lower")
        if not upper > 0 or upper == float("inf"):
            raise ValueError(f"upper: expected a finite positive number, got {upper!r}")
        if not 0 <= lower < math.inf:
            raise ValueError(f"lower: expected a finite non-negative number, got {lower!r}")
        if lower > upper:
            raise ValueError(
                f"lower: expected lower <= upper = {upper!r}, got lower = {lower!r}"
            )
        self.upper, self.lower = upper, lower

    def _signature(self) -> str:
        return f"n={self.n}, k={self.k}, upper={self.upper:g}, lower={self.lower:g}"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, self.k)

    @property
    def dim(self) -> int:
        return self.n * self.k

    @property
    def retractions(self) -> tuple[str, ...]:
        return ("clip",)

    def _constraints(self, X: Tensor) -> list[tuple[str, Tensor]]:
        s = torch.linalg.svdvals(X)
        above = (s.amax(dim=-1) - self.upper).clamp_min(0) / self.upper
        out = [(f"(sigma_max(X) - {self.upper:g}) / {self.upper:g}", above)]
        if self.lower > 0:
            below = (self.lower - s.amin(dim=-1)).clamp_min(0) / self.upper
            out.append((f"({self.lower:g} - sigma_min(X)) / {self.upper:g}", below))
        return out

    def project(self, X: Tensor) -> Tensor:
        """Clip the singular values of ``X`` to ``[lower, upper]`` (SVD)."""
        self.validate(X)
        return clip_singular_values(X, upper=self.upper, lower=self.lower)

    def proj_tangent(self, B: Tensor, V: Tensor) -> Tensor:
        """The identity: the tangent cone at an interior point is the whole space. ``V`` has
        the dtype of ``B`` and a batch shape that broadcasts with it; the result has the
        broadcast shape (``V`` itself when the shapes are equal)."""
        self.validate(B, "B")
        self.validate(V, "V")
        self._check_pair(B, V, "V")
        if V.shape == B.shape:
            return V
        return self._broadcast_pair(B, V)[1].clone()

    def _retract(self, B: Tensor, V: Tensor, method: str) -> Tensor:
        return clip_singular_values(B + V, upper=self.upper, lower=self.lower)

    def _inverse(self, method: str) -> Callable[[Tensor, Tensor], Tensor] | None:
        return lambda B, X: X - B

    def _sample(self, batch, generator, dtype, device, init) -> Tensor:
        if init != "haar":
            raise self._bad_init(init, ("haar",))
        r = min(self.n, self.k)
        kw = dict(generator=generator, dtype=dtype, device=device)
        U = Stiefel(self.n, r).sample(*batch, **kw)
        V = Stiefel(self.k, r).sample(*batch, **kw)
        real = torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype
        u = torch.rand(*batch, r, generator=generator, dtype=real, device=device)
        s = self.lower + (self.upper - self.lower) * u
        return (U * s.to(dtype).unsqueeze(-2)) @ V.mH
