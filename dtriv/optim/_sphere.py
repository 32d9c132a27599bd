r"""Fused Riemannian steps for buckets of real sphere parameters.

The generic path of the Riemannian optimizers calls the manifold interface
(``proj_tangent``, ``inner``, ``retract``, ``transport``), each with its argument checks and
dispatch; on a sphere every map is O(n) per point, so these costs are most of a step. For
:class:`~dtriv.manifolds.Sphere` (radius :math:`r`) the same formulas are evaluated here
directly on the batch ``(m, n)`` of the points (rows), in place where the optimizer owns
the memory:

* the tangent projection :math:`P_x(v) = v - x\,\langle x, v\rangle / r^2`, which is also
  the transport, and the Riemannian gradient :math:`P_x(G)`;
* Adam's first moment and the transport of the previous one in one projection, by
  linearity: :math:`P_x(\beta m + (1 - \beta) G)` (:func:`moment_`), with the squared
  gradient norm :math:`\|P_x G\|^2 = \|G\|^2 - \langle x, G\rangle^2 / r^2`;
* the retractions of the step :math:`c\,V`: ``projective``
  :math:`r (x + cV) / \|x + cV\|`, and ``exp``
  :math:`\cos t\, x + \frac{\sin t}{t} c V` with :math:`t = |c| \|V\| / r`, scaled back to
  the radius as the generic path does (:func:`dtriv.optim._stiefel.settle_points`);
* for one point on CPU, the numbers of the step (dot products, norms) on the host, and the
  scalings near 1 as additions (:func:`dtriv.retractions.sphere._scale_`).

The functions have the signatures of their namesakes in :mod:`dtriv.optim._stiefel`, so
that the optimizers run either through one code path. The results equal the generic path
to rounding (the same formulas, evaluated in another order).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dtriv.manifolds.sphere import Sphere
from dtriv.retractions._common import compute_dtype, one_point_on_cpu
from dtriv.retractions.sphere import _cos_sinc_of, _rdot_fast, _scale_

from ._stiefel import _sq_norm_on_host

__all__ = [
    "as_batch",
    "batch_view",
    "fast_sphere",
    "gradient",
    "moment_",
    "project_",
    "retract_",
    "write_back",
]

_FUSED = ("proj_tangent", "inner", "retract", "_retract", "transport", "project")

#: the squared norm of the Riemannian gradient is taken from the identity only when it keeps
#: at least this fraction of |G|^2 (bounded cancellation); else from the explicit gradient
IDENTITY_MIN_FRACTION = 0.25


def fast_sphere(manifold: object, X: Tensor) -> bool:
    """Whether the bucket (stacked points ``X``) takes the fused sphere path: real
    :class:`Sphere` buckets in single or double precision whose class does not override the
    maps evaluated here."""
    if not isinstance(manifold, Sphere) or X.is_complex() or compute_dtype(X.dtype) != X.dtype:
        return False
    cls = type(manifold)
    return all(getattr(cls, name) is getattr(Sphere, name) for name in _FUSED)


def batch_view(manifold: Sphere, X: Tensor) -> tuple[Tensor, bool]:
    """The points of ``X`` as rows ``(m, n)`` for an in-place update, and whether that is a
    view (else a copy, which the caller writes back with :func:`write_back`)."""
    try:
        return X.view(-1, manifold.n), True
    except RuntimeError:
        return X.reshape(-1, manifold.n), False


def as_batch(manifold: Sphere, X: Tensor) -> Tensor:
    """The points of ``X`` as rows ``(m, n)`` (a view where the strides allow)."""
    return X.reshape(-1, manifold.n)


def write_back(manifold: Sphere, X: Tensor, batch: Tensor) -> None:
    """``X <- batch``, the inverse of :func:`batch_view` when it made a copy."""
    X.copy_(batch.view(X.shape))


def gradient(manifold: Sphere, X: Tensor, G: Tensor) -> Tensor:
    r"""The Riemannian gradient :math:`P_x(G) = G - x\,\langle x, G\rangle / r^2` per row."""
    return torch.addcmul(G, X, _rdot_fast(X, G), value=-1 / manifold.radius**2)


def project_(manifold: Sphere, X: Tensor, V: Tensor, scale: float = 1.0) -> Tensor:
    r"""``V <- scale * P_x(V)`` in place, per row; returns ``V``."""
    if scale != 1.0:
        V.mul_(scale)
    if one_point_on_cpu(X):
        return V.add_(X, alpha=-torch.dot(X[0], V[0]).item() / manifold.radius**2)
    return V.addcmul_(X, _rdot_fast(X, V), value=-1 / manifold.radius**2)


def moment_(
    manifold: Sphere, X: Tensor, G: Tensor, m: Tensor, beta: float, on_host: bool = False
) -> tuple[Tensor, Tensor | float]:
    r"""Adam's transported and updated first moment, written into ``m``, and the squared
    Riemannian gradient norms.

    For points ``X`` (rows, :math:`\|x\| = r`), Euclidean gradients ``G`` and moments ``m``
    stored at the previous points (not yet transported), overwrites ``m`` by
    :math:`m' = P_x(\beta m + (1 - \beta) G) = \beta\,\mathcal{T}(m) + (1 - \beta)
    \operatorname{grad}` (the transport is the projection, which is linear) and returns
    ``(m', sq)``, :math:`sq = \|P_x G\|^2 = \|G\|^2 - \langle x, G\rangle^2 / r^2` per row
    (``(m,)``; a Python float with ``on_host``, one point on CPU). The identity is used when
    it keeps at least :data:`IDENTITY_MIN_FRACTION` of :math:`\|G\|^2`, else the gradient is
    formed. Cost: two dot products, one ``lerp``, one pass and one norm per row.
    """
    r2 = manifold.radius**2
    if on_host:
        a = torch.dot(X[0], G[0]).item()
        g2 = torch.linalg.vector_norm(G).item() ** 2
        N = project_(manifold, X, m.lerp_(G, 1 - beta))
        sq = g2 - a * a / r2
        if not sq >= IDENTITY_MIN_FRACTION * g2:  # (also for NaN)
            sq = torch.linalg.vector_norm(torch.add(G, X, alpha=-a / r2)).item() ** 2
        return N, sq
    a = (X * G).sum(-1)
    G2 = torch.linalg.vector_norm(G, dim=-1).square_()
    project_(manifold, X, m.lerp_(G, 1 - beta))
    sq = G2 - a.square_().div_(r2)
    if not bool((sq >= IDENTITY_MIN_FRACTION * G2).all()):
        sq = torch.linalg.vector_norm(gradient(manifold, X, G), dim=-1).square_()
    return m, sq


def retract_(
    manifold: Sphere, method: str, X: Tensor, V: Tensor, c: Tensor | float, trusted: bool
) -> None:
    r"""Overwrite the points ``X`` (rows) by the retraction ``method`` of the step ``c V``
    (``c``: a number or one per point, ``(m, 1)``); ``trusted`` is unused (both retractions
    return to the sphere from any point).

    ``projective``: :math:`r (x + cV)/\|x + cV\|`. ``exp``: :math:`\cos t\,x +
    \frac{\sin t}{t}\,cV`, :math:`t = |c|\,\|V\|/r`, then :math:`r x / \|x\|`, as the
    generic path settles the points of this retraction (a step is tangent only to the
    rounding of its projection)."""
    r = manifold.radius
    host = not isinstance(c, Tensor) and one_point_on_cpu(X)
    if method == "exp":
        if host:  # (the norm without underflow: entries below 1e-19 in float32 square to 0)
            cos, sinc = _cos_sinc_of(abs(c) * _sq_norm_on_host(V) ** 0.5 / r)
            _scale_(X, cos).add_(V, alpha=sinc * c)
        else:
            cV = V * c
            t = torch.linalg.vector_norm(cV, dim=-1, keepdim=True).div_(r)
            cos, sinc = torch.cos(t), torch.sinc(t.div_(math.pi))  # sinc(x) = sin(pi x)/(pi x)
            X.mul_(cos).addcmul_(cV, sinc)
    elif isinstance(c, Tensor):
        X.addcmul_(V, c)
    else:
        X.add_(V, alpha=c)
    if host:
        _scale_(X, r / torch.linalg.vector_norm(X).item())
    else:
        X.mul_(torch.linalg.vector_norm(X, dim=-1, keepdim=True).reciprocal_().mul_(r))

