r"""Fused Riemannian steps for buckets of real Stiefel parameters.

The generic path of the Riemannian optimizers calls the manifold interface
(``proj_tangent``, ``inner``, ``retract``, ``transport``), each with its own checks and
temporaries. For :class:`~dtriv.manifolds.Stiefel` (tall; wide shapes are transposed)
the same formulas are evaluated here directly on the stacked batch ``(m, n, k)``:

* Riemannian gradient :math:`g = G - X \operatorname{sym}(X^T G)` as one batched
  product and one fused ``baddbmm`` (2 products of ``n x k`` by ``k x k``);
* the squared norm :math:`\langle g, g\rangle` as one batched dot product;
* the step :math:`Y = X + c\, d` with a per-point scalar ``c`` as one fused ``addcmul``;
* the QR retraction by :func:`dtriv.retractions.stiefel.qf` (Cholesky QR when the Gram
  matrix is near the identity, as it is for retraction steps; Householder otherwise);
  the other retractions by the manifold's own map;
* the transport by projection :math:`m - Q \operatorname{sym}(Q^T m)` (2 products).

The results equal the generic path (same formulas, evaluated in another order: they agree
to rounding). Cost per bucket: :math:`4 m n k^2` flops of products plus the retraction
(:math:`2 m n k^2 + m k^3/3` for Cholesky QR) and a few elementwise passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dtriv.manifolds.stiefel import Stiefel
from dtriv.retractions.stiefel import qf

__all__ = ["fast_stiefel", "moment_and_sq_norm", "riemannian_grad", "retract", "transport"]


_FUSED = ("proj_tangent", "inner", "retract", "_retract", "transport")


def fast_stiefel(manifold: object, X: Tensor) -> bool:
    """Whether the bucket (stacked points ``X``) takes the fused Stiefel path.

    Real :class:`Stiefel` buckets whose class does not override the maps evaluated here
    (a subclass that redefines ``proj_tangent``, ``retract``, ... gets the generic path,
    which calls its methods).
    """
    if not isinstance(manifold, Stiefel) or X.is_complex():
        return False
    cls = type(manifold)
    return all(getattr(cls, name) is getattr(Stiefel, name) for name in _FUSED)


def as_batch(manifold: Stiefel, X: Tensor) -> Tensor:
    """The tall view ``(m, n, k)`` of stacked points (transposed for wide manifolds)."""
    T = X.mT if manifold.wide else X
    return T.reshape((-1,) + tuple(T.shape[-2:]))


def _sym_(A: Tensor) -> Tensor:
    """``(A + A^T)/2`` of a batch of square matrices (a new tensor)."""
    return torch.add(A, A.mT).mul_(0.5)


def riemannian_grad(X: Tensor, G: Tensor) -> Tensor:
    r""":math:`G - X \operatorname{sym}(X^T G)` for tall batches ``(m, n, k)``."""
    return torch.baddbmm(G, X, _sym_(torch.bmm(X.mT, G)), alpha=-1)


def sq_norms(g: Tensor) -> Tensor:
    r"""``<g_i, g_i>`` per point of a batch ``(m, n, k)``, shape ``(m,)``."""
    flat = g.reshape(g.shape[0], -1)
    return torch.linalg.vecdot(flat, flat)


def retract(
    manifold: Stiefel, method: str, X: Tensor, V: Tensor, c: Tensor | float
) -> Tensor:
    r"""The retraction ``method`` at tall ``X`` of the step ``c V`` (``c``: a number or one
    per point, ``(m, 1, 1)``); for ``qr`` the step is one fused pass ``X + c V``."""
    if method == "qr":
        Y = torch.addcmul(X, V, c) if isinstance(c, Tensor) else torch.add(X, V, alpha=c)
        return qf(Y)
    step = V * c
    if manifold.wide:  # the manifold's maps take its own (wide) layout
        return manifold._retract(X.mT, step.mT, method).mT
    return manifold._retract(X, step, method)


def transport(Q: Tensor, m: Tensor) -> Tensor:
    r"""Transport by projection onto the tangent space at ``Q``: :math:`m - Q
    \operatorname{sym}(Q^T m)`."""
    return riemannian_grad(Q, m)


#: the squared norm of the Riemannian gradient is taken from the identity below only when
#: it keeps at least this fraction of |G|^2 (bounded cancellation); else it is computed
#: from the explicit gradient.
IDENTITY_MIN_FRACTION = 0.25


def moment_and_sq_norm(X: Tensor, G: Tensor, m: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    r"""The transported and updated moment and the squared Riemannian gradient norms.

    For tall points ``X`` (``(b, n, k)``, :math:`X^T X = I`), Euclidean gradients ``G`` and
    moments ``m`` stored at the previous points (not yet transported), returns

    .. math:: m' = P_X(\beta m + (1 - \beta) G)
                 = \beta\, \mathcal{T}(m) + (1 - \beta)\, \operatorname{grad},
              \qquad \|\operatorname{grad}\|^2 = \|G\|^2 - \|\operatorname{sym}(X^T G)\|^2,

    by linearity of the projection :math:`P_X(V) = V - X \operatorname{sym}(X^T V)` (the
    transport) and, for the norm, :math:`\langle P_X G, P_X G\rangle = \langle G, P_X G
    \rangle` (an orthogonal projection). The norm identity is used when it keeps at least
    :data:`IDENTITY_MIN_FRACTION` of :math:`\|G\|^2` for every point (so its cancellation
    costs at most a factor 4 of rounding); otherwise the gradient is formed explicitly.

    ``beta`` in ``[0, 1)``. Cost: two products :math:`X^T G`, :math:`X^T m` and one :math:`X S`
    (:math:`6 b n k^2` flops), against four for the projection of ``G`` and the transport.
    """
    Ag = torch.bmm(X.mT, G)
    Sg = _sym_(Ag)
    S = _sym_(torch.bmm(X.mT, m)).mul_(beta).add_(Sg, alpha=1 - beta)
    # beta m + (1 - beta) G - X S = (1 - beta) (M - X S / (1 - beta)), M = G + beta m/(1 - beta)
    M = torch.add(G, m, alpha=beta / (1 - beta))
    new = torch.baddbmm(M, X, S, alpha=-1 / (1 - beta)).mul_(1 - beta)
    G2 = sq_norms(G)
    sq = G2 - sq_norms(Sg)
    if not bool((sq >= IDENTITY_MIN_FRACTION * G2).all()):
        sq = sq_norms(riemannian_grad(X, G))
    return new, sq
