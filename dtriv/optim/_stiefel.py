r"""Fused Riemannian steps for buckets of real Stiefel parameters.

The generic path of the Riemannian optimizers calls the manifold interface
(``proj_tangent``, ``inner``, ``retract``, ``transport``), each with its own checks and
temporaries. For :class:`~dtriv.manifolds.Stiefel` (tall; wide shapes are transposed)
the same formulas are evaluated here directly on the stacked batch ``(m, n, k)``, in place
where the optimizer owns the memory:

* Riemannian gradient :math:`g = G - X \operatorname{sym}(X^T G)` and the transport by
  projection :math:`m - Q \operatorname{sym}(Q^T m)`, fused by linearity of the projection
  (:func:`moment_and_sq_norm_`: three ``n x k`` by ``k x k`` products for both);
* the squared norm :math:`\langle g, g\rangle` from :math:`\|G\|^2 - \|\operatorname{sym}
  (X^T G)\|^2` (one reduction over ``G``);
* for one point on CPU, the numbers of the step (norms, the bound, Adam's second moment
  and step size) on the host: a dozen tensor operations on single numbers cost more than
  the products of a (32, 32) point;
* the QR retraction of :math:`Y = X + c V` by recursive block Cholesky QR
  (:func:`block_cholesky_qf_`, :math:`2 n k^2` flops, all products; for a small step the
  blocks' inverse Cholesky factors by their series about the identity) when a cheap bound
  proves it safe (:func:`safe_for_block_qr`) and a randomized test finds the points
  orthonormal (:func:`near_orthonormal`; one small point: the exact test), else by
  :func:`dtriv.retractions.stiefel.qf` (Cholesky QR with a Gram check, Householder
  otherwise); the other retractions by the manifold's own map.

The results equal the generic path (same formulas, evaluated in another order: they agree
to rounding).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from dtriv.manifolds.sphere import Sphere
from dtriv.manifolds.stiefel import Stiefel
from dtriv.retractions._common import (
    cached_eye,
    compute_dtype,
    eps,
    no_host_reads,
    one_point_on_cpu,
)
from dtriv.retractions._layout import transposable_empty
from dtriv.retractions._scratch import Arena
from dtriv.retractions.stiefel import qf

__all__ = [
    "PROJECTING",
    "as_batch",
    "batch_view",
    "block_cholesky_qf_",
    "cross",
    "drift_tolerance",
    "fast_stiefel",
    "gradient",
    "moment_",
    "moment_and_sq_norm",
    "moment_and_sq_norm_",
    "near_orthonormal",
    "project_",
    "retract",
    "retract_",
    "riemannian_grad",
    "safe_for_block_qr",
    "settle",
    "settle_points",
    "transport",
    "write_back",
]


_FUSED = ("proj_tangent", "inner", "retract", "_retract", "transport")


#: the retractions whose result has orthonormal columns whatever the point they start from
#: (projections of ``X + V``). The others (``exp``, ``exp_canonical``, ``cayley``, the square
#: group's ``expm`` and ``cayley``) carry the point's error over, and the exponential maps
#: of a rectangular Stiefel manifold amplify it at every step (they read :math:`X^T V`,
#: skew only on the manifold): the optimizers :func:`settle` their points.
PROJECTING = frozenset({"qr", "polar", "polar_ns"})


def fast_stiefel(manifold: object, X: Tensor) -> bool:
    """Whether the bucket (stacked points ``X``) takes the fused Stiefel path.

    Real :class:`Stiefel` buckets whose class does not override the maps evaluated here
    (a subclass that redefines ``proj_tangent``, ``retract``, ... gets the generic path,
    which calls its methods).
    """
    if not isinstance(manifold, Stiefel) or X.is_complex() or compute_dtype(X.dtype) != X.dtype:
        return False  # half precision: the generic path computes the maps in float32
    cls = type(manifold)
    return all(getattr(cls, name) is getattr(Stiefel, name) for name in _FUSED)


def as_batch(manifold: Stiefel, X: Tensor) -> Tensor:
    """The tall view ``(m, n, k)`` of stacked points (transposed for wide manifolds)."""
    T = X.mT if manifold.wide else X
    return T.reshape((-1,) + tuple(T.shape[-2:]))


def batch_view(manifold: Stiefel, X: Tensor) -> tuple[Tensor, bool]:
    """The tall batch ``(m, n, k)`` of ``X`` for an in-place update, and whether it is a view.

    When the batch dimensions of ``X`` cannot be merged into one view (permuted strides), it
    is a copy, which the caller writes back with :func:`write_back`.
    """
    T = X.mT if manifold.wide else X
    shape = (-1,) + tuple(T.shape[-2:])
    try:
        return T.view(shape), True
    except RuntimeError:
        return T.reshape(shape), False


def write_back(manifold: Stiefel, X: Tensor, batch: Tensor) -> None:
    """``X <- batch``, the inverse of :func:`batch_view` when it made a copy."""
    T = X.mT if manifold.wide else X
    T.copy_(batch.view(T.shape))


def _sym2_(A: Tensor, out: Tensor | None = None) -> Tensor:
    """``A + A^T`` of a batch of square matrices, twice the symmetric part (into ``out``, else
    a new tensor): the products and norms that read it take the factor 1/2 themselves (one
    pass fewer than forming the symmetric part; scaling by a power of two is exact, so the
    results are the same to the bit).

    ``A`` is read by columns: give it padded rows where they alias (:func:`cross`; see
    :mod:`dtriv.retractions._layout`: 2x faster for a ``512 x 512`` ``A``, 4x at 1024).
    """
    return torch.add(A, A.mT, out=out)


def cross(X: Tensor, Y: Tensor, arena: Arena | None = None) -> Tensor:
    r""":math:`X^T Y` for tall batches ``(b, n, k)``, ``(b, n, k')``, written into rows that
    keep its transposed read fast (padded where ``k'`` float rows alias), for :func:`_sym2_`;
    from ``arena`` when given."""
    shape = (X.shape[0], X.shape[-1], Y.shape[-1])
    return torch.bmm(X.mT, Y, out=transposable_empty(shape, X, arena))


def _sym2_cross(X: Tensor, V: Tensor, arena: Arena) -> Tensor:
    """``2 sym(X^T V)`` for tall batches, the product and the sum in scratch from ``arena``."""
    return _sym2_(cross(X, V, arena), out=arena.empty(X.shape[:1] + X.shape[-1:] * 2))


def riemannian_grad(X: Tensor, G: Tensor) -> Tensor:
    r""":math:`G - X \operatorname{sym}(X^T G)` for tall batches ``(m, n, k)`` (a new tensor;
    the ``k x k`` temporaries in scratch, reused from call to call)."""
    with Arena(X) as arena:
        return torch.baddbmm(G, X, _sym2_cross(X, G, arena), alpha=-0.5)


def gradient(manifold: Stiefel, X: Tensor, G: Tensor) -> Tensor:
    """:func:`riemannian_grad` with the signature of :func:`dtriv.optim._sphere.gradient`."""
    return riemannian_grad(X, G)


def project_(manifold: Stiefel, X: Tensor, V: Tensor, scale: float = 1.0) -> Tensor:
    r"""``V <- scale * P_X(V) = scale (V - X sym(X^T V))`` in place for tall batches;
    returns ``V``. Two products; the ``k x k`` temporaries in scratch."""
    with Arena(X) as arena:
        return V.baddbmm_(X, _sym2_cross(X, V, arena), beta=scale, alpha=-0.5 * scale)


def sq_norms(g: Tensor) -> Tensor:
    r"""``<g_i, g_i>`` per point of a batch ``(m, n, k)``, shape ``(m,)``."""
    # one reduction kernel (vecdot materializes the elementwise product first)
    return torch.linalg.vector_norm(g, dim=(-2, -1)).square()


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
        Q = manifold._retract(X.mT, step.mT, method).mT
    else:
        Q = manifold._retract(X, step, method)
    return Q if method in PROJECTING else settle(manifold, Q)


#: the most Newton--Schulz steps :func:`settle` and :func:`settle_points` take on a point
SETTLE_STEPS = 3


def settle_points(manifold: object, method: str, X: Tensor) -> Tensor:
    """The generic path's :func:`settle`: points ``X`` of any manifold in its own layout,
    after a retraction that is not a projection.

    * Stiefel, a retraction not in :data:`PROJECTING`: polished until the constraint error
      is at most :func:`drift_tolerance` (at most :data:`SETTLE_STEPS` steps; these are the
      complex, half-precision or subclassed buckets, which the randomized test does not
      cover).
    * Sphere, ``exp``: scaled back to the radius, ``r X/|X|`` (O(n)). The exponential map
      keeps the norm only for a tangent step, and a step is tangent only up to the rounding
      of its projection: when the Riemannian gradient is at rounding level (a loss constant
      on the sphere, as a weight-norm penalty), Adam's per-point scaling makes that residue
      a step of length ``lr``, normal to the sphere as much as not (measured, float32: ``|X|``
      at 1.16 after 100 steps of ``1e-3 |X|^2``).
    * other manifolds' points unchanged.
    """
    if isinstance(manifold, Stiefel) and method not in PROJECTING:
        for _ in range(SETTLE_STEPS):
            X = manifold.polish(X)
            if no_host_reads(X) or not bool(
                    (manifold.distance(X) > drift_tolerance(manifold._t(X))).any()):
                break
        return X
    if isinstance(manifold, Sphere) and method == "exp":
        return manifold.project(X)
    return X


def drift_tolerance(Q: Tensor) -> float:
    r"""The estimate of :math:`\|Q^T Q - I\|_F` above which :func:`settle` polishes: ``4 k
    eps``, four to eight times that of a freshly orthonormalized point (measured, float32
    and float64, ``k`` from 4 to 512)."""
    return 4 * Q.shape[-1] * eps(Q.dtype)


def settle(manifold: Stiefel, Q: Tensor) -> Tensor:
    r"""The tall points ``Q`` (``(b, n, k)``, real), polished (:meth:`Stiefel.polish`, a
    Newton--Schulz step, error :math:`\epsilon \to O(\epsilon^2)`) while the randomized
    test of :func:`near_orthonormal` finds one farther than :func:`drift_tolerance` from
    the manifold (at most :data:`SETTLE_STEPS` steps: one polish from an error of 1e-2, as
    a non-tangent step of length 0.01 leaves, ends at 1.5e-4, above the float32
    tolerance of ``check``).

    After a retraction that is not a projection (not in :data:`PROJECTING`) the error of
    the point carries over to the next, and the exponential maps of a rectangular Stiefel
    manifold multiply it by about :math:`1 + \eta \|G\|` per step: without this a float32
    run of SGD with ``exp`` reached NaN within 400 steps. Cost: the test reads ``Q`` once;
    a polish, two ``n x k x k`` products, runs only when the error has grown.
    """
    for _ in range(SETTLE_STEPS):
        if bool(_near_orthonormal(Q, drift_tolerance(Q))):
            break
        P = manifold.polish(Q.mT if manifold.wide else Q)
        Q = P.mT if manifold.wide else P
    return Q


def transport(Q: Tensor, m: Tensor) -> Tensor:
    r"""Transport by projection onto the tangent space at ``Q``: :math:`m - Q
    \operatorname{sym}(Q^T m)`."""
    return riemannian_grad(Q, m)


#: the squared norm of the Riemannian gradient is taken from the identity below only when
#: it keeps at least this fraction of |G|^2 (bounded cancellation); else it is computed
#: from the explicit gradient.
IDENTITY_MIN_FRACTION = 0.25


def moment_and_sq_norm_(
    X: Tensor, G: Tensor, m: Tensor, beta: float, on_host: bool = False
) -> tuple[Tensor, Tensor | float]:
    r"""The transported and updated moment, written into ``m``, and the squared Riemannian
    gradient norms.

    For tall points ``X`` (``(b, n, k)``, :math:`X^T X = I`), Euclidean gradients ``G`` and
    moments ``m`` stored at the previous points (not yet transported), overwrites ``m`` by

    .. math:: m' = P_X(\beta m + (1 - \beta) G)
                 = \beta\, \mathcal{T}(m) + (1 - \beta)\, \operatorname{grad}
                 = N - X S, \quad N = \beta m + (1 - \beta) G,\
                 S = \operatorname{sym}(X^T N),

    by linearity of the projection :math:`P_X(V) = V - X \operatorname{sym}(X^T V)` (the
    transport), and returns ``(m', sq)`` with :math:`sq = \|\operatorname{grad}\|^2 =
    \|G\|^2 - \|\operatorname{sym}(X^T G)\|^2` (:math:`\langle P_X G, P_X G\rangle =
    \langle G, P_X G \rangle` for an orthogonal projection). The norm identity is used when
    it keeps at least :data:`IDENTITY_MIN_FRACTION` of :math:`\|G\|^2` for every point (so
    its cancellation costs at most a factor 4 of rounding); otherwise the gradient is
    formed explicitly.

    ``beta`` in ``[0, 1)``; ``m`` must not overlap ``X`` or ``G``. Cost: two products
    :math:`X^T G`, :math:`X^T N` and one :math:`X S` (:math:`6 b n k^2` flops), one
    ``lerp`` and one reduction pass over ``G``; no ``n x k`` temporaries.

    ``on_host`` (one point, on CPU): ``sq`` is a Python float, the two norms read on the host
    and combined there (the tensor formula is ten operations on single numbers, about
    35 us at ``(32, 32)``, a tenth of the whole step).
    """
    with Arena(X) as arena:  # the k x k temporaries, reused from step to step
        Sg2 = _sym2_cross(X, G, arena)  # 2 sym(X^T G)
        N = m.lerp_(G, 1 - beta)
        S2 = _sym2_cross(X, N, arena)  # 2 S
        N.baddbmm_(X, S2, alpha=-0.5)
        if on_host:
            g2 = torch.linalg.vector_norm(G).item() ** 2
            sq = g2 - 0.25 * torch.linalg.vector_norm(Sg2).item() ** 2
        else:
            G2 = sq_norms(G)
            sq = G2 - 0.25 * sq_norms(Sg2)
    if on_host:
        if not sq >= IDENTITY_MIN_FRACTION * g2:  # (also for NaN)
            sq = torch.linalg.vector_norm(riemannian_grad(X, G)).item() ** 2
        return m, sq
    if not bool((sq >= IDENTITY_MIN_FRACTION * G2).all()):
        sq = sq_norms(riemannian_grad(X, G))
    return m, sq


def moment_(manifold: Stiefel, X: Tensor, G: Tensor, m: Tensor, beta: float,
            on_host: bool = False) -> tuple[Tensor, Tensor | float]:
    """:func:`moment_and_sq_norm_` with the signature of :func:`dtriv.optim._sphere.moment_`."""
    return moment_and_sq_norm_(X, G, m, beta, on_host)


def moment_and_sq_norm(X: Tensor, G: Tensor, m: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """:func:`moment_and_sq_norm_` into a new tensor (``m`` is left unchanged)."""
    return moment_and_sq_norm_(X, G, m.clone(memory_format=torch.contiguous_format), beta)


# --------------------------------------------------------------------------- QR


#: width of the column blocks that :func:`block_cholesky_qf_` orthonormalizes directly
BLOCK_QR_BASE = 64
#: the width for batches of at least :data:`BLOCK_QR_BATCHED_FROM` points: batched LAPACK
#: calls cost per matrix (a 64 x 64 Cholesky and triangular inverse about 90 us on CPU, two
#: 32 x 32 ones about 30 us), so narrower blocks pay off once the batch is large, while the
#: products of the extra recursion level cost per call (measured: 20 x (256, 256), the QR
#: 15.5 ms at 64 and 12.9 ms at 32; one (512, 512), 4.0 ms at 64 and 4.3 ms at 32)
BLOCK_QR_BASE_BATCHED = 32
BLOCK_QR_BATCHED_FROM = 8
#: the widths for a ``Y`` near orthonormal columns (``near_identity=True``), whose blocks take
#: the series of :func:`_near_identity_factor` (products only, no LAPACK call): wider blocks
#: then pay (measured, float32, ``c |V|_F = 1e-3``, in 512 x 512 products: one (512, 512)
#: 1.63-1.79 at 128, 1.85-2.21 at 64, 1.97-2.26 with the Cholesky blocks; (1024, 256)
#: 0.96-1.02 at 128, 1.04-1.12 at 64, 1.17-1.28 before; 20 x (256, 256) 4.8-5.0 at 64, 5.2 at
#: 128, 6.0-6.3 before)
SERIES_BASE = 128
SERIES_BASE_BATCHED = 64
#: :func:`safe_for_block_qr` admits steps with ``c^2 |V|_F^2`` at most this bound: then
#: ``kappa(X + c V)^2 <= 3``, the bound :func:`dtriv.retractions.stiefel.cholesky_qf` admits
BLOCK_QR_MAX_STEP = 2.0

#: up to this many rows per column a block's q-factor is one triangular solve with ``Y``;
#: taller blocks form the inverse factor and take a product (measured, float32, one
#: matrix: 64 x 64 33 against 44 us, (64, 32) 18 against 24, (128, 64) a tie, (256, 64) 93
#: against 60; 20 x (64, 64) 435 against 515)
SOLVE_MAX_ROWS_PER_COLUMN = 2


def _series_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    r"""The largest :math:`\|E\|_F` for which :func:`_near_identity_factor` takes its first-order
    term alone, and with one Newton step: :math:`\sqrt{\epsilon}/8` and
    :math:`\epsilon^{1/4}/8` (float32 4.3e-5 and 2.3e-3, float64 1.9e-9 and 1.5e-5), where
    the neglected terms, :math:`3\|E\|_F^2` and :math:`27\|E\|_F^4`, are below
    :math:`\epsilon / 20`."""
    u = eps(dtype)
    return math.sqrt(u) / 8, u**0.25 / 8


def _first_order_factor(E: Tensor) -> Tensor:
    r""":math:`I - \Phi(E)^T` for a batch of symmetric ``E``, with :math:`\Phi(E)` the strict
    lower triangle of ``E`` plus half its diagonal: the upper triangle of ``-E`` off the
    diagonal, :math:`1 - E_{ii}/2` on it (a new tensor)."""
    Z = torch.triu(E).neg_()
    Z.diagonal(dim1=-2, dim2=-1).mul_(0.5).add_(1)
    return Z


def _near_identity_factor(G: Tensor) -> Tensor | None:
    r"""The upper triangular :math:`Z` with a positive diagonal and :math:`Z^T G Z = I`
    (:math:`Z = L^{-T}`, :math:`L L^T = G` the Cholesky factor) of a batch of Gram matrices
    :math:`G = I + E` near the identity, by products alone; ``None`` when ``E`` is too large
    for that (then nothing was computed but :math:`\|E\|_F`).

    From :math:`L = I + \Phi(E) + O(E^2)` (:math:`\Phi`: the strict lower triangle plus
    half the diagonal, so that :math:`\Phi(E) + \Phi(E)^T = E`), the first-order factor is
    :math:`Z_1 = I - \Phi(E)^T` (:func:`_first_order_factor`), with
    :math:`\|Z_1^T G Z_1 - I\|_F \le 3\|E\|_F^2`. A Newton step squares that error:
    :math:`E_1 = Z_1^T G Z_1 - I`, :math:`Z = Z_1 (I - \Phi(E_1)^T)` (three ``w x w``
    products), :math:`O(27\|E\|_F^4)`. Which of the two, or neither, is decided by the
    largest :math:`\|E\|_F` of the batch (one host read) against
    :func:`_series_tolerances`: what is neglected is then below rounding, and :math:`Y Z`
    equals the q-factor of :math:`Y` (:math:`Y^T Y = G`) to rounding. Measured, float32:
    for one 64 x 64 block 10 against 46 us for the Cholesky factorization and the
    triangular inverse; for 20 blocks of 32 x 32, 20 against 150 us.
    """
    E = torch.sub(G, cached_eye(G.shape[-1], G.dtype, G.device))
    size = torch.linalg.vector_norm(E) if E.shape[0] == 1 else (
        torch.linalg.vector_norm(E, dim=(-2, -1)).amax())
    size = size.item()
    first, newton = _series_tolerances(G.dtype)
    if not size <= newton:  # (a NaN too: the Cholesky route reports it)
        return None
    Z = _first_order_factor(E)
    if size > first:
        E1 = torch.bmm(Z.mT, torch.bmm(G, Z))
        E1.diagonal(dim1=-2, dim2=-1).sub_(1)
        Z = torch.bmm(Z, _first_order_factor(E1))
    return Z


def _cholesky_qf_block_(Y: Tensor, Q: Tensor, infos: list[Tensor], arena: Arena) -> None:
    # Q <- Y L^{-T}, L = chol(Y^T Y): on CPU, with L^{-T} by its series about the identity
    # when Y^T Y is close enough to it (_near_identity_factor); else for a block at most
    # twice as tall as wide a triangular solve, and for a taller one the w x w inverse
    # explicit (a solve against I) and the n x w work one product (into Q directly when Q is
    # not Y)
    b, n, w = Y.shape
    G = torch.bmm(Y.mT, Y, out=arena.empty((b, w, w)))
    Z = _near_identity_factor(G) if Y.device.type == "cpu" else None
    if Z is None:
        L, info = torch.linalg.cholesky_ex(G)
        infos.append(info)
        if n <= SOLVE_MAX_ROWS_PER_COLUMN * w:
            torch.linalg.solve_triangular(L.mT, Y, upper=True, left=False, out=Q)
            return
        eye = cached_eye(L.shape[-1], L.dtype, L.device)
        Z = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False).mT
    if Q is Y:
        Y.copy_(torch.bmm(Y, Z, out=arena.empty((b, n, w))))
    else:
        torch.bmm(Y, Z, out=Q)


def _block_qf_(Y: Tensor, Q: Tensor, base: int, infos: list[Tensor], arena: Arena) -> None:
    # the q-factor of Y into Q (Y itself, or another tensor: Y is then overwritten)
    b, k = Y.shape[0], Y.shape[-1]
    if k <= base:
        _cholesky_qf_block_(Y, Q, infos, arena)
        return
    h = k // 2
    Y1, Y2 = Y[..., :h], Y[..., h:]
    Q1, Q2 = (Y1, Y2) if Q is Y else (Q[..., :h], Q[..., h:])
    _block_qf_(Y1, Q1, base, infos, arena)
    R12 = torch.bmm(Q1.mT, Y2, out=arena.empty((b, h, k - h)))
    Y2.baddbmm_(Q1, R12, alpha=-1)  # Y2 - Q1 Q1^T Y2
    _block_qf_(Y2, Q2, base, infos, arena)


def block_cholesky_qf_(Y: Tensor, base: int | None = None, out: Tensor | None = None,
                       near_identity: bool = False) -> bool:
    r"""Overwrite the tall batch ``Y`` (``(b, n, k)``, real) by its q-factor with diag(R) > 0;
    with ``out`` (a tensor of the shape of ``Y``, which may be a strided view), write the
    q-factor there and use ``Y`` as scratch (its values are lost): each block's last
    product then goes to ``out`` directly instead of through a temporary copied back
    (measured: the QR of a (512, 512) point 6 to 8% faster).

    Recursive block Cholesky QR (block classical Gram–Schmidt with Cholesky QR on the
    blocks): with :math:`Y = [Y_1, Y_2]` split at :math:`h = \lfloor k/2 \rfloor`,

    .. math:: Q_1 = \operatorname{qf}(Y_1), \qquad R_{12} = Q_1^T Y_2, \qquad
              Q_2 = \operatorname{qf}(Y_2 - Q_1 R_{12}),

    recursively down to blocks of width ``base``, which take Cholesky QR
    (:math:`Q = Y L^{-T}`, :math:`L L^T = Y^T Y`, the ``w x w`` inverse explicit; on CPU,
    when :math:`Y^T Y` is that close to the identity, :math:`L^{-T}` by its series,
    :func:`_near_identity_factor`, which is exact to rounding there). The default ``base`` is
    :data:`BLOCK_QR_BASE`, or :data:`BLOCK_QR_BASE_BATCHED` for batches of at least
    :data:`BLOCK_QR_BATCHED_FROM`; with ``near_identity`` (the caller knows that ``Y`` has
    nearly orthonormal columns, :math:`\|Y^T Y - I\|` at most about
    :func:`_series_tolerances`' second bound: a small step from an orthonormal point), the
    wider :data:`SERIES_BASE` / :data:`SERIES_BASE_BATCHED`, where the blocks cost products
    alone. ``near_identity`` only picks the widths: each block takes the series when its own
    Gram matrix admits it, and Cholesky QR otherwise. This is the QR factorization
    :math:`Y = [Q_1, Q_2] \begin{bmatrix} R_{11} & R_{12} \\ 0 & R_{22} \end{bmatrix}`
    with a positive diagonal, so ``Q`` is the unique q-factor (the same as Householder's).
    Cost: :math:`2 n k^2` flops in products plus ``k / base`` Cholesky factorizations of
    ``base x base`` (or their series: products of ``base x base``); no Gram matrix of the full
    width (Cholesky QR with a full Gram product and a triangular solve: :math:`3 n k^2`,
    the solve at a fraction of the product rate). Its orthogonality error
    is that of Cholesky QR, :math:`O(\kappa(Y)^2 \epsilon)`: use it only for well
    conditioned ``Y`` (:func:`safe_for_block_qr`).

    Returns whether every block's Cholesky factorization succeeded (``False`` only for a
    rank-deficient or non-finite ``Y``; the result is then garbage; a block that took the
    series has a finite Gram matrix near the identity).
    """
    if out is not None and out.shape != Y.shape:
        raise ValueError(
            f"out: expected the shape of Y, {tuple(Y.shape)}, got {tuple(out.shape)}")
    infos: list[Tensor] = []
    with Arena(Y) as arena:  # the products' temporaries, reused from call to call
        if base is None:
            batched = Y.shape[0] >= BLOCK_QR_BATCHED_FROM
            if near_identity:
                base = SERIES_BASE_BATCHED if batched else SERIES_BASE
            else:
                base = BLOCK_QR_BASE_BATCHED if batched else BLOCK_QR_BASE
        _block_qf_(Y, Y if out is None else out, base, infos, arena)
    if not infos:  # every block took the series
        return True
    return not bool((infos[0] if len(infos) == 1 else torch.stack(infos)).any())


def safe_for_block_qr(V: Tensor, c: Tensor | float) -> bool:
    r"""Whether :math:`Y = X + c V` is well conditioned for every point, given that ``X`` has
    orthonormal columns and ``V`` (``(b, n, k)``) is tangent at ``X``.

    Then :math:`Y^T Y = I + c^2 V^T V` and :math:`\|V^T V\|_2 \le \|V\|_F^2`, so
    :math:`c^2 \|V\|_F^2 \le` :data:`BLOCK_QR_MAX_STEP` bounds :math:`\kappa(Y)^2 \le 3`
    (the eigenvalues of :math:`Y^T Y` lie in :math:`[1, 1 + c^2 \|V\|_F^2]`), the bound
    under which :func:`dtriv.retractions.stiefel.cholesky_qf` uses Cholesky QR.
    One reduction pass over ``V``.
    """
    return bool(_largest_step(V, c) <= BLOCK_QR_MAX_STEP)


def _largest_step(V: Tensor, c: Tensor | float) -> Tensor:
    r"""The largest :math:`c^2 \|V\|_F^2` of the batch, a 0-d tensor (NaN if any is)."""
    return (sq_norms(V) * (c.reshape(-1) ** 2 if isinstance(c, Tensor) else c * c)).amax()


#: how many Gaussian probes :func:`near_orthonormal` uses
NEAR_ORTHONORMAL_PROBES = 8
#: :func:`near_orthonormal` admits points whose estimate of :math:`\|X^T X - I\|_F` is at
#: most this (a norm that small would mean :math:`\kappa(X)^2 \le 1.003`; how much larger
#: norms can pass is in its doc). The optimizer's own float32 points estimate at 1e-5 to
#: 3e-5 (measured after hundreds of steps at (512, 512), (2048, 512) and (16384, 256)).
NEAR_ORTHONORMAL_TOL = 1e-3


@functools.lru_cache(maxsize=16)
def _probes(k: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Fixed Gaussian probes ``R^T`` (``p x k``, dtype of the points) and their squared norms
    in double precision (read-only)."""
    g = torch.Generator().manual_seed(0x5EED)
    Rt = torch.randn(NEAR_ORTHONORMAL_PROBES, k, generator=g, dtype=torch.float64)
    Rt = Rt.to(dtype=dtype, device=device)
    return Rt, Rt.to(torch.float64).square().sum(dim=-1)


def near_orthonormal(X: Tensor, tol: float = NEAR_ORTHONORMAL_TOL) -> bool:
    r"""Whether every point of the tall batch ``X`` (``(b, n, k)``, real) has
    :math:`\|X^T X - I\|_F` at most about ``tol``, by a randomized test that reads ``X``
    once.

    With :math:`E = X^T X - I` and fixed Gaussian probes :math:`r_1, \dots, r_p`
    (:data:`NEAR_ORTHONORMAL_PROBES`), :math:`q_j = \|X r_j\|^2 - \|r_j\|^2 = r_j^T E r_j`
    has mean :math:`\operatorname{tr} E` and variance :math:`2\|E\|_F^2`, so
    :math:`\sqrt{\sum_j q_j^2 / (2p)}` estimates :math:`\|E\|_F` (from above, on
    average). A point passes when that estimate is at most ``tol``. The norms are summed in
    double precision: in float32 their cancellation alone reads as 1e-4 to 4e-4.

    An ``E`` far above ``tol`` passes only when all ``p`` quadratic forms are small at once.
    For a rank-one ``E`` (:math:`q_j / \|E\|_F` chi-square with one degree of freedom; the
    indefinite ``E`` tried passed less often) the chance, measured over :math:`2 \cdot
    10^7` draws, is :math:`7 \cdot 10^{-4}` at :math:`\|E\|_F = 10\,\mathrm{tol}`,
    :math:`5 \cdot 10^{-5}` at 20, :math:`1.5 \cdot 10^{-6}` at 50, falling as the fourth
    power beyond. These chances are over writes that do not depend on the probes. The probes
    are fixed (drawn once from a fixed seed, so that runs and resumes take the same paths bit
    for bit): a write built against them passes, e.g. :math:`W = Q(I + a\,u u^T)` with
    :math:`u` orthogonal to all ``p`` probes (possible once ``k > p``), and its step then
    leaves the manifold. Natural writes (a scaled or repeated column, a spectrum spread over
    decades, a random low-rank error, conditions up to 1e7) were all caught.

    This catches writes that the optimizer's version counters cannot see:
    ``p.data.copy_(W)`` changes a parameter without bumping its version (see
    :func:`retract_`). Cost: one product with the ``k x p`` probes (a pass over ``X``) and a
    few reductions over ``b x n x p`` numbers.
    """
    return bool(_near_orthonormal(X, tol))


def _near_orthonormal(X: Tensor, tol: float = NEAR_ORTHONORMAL_TOL) -> Tensor:
    """The test of :func:`near_orthonormal` as a 0-d boolean tensor (not read)."""
    Rt, r2 = _probes(X.shape[-1], X.dtype, X.device)
    # (R^T X^T) rather than X R: the product with the narrow side first runs about 2x faster
    q = torch.linalg.vector_norm(torch.matmul(Rt, X.mT), dim=-1, dtype=torch.float64)
    q = q.square_().sub_(r2)  # (b, p): r_j^T E r_j
    bound = math.sqrt(2 * NEAR_ORTHONORMAL_PROBES) * tol
    return (torch.linalg.vector_norm(q, dim=-1) <= bound).all()


#: up to this many entries, the test of one point on CPU in :func:`retract_` reads
#: :math:`\|X^T X - I\|_F` exactly (one small product) instead of the probes of
#: :func:`near_orthonormal` (measured, float32: 17 against 30 us at (32, 32), 28 against
#: 40 at (64, 64), 14 against 21 at (128, 32); 76 against 48 at (128, 128))
EXACT_TEST_MAX_NUMEL = 64 * 64


def _sq_norm_on_host(V: Tensor) -> float:
    r""":math:`\|V\|_F^2` as a Python float, without underflow: ``vector_norm`` squares the
    entries in the tensor's precision, so a float32 ``V`` of entries below about 1e-19 reads
    0, and a huge step ``c V`` would pass :func:`safe_for_block_qr`'s bound. Below that
    range the norm is taken of ``V`` scaled by its largest entry (rare: one more pass)."""
    norm = torch.linalg.vector_norm(V).item()
    if norm < _UNDERFLOW_NORM.get(V.dtype, 0.0) and norm == norm:  # (not NaN)
        largest = V.abs().amax().item()
        if largest > 0:
            norm = largest * torch.linalg.vector_norm(V / largest).item()
    return norm * norm


#: norms below which the squares of some entries may have underflowed:
#: :math:`\sqrt{\text{tiny}}` times a margin of 1e3 (float32 1e-16, float64 1e-151)
_UNDERFLOW_NORM = {dtype: 1e3 * torch.finfo(dtype).tiny ** 0.5
                   for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def _block_qr_admits(X: Tensor, V: Tensor, c: Tensor | float) -> tuple[bool, bool]:
    r"""Whether the step passes :func:`safe_for_block_qr` and the points
    :func:`near_orthonormal`, and whether the step is small enough for the widths of
    ``near_identity`` in :func:`block_cholesky_qf_` (:math:`c^2 \|V\|_F^2`, which bounds
    :math:`\|Y^T Y - I\|_2` up to the points' own error, at most the second bound of
    :func:`_series_tolerances`). The tests and the step in one host read (one device
    synchronisation on an accelerator), so the probe also runs when the bound already fails.
    For one point on CPU and a number ``c``, on the host: the bound from one reduction
    (instead of four ops), and for a point of at most :data:`EXACT_TEST_MAX_NUMEL` entries
    the exact :math:`\|X^T X - I\|_F \le` :data:`NEAR_ORTHONORMAL_TOL` in place of the
    probes."""
    small = _series_tolerances(X.dtype)[1]
    if not isinstance(c, Tensor) and one_point_on_cpu(X):
        step = _sq_norm_on_host(V) * (c * c)
        if not step <= BLOCK_QR_MAX_STEP:
            return False, False
        if X.shape[-2] * X.shape[-1] > EXACT_TEST_MAX_NUMEL:
            return bool(_near_orthonormal(X)), step <= small
        E = torch.bmm(X.mT, X)
        E.diagonal(dim1=-2, dim2=-1).sub_(1)
        return torch.linalg.vector_norm(E).item() <= NEAR_ORTHONORMAL_TOL, step <= small
    step = _largest_step(V, c)
    ok = (step <= BLOCK_QR_MAX_STEP) & _near_orthonormal(X)
    step, ok = torch.stack((step.to(torch.float64), ok.to(torch.float64))).tolist()
    return bool(ok), step <= small


def retract_(
    manifold: Stiefel, method: str, X: Tensor, V: Tensor, c: Tensor | float, trusted: bool
) -> None:
    r"""Overwrite the tall points ``X`` by the retraction ``method`` of the step ``c V``
    (``c``: a number or one per point, ``(b, 1, 1)``).

    For ``qr`` with ``trusted`` (``X`` is the point this optimizer wrote, so it has
    orthonormal columns to rounding and ``V`` is tangent there), a step that passes
    :func:`safe_for_block_qr` and points that pass :func:`near_orthonormal`:
    :math:`X \leftarrow \operatorname{qf}(X + c V)` in place by
    :func:`block_cholesky_qf_`. Otherwise the checked :func:`retract`. The last test is
    there because ``trusted`` rests on version counters, which a write through ``p.data``
    does not bump: without it such a write (an ill-conditioned ``W``) would reach the block
    QR, whose result is then not orthonormal (:math:`O(\kappa^2 \epsilon)`).
    """
    if X.numel() == 0:  # an empty batch of points: nothing to move (the bounds reduce over it)
        return
    admits, small = _block_qr_admits(X, V, c) if method == "qr" and trusted else (False, False)
    if admits:
        with Arena(X) as arena:  # Y = X + c V in scratch; its q-factor written into X
            Y = arena.empty()
            Y = (torch.addcmul(X, V, c, out=Y) if isinstance(c, Tensor)
                 else torch.add(X, V, alpha=c, out=Y))
            done = block_cholesky_qf_(Y, out=X, near_identity=small)
        if done:
            return
        raise RuntimeError(
            "the QR retraction failed on a well-conditioned step: the parameters or the "
            "gradients are not finite"
        )
    if method == "qr":
        # the checked QR of Y = X + c V with its temporaries in scratch and the q-factor
        # written over X (a large step: (512, 512), 4.8 MB of fresh pages per step before)
        with Arena(X) as arena:
            Y = arena.empty()
            Y = (torch.addcmul(X, V, c, out=Y) if isinstance(c, Tensor)
                 else torch.add(X, V, alpha=c, out=Y))
            qf(Y, arena=arena, out=X)
        return
    X.copy_(retract(manifold, method, X, V, c))
