"""The sphere of radius ``r`` in :math:`\\mathbb{R}^n` (or :math:`\\mathbb{C}^n`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dtriv.manifolds.base import Manifold
from dtriv.retractions.sphere import (
    exp_radius,
    projective_radius,
    sphere_log,
    sphere_projective_inverse,
    tangent_radius,
    trivialize_exp_radius,
    trivialize_projective_radius,
)

__all__ = ["Sphere"]


class Sphere(Manifold):
    r"""The sphere :math:`S^{n-1}_r = \{x \in \mathbb{R}^n : \|x\| = r\}` of radius ``r``.

    Points are vectors (the last dimension); leading dimensions are a batch. Complex
    tensors are points of the sphere of :math:`\mathbb{C}^n \cong \mathbb{R}^{2n}`.

    * **Metric**: the embedded one, :math:`\langle u, v\rangle = \operatorname{Re}(u^H v)`.
    * **Tangent space** at ``x``: :math:`\{v : \operatorname{Re}\langle x, v\rangle = 0\}`;
      projection :math:`P_x(v) = v - x \operatorname{Re}\langle x, v\rangle / r^2`.
    * **Projection** onto the sphere: :math:`r x / \|x\|` (the zero vector, whose nearest
      points are all of the sphere, goes to :math:`r e_1`).
    * **Retractions** (``retractions``), with :math:`\hat x = x / r`, :math:`\hat v = v/r`:

      - ``"exp"`` (default): the geodesic
        :math:`r(\cos\|\hat v\|\,\hat x + \sin\|\hat v\|\,\hat v / \|\hat v\|)`,
        inverse the Riemannian logarithm;
      - ``"projective"``: :math:`r (x + v) / \|x + v\|`, inverse
        :math:`r(\hat y / \langle \hat x, \hat y\rangle - \hat x)`.
    * **Constraint error** (:meth:`distance`): the relative radius error
      :math:`|\|x\|/r - 1|`.
    * **Sampling**: ``init="haar"``, the uniform law, as :math:`r g / \|g\|` with ``g``
      standard Gaussian (Muller 1959).
    * **Dimension** (:attr:`dim`, that of real tensors): ``n - 1`` (``2n - 1`` for complex
      tensors).
    * **Range**: the maps form :math:`r^2` and squared norms in the precision of the
      tensors, so the radius must have a normal square there: float32 :math:`10^{-19}
      \lesssim r \lesssim 1.8 \cdot 10^{19}`, float64 :math:`10^{-154} \lesssim r \lesssim
      10^{154}` (outside, :meth:`check` rejects the sphere's own samples and the maps return
      NaN, inf or points off the sphere; scale the data instead).

    Cost: O(n) per point for every method.

    References: Absil, Mahony & Sepulchre, *Optimization Algorithms on Matrix Manifolds*
    (2008), Sec. 3.6 and 4.1; pymanopt's ``Sphere``.
    """

    def __init__(self, n: int, radius: float = 1.0) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive integer (n >= 1), got {n!r}")
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius > 0:
            raise ValueError(f"radius: expected a positive number, got {radius!r}")
        if radius == float("inf"):
            raise ValueError(f"radius: expected a finite positive number, got {radius!r}")
        self.n = n
        self.radius = float(radius)

    def _signature(self) -> str:
        return f"n={self.n}" + ("" if self.radius == 1.0 else f", radius={self.radius}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n,)

    @property
    def dim(self) -> int:
        return self.n - 1

    @property
    def retractions(self) -> tuple[str, ...]:
        return ("exp", "projective")

    def _constraints(self, X: Tensor) -> list[tuple[str, Tensor]]:
        err = (torch.linalg.vector_norm(X, dim=-1) / self.radius - 1).abs()
        return [(f"the relative radius error | |X| / {self.radius:g} - 1 |", err)]

    def project(self, X: Tensor) -> Tensor:
        r"""``r X / |X|`` (the zero vector goes to :math:`r e_1`); O(n).

        Computed as :math:`r Y/\|Y\|` with :math:`Y = X/\max_i |X_i|` (the scale a constant
        for autograd: the map is homogeneous of degree 0, so the gradient is unchanged), so
        that the squares of the norm neither underflow nor overflow: a float32 vector of
        entries 1e-30 or 1e30 lands on the sphere. NaN entries stay NaN."""
        self.validate(X)
        scale = X.detach().abs().amax(dim=-1, keepdim=True)
        scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
        X = X / scale
        norm = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
        e1 = torch.zeros_like(X)
        e1[..., 0] = 1
        zero = norm == 0  # NaN entries stay NaN (a NaN norm is not zero)
        X = torch.where(zero, e1, X)
        norm = torch.where(zero, torch.ones_like(norm), norm)
        return self.radius * X / norm

    def validate(self, X: Tensor, name: str = "X") -> None:
        """As :meth:`Manifold.validate`, with the common case (a float tensor of trailing
        size ``n``) decided in two comparisons: it runs at every forward of a trivialization."""
        if (isinstance(X, Tensor) and X.ndim >= 1 and X.shape[-1] == self.n
                and (X.is_floating_point() or X.is_complex())):
            return
        super().validate(X, name)

    def _validate_pair(self, B: Tensor, V: Tensor, name: str) -> None:
        """Validate ``B`` and ``V`` (named ``name``), whose batch shapes must broadcast (one
        point with a batch of vectors, or the reverse). ``V`` may have another dtype than
        ``B`` (the maps compute in the promoted one and return that of ``B``), but not a
        complex one at a real ``B``, whose imaginary part that would drop."""
        self.validate(B, "B")
        self.validate(V, name)
        if V.is_complex() and not B.is_complex():
            raise ValueError(
                f"{name}: expected a real tensor at the real point B ({B.dtype}), got "
                f"{V.dtype}: a point of the real sphere has real tangents (results have the "
                "dtype of B)"
            )
        self._check_pair(B, V, name, same_dtype=False)  # the fused maps promote dtypes

    def proj_tangent(self, B: Tensor, V: Tensor) -> Tensor:
        r""":math:`V - B \operatorname{Re}\langle B, V\rangle / r^2`; O(n).

        One autograd node (one dot product and one pass each way). The batch shapes of ``B``
        and ``V`` broadcast."""
        self._validate_pair(B, V, "V")
        return tangent_radius(B, V, self.radius)

    def tangent(self, B: Tensor, X: Tensor) -> Tensor:
        """``proj_tangent(B, X)`` (the chart of the sphere is the identity)."""
        self._validate_pair(B, X, "X")
        return tangent_radius(B, X, self.radius)

    def retract(self, B: Tensor, V: Tensor, method: str | None = None) -> Tensor:
        """As :meth:`Manifold.retract`; each retraction is one fused autograd node, O(n). The
        batch shapes of ``B`` and ``V`` broadcast."""
        if method is not None and method not in ("exp", "projective"):
            method = self._method(method)  # raises, listing the choices
        self._validate_pair(B, V, "V")
        return self._retract(B, V, method or "exp")

    def _retract(self, B: Tensor, V: Tensor, method: str) -> Tensor:
        fn = exp_radius if method == "exp" else projective_radius
        return fn(B, V, self.radius)

    def trivialize(self, B: Tensor, X: Tensor, method: str) -> Tensor:
        r""":math:`R_B(P_B(X))`, the tangent projection and the retraction ``method`` in one
        autograd node, unchecked (see :meth:`Manifold.trivialize`); O(n) per vector."""
        fn = trivialize_exp_radius if method == "exp" else trivialize_projective_radius
        return fn(B, X, self.radius)

    def _inverse(self, method: str) -> Callable[[Tensor, Tensor], Tensor] | None:
        r = self.radius
        fn = sphere_log if method == "exp" else sphere_projective_inverse
        return lambda B, X: r * fn(B / r, X / r)

    def _sample(self, batch, generator, dtype, device, init) -> Tensor:
        if init != "haar":
            raise self._bad_init(init, ("haar",))
        g = torch.randn(*batch, self.n, generator=generator, dtype=dtype, device=device)
        return self.project(g)
