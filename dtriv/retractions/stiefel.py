r"""Retractions of the Stiefel manifold :math:`\{B \in \mathbb{F}^{n\times k} : B^H B = I\}`.

Every map here takes a base point ``B`` of shape ``(..., n, k)`` with ``n >= k`` and
:math:`B^H B = I`, and a tangent vector ``V`` at ``B`` of the same shape
(:math:`B^H V + V^H B = 0`), and returns a point of the manifold. They are batched over the
leading dimensions, differentiable in ``B`` and ``V``, real or complex, single or double
precision (half precision is computed in single precision and cast back).

All of them cost :math:`O(n k^2)` time and memory: they only form products
``B^H V`` (``k x k``), ``B @ M`` (``n x k``) and factorizations of ``n x k`` or ``2k x 2k``
matrices, never an ``n x n`` matrix such as :math:`B B^H`.

=================  ==================================================================
``qr``             q-factor of :math:`B + V`, signs fixed so that diag(R) > 0
``polar``          polar factor :math:`(B + V)(I + V^H V)^{-1/2}` (thin SVD)
``polar_ns``       the same polar factor by a matmul-only Newton--Schulz iteration
``cayley``         Cayley transform in low-rank (Woodbury) form (Wen & Yin, 2013)
``exp``            geodesic of the embedded metric (Edelman, Arias & Smith, 1998)
``exp_canonical``  geodesic of the canonical metric (Edelman, Arias & Smith, 1998)
=================  ==================================================================

References
----------
* A. Edelman, T. A. Arias, S. T. Smith, "The geometry of algorithms with orthogonality
  constraints", SIAM J. Matrix Anal. Appl. 20(2), 1998.
* Z. Wen, W. Yin, "A feasible method for optimization with orthogonality constraints",
  Math. Program. 142, 2013.
* P.-A. Absil, R. Mahony, R. Sepulchre, "Optimization Algorithms on Matrix Manifolds",
  Princeton University Press, 2008 (QR and polar retractions, Sec. 4.1).
* T. Kaneko, S. Fiori, T. Tanaka, "Empirical arithmetic averaging over the compact Stiefel
  manifold", IEEE Trans. Signal Process., 2013 (inverses of the QR and polar retractions).
* N. J. Higham, "Functions of Matrices", SIAM, 2008, Ch. 6 and 8 (Newton--Schulz
  iterations for the matrix square root and the polar decomposition).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _lu
from ._common import (
    apply_function,
    backward_without_autocast,
    check_floating,
    check_matrix,
    check_same_shape,
    eps,
    forward_ad_active,
    is_meta,
    nested_forward_ad,
    no_host_reads,
    reports_backward,
    solve,
    sym,
    tracing,
    transforms_active,
    upcast_half,
    values_checkable,
    vmap_active,
)
from ._scratch import Arena
from ._skew_basis import map_in_basis, takes_basis
from .lie import expm
from .registry import register

__all__ = [
    "cholesky_qf",
    "householder_qf",
    "qf",
    "polar_factor",
    "special_polar_factor",
    "stiefel_qr",
    "stiefel_qr_inverse",
    "stiefel_polar",
    "stiefel_polar_inverse",
    "stiefel_polar_newton_schulz",
    "stiefel_cayley",
    "stiefel_exp",
    "stiefel_exp_canonical",
]


# --------------------------------------------------------------------------- helpers


def _check(B: Tensor, V: Tensor, name_v: str = "V") -> None:
    check_matrix(B, "B", tall=True)
    check_floating(B, "B")
    check_matrix(V, name_v)
    check_same_shape(B, V, "B", name_v)
    if V.dtype != B.dtype:
        raise ValueError(f"{name_v}: expected the dtype of B, {B.dtype}, got {V.dtype}")


def _eye(k: int, like: Tensor) -> Tensor:
    return torch.eye(k, dtype=like.dtype, device=like.device)


def _balance(M: Tensor) -> Tensor:
    """A detached per-matrix scale ``max(1, |M|_F)`` of shape ``(..., 1, 1)``.

    Used to balance the ``2k x 2k`` block matrices of the geodesics: the result does not
    depend on the scale mathematically, only the rounding errors of the exponential do.
    """
    with torch.no_grad():
        s = torch.linalg.matrix_norm(M).clamp(min=1.0)
    return s.unsqueeze(-1).unsqueeze(-1).to(M.dtype)


# --------------------------------------------------------------------------- QR


#: Cholesky QR is used when the Gram matrix is within this distance (Frobenius norm) of the
#: identity: its eigenvalues then lie in ``[1 - d, 1 + d]`` and ``cond(X) <= sqrt(3)``.
CHOLESKY_QR_MAX_GRAM_DEVIATION = 0.5


def householder_qf(X: Tensor) -> Tensor:
    r"""The q-factor of ``X`` (``(..., n, k)``, ``n >= k``) with diag(R) > 0, by Householder QR.

    The phases of the columns of ``torch.linalg.qr`` are fixed so that the diagonal of ``R``
    is real and positive (a zero diagonal entry keeps its column). Cost: one thin
    Householder QR, :math:`O(n k^2)` (``geqrf`` and ``orgqr``).
    """
    Q, R = torch.linalg.qr(X, mode="reduced")
    d = R.diagonal(dim1=-2, dim2=-1)
    s = torch.where(d == 0, torch.ones_like(d), torch.sgn(d))
    return Q * s.unsqueeze(-2)


def cholesky_qf(
    X: Tensor, max_deviation: float = CHOLESKY_QR_MAX_GRAM_DEVIATION,
    arena: Arena | None = None, out: Tensor | None = None,
) -> Tensor | None:
    r"""The q-factor of ``X`` with diag(R) > 0 by Cholesky QR, or ``None`` when unsafe.

    .. math:: G = X^H X = R^H R\ (\text{Cholesky, } \operatorname{diag} R > 0), \qquad
              Q = X R^{-1}.

    This is the unique thin QR factorization with a positive diagonal in ``R``, so ``Q`` is
    the same q-factor as Householder's (:func:`householder_qf`) and has the same
    derivative (autograd runs through the Gram product, the Cholesky factorization and the
    triangular solve). Its orthogonality error is :math:`O(\kappa(X)^2 \epsilon)`; it is
    used only when :math:`\|G - I\|_F \le` ``max_deviation`` (every point of the batch),
    which bounds :math:`\kappa(X)^2 \le (1 + d)/(1 - d)` (3 for the default ``d = 0.5``),
    so the result is orthonormal to rounding like Householder's. Retraction steps
    ``X = B + V`` have :math:`G = I + V^H V` (tangent ``V``), within the bound for
    :math:`\|V^H V\|_F \le 0.5`. Otherwise (or when the factorization fails) it returns
    ``None`` and the caller falls back to Householder QR.

    Cost: one Gram product, one ``k x k`` Cholesky factorization and one triangular solve:
    :math:`2 n k^2 + k^3/3` flops, all level-3 BLAS (Householder QR costs about
    :math:`4 n k^2` with panel factorizations that run at a fraction of the matmul rate).
    One scalar is read back to decide (a host synchronisation).

    ``arena`` (an active :class:`~dtriv.retractions._scratch.Arena` outside grad mode): where
    the ``k x k`` temporaries come from (the Gram matrix, its deviation and the factor), so
    that repeated calls write no fresh pages. ``out``: where ``Q`` is written, only when
    the factorization succeeds (the optimizers write the new point over the old one: ``out``
    may be a tensor that ``X`` was computed from, not ``X`` itself).

    Reference: Y. Yamamoto, Y. Nakatsukasa, Y. Yanagisawa, T. Fukaya, "Roundoff error
    analysis of the CholeskyQR2 algorithm", Electron. Trans. Numer. Anal. 44, 2015.
    """
    square = (*X.shape[:-2], X.shape[-1], X.shape[-1])

    def scratch() -> Tensor | None:
        return None if arena is None else arena.empty(square)

    G = torch.matmul(X.mH, X, out=scratch())
    with torch.no_grad():
        k = G.shape[-1]
        dev = scratch()
        dev = G.detach().clone() if dev is None else dev.copy_(G)
        dev.diagonal(dim1=-2, dim2=-1).sub_(1)
        worst = torch.linalg.matrix_norm(dev).amax() if G.numel() else G.new_zeros(()).real
        if not bool(worst <= max_deviation):  # also False for NaN
            return None
    L = scratch()
    factors = None if L is None else (
        L, torch.empty(square[:-2], dtype=torch.int32, device=G.device))
    L, info = torch.linalg.cholesky_ex(G, out=factors)  # G = L L^H, R = L^H
    if k and bool(info.any()):
        return None
    return torch.linalg.solve_triangular(L.mH, X, upper=True, left=False, out=out)


@upcast_half
def stiefel_qr(B: Tensor, V: Tensor) -> Tensor:
    r"""QR retraction: the q-factor of :math:`B + V` with a positive diagonal in R.

    .. math:: R_B(V) = \operatorname{qf}(B + V), \qquad B + V = Q R,\ \operatorname{diag}(R) > 0,

    the unique thin QR factorization with a real positive diagonal in ``R`` (this makes the
    map smooth). A first-order retraction that agrees with the exponential map to first
    order: :math:`R_B(tV) = B + tV + O(t^2)`.

    Algorithm: Cholesky QR (:func:`cholesky_qf`: :math:`R = \operatorname{chol}((B+V)^H
    (B+V))`, :math:`Q = (B + V) R^{-1}`) when :math:`\|(B+V)^H(B+V) - I\|_F \le 0.5`, which
    holds for tangent steps with :math:`\|V^H V\|_F \le 0.5` and bounds the condition
    number by :math:`\sqrt 3`, so the result is orthonormal to rounding; otherwise
    Householder QR with the signs of the columns fixed (:func:`householder_qf`). Both give
    the same ``Q`` and the same derivative. Under ``torch.func`` transforms (``vmap``
    cannot read the test's norm on the host), tracing and for meta tensors: always
    Householder QR.

    Args:
        B: points of the Stiefel manifold, ``(..., n, k)``, ``n >= k``.
        V: tangent vectors at ``B``, same shape.

    Returns:
        ``(..., n, k)`` with orthonormal columns.

    Cost: :math:`O(n k^2)`: a Gram product, a ``k x k`` Cholesky factorization and a
    triangular solve (or one thin Householder QR).

    Reference: Absil, Mahony & Sepulchre (2008), Sec. 4.1 (the qf retraction).
    """
    _check(B, V)
    return qf(B + V)


def qf(X: Tensor, arena: Arena | None = None, out: Tensor | None = None) -> Tensor:
    """The q-factor of ``X`` with diag(R) > 0: :func:`cholesky_qf` when safe, else
    :func:`householder_qf` (always under ``torch.func`` transforms, ``torch.jit.trace`` and
    ``torch.export`` and for meta tensors: the test reads a norm on the host). ``X``:
    ``(..., n, k)``, ``n >= k``; cost :math:`O(n k^2)`. ``arena``: where Cholesky QR's
    temporaries come from (see :func:`cholesky_qf`); ``out``: where the q-factor is written
    (and returned), which may be a tensor ``X`` was computed from."""
    Q = None
    if not (no_host_reads(X) or transforms_active()):
        Q = cholesky_qf(X, arena=arena, out=out)
    if Q is None:
        Q = householder_qf(X)
        if out is not None:
            Q = out.copy_(Q)
    return Q


@upcast_half
def stiefel_qr_inverse(B: Tensor, Q: Tensor) -> Tensor:
    r"""Inverse of :func:`stiefel_qr` at ``B``: the tangent ``V`` with ``qf(B + V) = Q``.

    Writing :math:`B + V = Q R` with ``R`` upper triangular with a positive diagonal, the
    tangency condition :math:`B^H V + V^H B = 0` reads, with :math:`M = B^H Q`,

    .. math:: M R + R^H M^H = 2 I,

    a triangular system solved column by column: for column ``j`` the ``j - 1`` strictly
    upper equations are linear in :math:`R_{1:j-1, j}` and the diagonal equation
    :math:`\operatorname{Re}(M R)_{jj} = 1` fixes the real :math:`R_{jj}`. Then
    :math:`V = Q R - B`.

    Args:
        B: points of the Stiefel manifold, ``(..., n, k)``.
        Q: points of the Stiefel manifold, same shape.

    Returns:
        The tangent vector ``V`` at ``B`` (``(..., n, k)``).

    Raises:
        ValueError: if ``Q`` is not in the image of the QR retraction at ``B`` (a leading
            principal minor of :math:`B^H Q` vanishes or the solved diagonal of ``R`` is
            not positive). Meta tensors, which have no values, are not checked, nor are
            calls under ``torch.func.vmap`` (also inside ``jacfwd`` and ``hessian``; a
            batched value cannot be read on the host): such a ``Q`` then gives a
            non-finite or meaningless result. Under ``grad``, ``jacrev`` and ``jvp`` the
            check raises as in eager code.

    Cost: :math:`O(n k^2)` for :math:`B^H Q` and :math:`Q R`, plus ``k`` solves of size at
    most ``k``, :math:`O(k^4)`.

    Reference: Kaneko, Fiori & Tanaka (2013).
    """
    _check(B, Q, "Q")
    M = B.mH @ Q
    k = M.shape[-1]
    batch = M.shape[:-2]
    cols = []
    for j in range(k):
        m21 = M[..., j, :j]
        m22 = M[..., j, j]
        if j == 0:
            r_top = M.new_zeros(*batch, 0)
            rjj = 1.0 / m22.real
        else:
            R_prev = torch.stack(cols, dim=-1)  # (..., k, j), columns 0..j-1
            # strictly upper equations: (M R)_{ij} = -conj((M R)_{ji}), i < j
            b_top = -(m21.unsqueeze(-2) @ R_prev[..., :j, :]).squeeze(-2).conj()
            M11 = M[..., :j, :j]
            m12 = M[..., :j, j]
            try:
                uw = solve(M11, torch.stack([b_top, m12], dim=-1))
            except torch.linalg.LinAlgError as err:  # the documented error, not LAPACK's
                raise ValueError(
                    "Q: expected a point in the image of the QR retraction at B, got one "
                    f"where the leading {j} x {j} principal minor of B^H Q vanishes"
                ) from err
            u, w = uw[..., 0], uw[..., 1]
            num = 1.0 - (m21 * u).sum(-1).real
            den = (m22 - (m21 * w).sum(-1)).real
            rjj = num / den
            r_top = u - w * rjj.unsqueeze(-1).to(M.dtype)
        col = torch.cat(
            [r_top, rjj.to(M.dtype).unsqueeze(-1), M.new_zeros(*batch, k - j - 1)], dim=-1
        )
        cols.append(col)
    R = torch.stack(cols, dim=-1)
    diag = R.diagonal(dim1=-2, dim2=-1).real
    if not values_checkable(R):
        return Q @ R - B
    if not bool(torch.isfinite(R).all()) or bool((diag <= 0).any()):
        raise ValueError(
            "Q: expected a point in the image of the QR retraction at B (positive diagonal "
            f"of R in B + V = Q R), got min diag(R) = {float(diag.nan_to_num(-1.0).min()):.3g}"
        )
    return Q @ R - B


# --------------------------------------------------------------------------- polar


def _lyapunov_in_eigenbasis(C: Tensor, S: Tensor, W: Tensor) -> Tensor:
    r"""The solution :math:`\Omega` of :math:`\Omega H + H \Omega = C` for
    :math:`H = W \operatorname{diag}(s) W^H` (:math:`s > 0`): in the basis ``W`` the operator
    divides entry ``(i, j)`` by :math:`s_i + s_j`. Not differentiable in ``S`` and ``W``."""
    Wh = W.mH
    denom = S.unsqueeze(-1) + S.unsqueeze(-2)
    return W @ ((Wh @ C @ W) / denom.to(C.dtype)) @ Wh


@backward_without_autocast
class _Lyapunov(torch.autograd.Function):
    r""":math:`\Omega = L_H^{-1}(C)`, :math:`L_H(\Omega) = \Omega H + H \Omega`, for a Hermitian
    positive definite ``H`` given with its eigendecomposition ``H = W diag(S) W^H`` (``S`` and
    ``W`` are constants that must describe ``H``; they receive no gradient).

    Differential: :math:`d\Omega = L_H^{-1}(dC - dH\,\Omega - \Omega\, dH)`. :math:`L_H` is
    self-adjoint for the real inner product :math:`\operatorname{Re}\operatorname{tr}(X^H Y)`,
    so the adjoint is :math:`\bar C = L_H^{-1}(\bar\Omega)`,
    :math:`\bar H = -(\bar C\,\Omega^H + \Omega^H \bar C)`. Both are applications of this
    map again, so it is differentiable to any order, and every step divides by
    :math:`s_i + s_j > 0` only: finite at repeated eigenvalues of ``H`` (where
    differentiating ``eigh`` divides by :math:`s_i - s_j = 0`). Used for the second
    derivatives of :class:`_PolarFactor`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(H: Tensor, C: Tensor, S: Tensor, W: Tensor) -> Tensor:  # type: ignore[override]
        return _lyapunov_in_eigenbasis(C, S, W)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        H, _, S, W = inputs
        ctx.save_for_backward(H, S, W, output)
        ctx.save_for_forward(H, S, W, output)

    @staticmethod
    def backward(ctx, gOmega: Tensor):  # type: ignore[override]
        H, S, W, Omega = ctx.saved_tensors
        if torch.is_grad_enabled():  # higher orders: the same map, differentiable in H
            gC = _Lyapunov.apply(H, gOmega, S, W)
        else:
            gC = _lyapunov_in_eigenbasis(gOmega, S, W)
        gH = None
        if ctx.needs_input_grad[0]:
            OmegaH = Omega.mH
            gH = -(gC @ OmegaH + OmegaH @ gC)
        return gH, gC, None, None

    @staticmethod
    def jvp(ctx, dH: Tensor | None, dC: Tensor | None, *unused):  # type: ignore[override]
        H, S, W, Omega = ctx.saved_tensors
        rhs = torch.zeros_like(Omega) if dC is None else dC
        if dH is not None:
            rhs = rhs - (dH @ Omega + Omega @ dH)
        return _Lyapunov.apply(H, rhs, S, W)


@backward_without_autocast
@reports_backward
class _PolarFactor(torch.autograd.Function):
    r"""Polar factor :math:`Q = U W^H` of a full-rank ``X = U S W^H`` with a stable backward.

    With :math:`H = W S W^H` (:math:`= Q^H X`) and :math:`L(\Omega) = \Omega H + H \Omega`, the
    differential is :math:`dQ = Q L^{-1}(Q^H dX - dX^H Q) + (I - Q Q^H)\, dX\, H^{-1}`, whose
    adjoint is

    .. math:: \bar X = 2 Q\, L^{-1}(\operatorname{skew}(Q^H \bar Q))
                       + (\bar Q - Q Q^H \bar Q) H^{-1}.

    In the basis ``W``, :math:`L^{-1}` divides entry ``(i, j)`` by :math:`s_i + s_j > 0`, so
    the gradient is finite at repeated singular values (e.g. ``X = B`` on the manifold),
    where the generic SVD backward divides by :math:`s_i^2 - s_j^2 = 0`.

    Second derivatives (``create_graph=True``): the same adjoint, written with differentiable
    pieces: ``Q`` (this map's saved output), :math:`H = \operatorname{sym}(Q^H X)`, the
    solve with ``H`` and :math:`L^{-1}` as :class:`_Lyapunov` (whose derivatives also divide
    by :math:`s_i + s_j` only), so they too are finite at repeated singular values. Forward
    mode (``torch.func.jvp``) applies the differential above; ``torch.func.vmap`` runs all of
    them batched. The first-order backward uses the saved SVD factors only.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        U, S, Wh = torch.linalg.svd(X, full_matrices=False)
        return U @ Wh, S, Wh

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (X,) = inputs
        Q, S, Wh = output
        ctx.set_materialize_grads(False)  # no zero gradients for S and Wh
        ctx.mark_non_differentiable(S, Wh)
        # the same tensors for both: torch.func's generated vmap rule keeps the batch dims of
        # the last call only
        ctx.save_for_backward(X, Q, S, Wh)
        ctx.save_for_forward(X, Q, S, Wh)

    @staticmethod
    def backward(ctx, gQ: Tensor | None, *unused: Tensor | None):  # type: ignore[override]
        if gQ is None:
            return None
        return _polar_derivative(*ctx.saved_tensors, gQ)

    @staticmethod
    def jvp(ctx, dX: Tensor):  # type: ignore[override]
        # the differential is self-adjoint: the backward's formula applied to dX
        return _polar_derivative(*ctx.saved_tensors, dX), None, None


def _polar_derivative(X: Tensor, Q: Tensor, S: Tensor, Wh: Tensor, E: Tensor) -> Tensor:
    r""":math:`2 Q L^{-1}(\operatorname{skew}(Q^H E)) + (E - Q Q^H E) H^{-1}` at the polar
    factor ``Q`` of ``X`` (:math:`H = W S W^H`): the differential of :class:`_PolarFactor`
    along ``E``, which is self-adjoint, so also its gradient for the output's gradient ``E``.
    With grad enabled (a derivative of it is taken) it is computed differentiably in ``X``
    (through ``Q`` and :math:`H = \operatorname{sym}(Q^H X)`, :class:`_Lyapunov`); else from
    the saved SVD factors."""
    W = Wh.mH
    QhE = Q.mH @ E
    C = (QhE - QhE.mH) / 2
    if torch.is_grad_enabled():
        H = sym(Q.mH @ X)
        return 2 * Q @ _Lyapunov.apply(H, C, S, W) + solve(H, E - Q @ QhE, left=False)
    Omega = _lyapunov_in_eigenbasis(C, S, W)
    Hinv = (W / S.unsqueeze(-2).to(W.dtype)) @ Wh
    return 2 * Q @ Omega + (E - Q @ QhE) @ Hinv


def _reflection_signs(Q: Tensor) -> Tensor:
    """``-1`` where the square ``Q`` has a negative determinant, else ``1``, shape ``(...,)``
    (selected per point: no host read)."""
    det = _lu.det(Q)
    return torch.where(det < 0, -torch.ones_like(det), torch.ones_like(det))


def _flip_last(Q: Tensor, U: Tensor, Wh: Tensor, d: Tensor) -> Tensor:
    r""":math:`U D W^H` from :math:`Q = U W^H`, :math:`D = \operatorname{diag}(1, \dots, 1, d)`:
    the rank-one update :math:`Q + (d - 1)\, u_n w_n^H` (:math:`O(n^2)`, no second product)."""
    return torch.addcmul(Q, U[..., -1:] * (d - 1)[..., None, None], Wh[..., -1:, :])


@reports_backward
class _SpecialPolarFactor(_PolarFactor):
    r"""The rotation nearest to a real square ``X = U S W^T``: :math:`Q = U D W^T`,
    :math:`D = \operatorname{diag}(1, \dots, 1, d)`, :math:`d = \operatorname{sign}
    \det(U W^T)` (Kabsch 1976), with the stable backward of :class:`_PolarFactor`.

    :math:`Q^T X = W D S W^T =: H` is symmetric, with eigenvalues :math:`h = (s_1, \dots,
    s_{n-1}, d\,s_n)`, so :math:`Q` is differentiated as the polar factor is, with ``h`` in
    place of ``s``: :math:`dQ = Q L^{-1}(Q^T dX - dX^T Q)`, :math:`L(\Omega) = \Omega H +
    H \Omega`, which in the basis ``W`` divides entry ``(i, j)`` by :math:`h_i + h_j`. For
    :math:`d = -1` the pairs with the last index divide by :math:`s_i - s_n`: the map is
    differentiable where the least singular value is simple, whatever the others do (the SVD's
    own backward divides by every :math:`s_i^2 - s_j^2`). ``apply`` returns ``(Q, h, W^T)``.
    """

    @staticmethod
    def forward(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        U, S, Wh = torch.linalg.svd(X, full_matrices=False)
        Q = U @ Wh
        d = _reflection_signs(Q)
        h = torch.cat([S[..., :-1], S[..., -1:] * d[..., None]], dim=-1)
        return _flip_last(Q, U, Wh, d), h, Wh


def _polar(X: Tensor, special: bool = False) -> Tensor:
    """:class:`_PolarFactor`'s ``Q`` (with ``special``: :class:`_SpecialPolarFactor`'s); under
    nested forward mode (``jacfwd(jacfwd(f))``, where torch 2.13 drops the second-order terms
    of a custom Function's ``jvp``) the same ``U @ Wh`` of ``torch.linalg.svd`` with torch's
    derivatives (which divide by :math:`s_i^2 - s_j^2`: not finite at repeated singular
    values, e.g. ``V = 0``)."""
    if nested_forward_ad():
        U, _, Wh = torch.linalg.svd(X, full_matrices=False)
        Q = U @ Wh
        return _flip_last(Q, U, Wh, _reflection_signs(Q)) if special else Q
    return apply_function(_SpecialPolarFactor if special else _PolarFactor, X)[0]


@upcast_half
def polar_factor(X: Tensor) -> Tensor:
    r"""The unitary polar factor :math:`U W^H` of a full-rank ``X = U S W^H``, ``(..., n, k)``.

    It is the point of the Stiefel manifold nearest to ``X`` (in any unitarily invariant
    norm) and equals :math:`X (X^H X)^{-1/2}`. The gradient uses the stable formula of
    :class:`_PolarFactor` (denominators :math:`s_i + s_j`), finite at repeated singular
    values; so do second derivatives (``create_graph=True``) and forward mode
    (``torch.func.jvp``), and ``torch.func.vmap`` applies. Tall (``n >= k``) input. Under
    nested forward mode (``jacfwd(jacfwd(f))``) it is ``U @ Wh`` of ``torch.linalg.svd``
    with torch's derivatives (the same values; those derivatives are not finite at
    repeated singular values).

    Cost: one thin SVD, :math:`O(n k^2)`; backward :math:`O(n k^2)` (no second SVD; a double
    backward adds a ``k x k`` solve).

    Reference: Higham, "Functions of Matrices" (2008), Ch. 8.
    """
    check_matrix(X, "X", tall=True)
    check_floating(X, "X")
    return _polar(X)


@upcast_half
def special_polar_factor(X: Tensor) -> Tensor:
    r"""The rotation nearest to a real square ``X = U S W^T`` in Frobenius norm (Kabsch 1976):

    .. math:: Q = U \operatorname{diag}(1, \dots, 1, d)\, W^T, \qquad
              d = \operatorname{sign} \det(U W^T),

    the polar factor when :math:`\det X > 0`, else the polar factor with its last singular
    vector (least singular value) reflected. :math:`\det Q = 1`. The gradient is the stable
    formula of :class:`_SpecialPolarFactor`: finite at repeated singular values, except a
    repeated least one of a point with :math:`\det X < 0` (there the nearest rotation is not
    unique). The choice of ``d`` is made per point, without a host read. Second derivatives,
    ``torch.func.jvp`` and ``vmap`` as for :func:`polar_factor`.

    Cost: one SVD and one determinant of the ``n x n`` polar factor, :math:`O(n^3)`.

    Reference: Kabsch, "A solution for the best rotation to relate two sets of vectors" (1976).
    """
    check_matrix(X, "X", square=True)
    check_floating(X, "X")
    if X.is_complex():
        raise ValueError(f"X: expected a real matrix (SO(n) is real), got dtype {X.dtype}")
    return _polar(X, special=True)


@upcast_half
def stiefel_polar(B: Tensor, V: Tensor) -> Tensor:
    r"""Polar retraction: the unitary polar factor of :math:`B + V`.

    .. math:: R_B(V) = (B + V)(I + V^H V)^{-1/2} = U W^H, \qquad B + V = U S W^H,

    since :math:`B^H V` is skew, :math:`(B + V)^H (B + V) = I + V^H V`. It is the
    metric projection of :math:`B + V` onto the manifold, a second-order retraction. The
    backward pass is the stable closed form of :func:`polar_factor`, finite at ``V = 0``, and
    so are its second derivatives (Hessians of a loss through the retraction).

    Args:
        B: points of the Stiefel manifold, ``(..., n, k)``, ``n >= k``.
        V: tangent vectors at ``B``, same shape.

    Cost: one thin SVD of an ``n x k`` matrix, :math:`O(n k^2)`.

    Reference: Absil, Mahony & Sepulchre (2008), Sec. 4.1 (the polar retraction);
    Higham (2008), Ch. 8.
    """
    _check(B, V)
    return _polar(B + V)


#: with ``iters=None`` and a Gram matrix that is differentiated: the fewest iterations, and
#: how many more run once the tolerance is reached. From ``Y_0 = I`` (``V = 0``, or ``k = 1``,
#: where ``Y_0 = G/c = 1``) the residual is 0 after one step, and one step is affine in
#: ``G``: its second derivative is 0, that of ``G^{-1/2}`` is not. The coupled iteration
#: converges quadratically (at ``G = c(I + E)`` the error of ``j`` steps is
#: :math:`O(\|E\|^{2^j})`), so two steps have the derivatives of ``G^{-1/2}`` up to the third
#: there, and a step beyond the tolerance brings those of the limit to rounding elsewhere.
_NS_MIN_DIFFERENTIABLE, _NS_EXTRA_DIFFERENTIABLE = 2, 1


def _inv_sqrt_newton_schulz(G: Tensor, iters: int | None) -> tuple[Tensor, bool]:
    r"""``G^{-1/2}`` of a Hermitian positive definite ``G`` by coupled Newton--Schulz, and
    whether the iteration reached its tolerance (always ``True`` for a given ``iters``).
    With ``iters=None`` a differentiated ``G`` runs at least :data:`_NS_MIN_DIFFERENTIABLE`
    steps and :data:`_NS_EXTRA_DIFFERENTIABLE` past the tolerance."""
    k = G.shape[-1]
    if G.numel() == 0:  # an empty batch: nothing to iterate (and no maximum to read)
        return G.clone(), True
    I = _eye(k, G)
    with torch.no_grad():
        fro = torch.linalg.matrix_norm(G)
        inf = G.abs().sum(-1).amax(-1)  # |G|_inf >= lambda_max for Hermitian G
        c = torch.minimum(fro, inf).clamp(min=torch.finfo(fro.dtype).tiny)
        c = c.unsqueeze(-1).unsqueeze(-1)
    Y = G / c.to(G.dtype)
    Z = I.expand_as(G)
    tol = math.sqrt(eps(G.dtype))
    n_iter = 100 if iters is None else iters
    converged = iters is not None
    differentiated = ((G.requires_grad and torch.is_grad_enabled()) or forward_ad_active()
                      or transforms_active())
    fewest, extra = ((_NS_MIN_DIFFERENTIABLE, _NS_EXTRA_DIFFERENTIABLE) if differentiated
                     else (1, 0))
    stop = None  # once the tolerance is reached: the number of steps to end at
    for j in range(n_iter):
        R = I - Z @ Y
        T = I + R / 2
        Y = Y @ T
        Z = T @ Z
        if iters is None:
            if stop is None:
                r = float(R.detach().abs().amax())
                if r <= tol:
                    converged = True
                    stop = max(fewest, j + 1 + extra)
                elif not math.isfinite(r):  # diverged (NaN or inf): no later step recovers
                    break
            if stop is not None and j + 1 >= stop:
                break
    return Z / c.sqrt().to(G.dtype), converged


@upcast_half
def stiefel_polar_newton_schulz(B: Tensor, V: Tensor, iters: int | None = None) -> Tensor:
    r"""Polar retraction by a matmul-only Newton--Schulz iteration (no SVD, no solve).

    .. math:: R_B(V) = X\, G^{-1/2}, \qquad X = B + V,\quad G = X^H X\ (= I + V^H V),

    where :math:`G^{-1/2}` comes from the coupled Newton--Schulz iteration on the
    ``k x k`` Gram matrix, scaled by :math:`c = \min(\|G\|_F, \|G\|_\infty) \ge
    \lambda_{\max}(G)` so that the spectrum of :math:`G/c` lies in ``(0, 1]``:

    .. math:: Y_0 = G/c,\ Z_0 = I,\quad T = \tfrac12(3I - Z_j Y_j),\quad
              Y_{j+1} = Y_j T,\ Z_{j+1} = T Z_j,\qquad G^{-1/2} = \lim Z_j / \sqrt{c}.

    Convergence is quadratic once :math:`\|I - Z_j Y_j\| < 1`. Equal to
    :func:`stiefel_polar` up to the iteration tolerance and the rounding errors of the Gram
    matrix, which squares the condition number: the error grows like
    :math:`\kappa(B + V)^2 \epsilon` (about 0.25 for :math:`\kappa = 10^4` in single
    precision, where the SVD's is :math:`\epsilon`), so steps with a large ``V`` in a
    direction where ``B + V`` is nearly rank deficient need :func:`stiefel_polar`.
    Differentiable through the matmuls, including at ``V = 0``.

    Args:
        B: points of the Stiefel manifold, ``(..., n, k)``, ``n >= k``.
        V: tangent vectors at ``B``, same shape.
        iters: number of iterations. ``None`` iterates until
            :math:`\max|I - Z Y| \le \sqrt{\epsilon}` (one more step then reaches
            :math:`\epsilon`), at most 100 steps; this reads one scalar per step back from the
            device. When it does not get there (it diverges or stalls: a Gram matrix too
            ill-conditioned for the precision, or one that overflows), the SVD polar factor
            (:func:`stiefel_polar`) is returned instead. An integer (>= 1) runs exactly that
            many steps, with no host synchronisation.
            Under ``torch.jit.trace``/``torch.export``, and with ``None`` for meta tensors
            and under ``torch.func.vmap`` (also inside ``jacfwd`` and ``hessian``), where no
            value can be read on the host, the SVD polar factor (:func:`stiefel_polar`, the
            limit) is computed instead.

    Cost: :math:`O(n k^2)` for the Gram matrix and the final product, plus
    :math:`O(k^3)` per iteration.

    Reference: Higham, "Functions of Matrices" (2008), Ch. 6 (coupled Newton--Schulz
    iteration) and Ch. 8 (polar decomposition).
    """
    _check(B, V)
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int)
                              or iters < 1):
        raise ValueError(f"iters: expected None or a positive int, got {iters!r}")
    X = B + V
    if tracing() or (iters is None and (is_meta(X) or vmap_active())):
        # the iteration stops on a host-read criterion: the SVD polar factor, its limit, for a
        # trace, for meta tensors and under vmap (which run a given number of iterations as
        # they are)
        return _polar(X)
    G = X.mH @ X
    G = (G + G.mH) / 2
    Z, converged = _inv_sqrt_newton_schulz(G, iters)
    if not converged and bool(torch.isfinite(X).all()):
        # the Gram matrix is too ill-conditioned for the precision, or overflows: the
        # iteration diverged or stalled, and its result is garbage; the SVD polar factor is
        # its limit (a non-finite X keeps its non-finite result)
        return _polar(X)
    return X @ Z


@upcast_half
def stiefel_polar_inverse(B: Tensor, Q: Tensor) -> Tensor:
    r"""Inverse of :func:`stiefel_polar` at ``B``: the tangent ``V`` with ``polar(B + V) = Q``.

    Writing :math:`B + V = Q S` with ``S`` Hermitian positive definite, tangency
    :math:`B^H V + V^H B = 0` is the Lyapunov equation, with :math:`M = B^H Q`,

    .. math:: M S + S M^H = 2 I,

    solved as the :math:`k^2 \times k^2` linear system
    :math:`(M \otimes I + I \otimes \bar M)\operatorname{vec}(S) = \operatorname{vec}(2I)`.
    Then :math:`V = Q S - B`.

    Args:
        B: points of the Stiefel manifold, ``(..., n, k)``.
        Q: points of the Stiefel manifold, same shape.

    Raises:
        ValueError: if ``Q`` is not in the image of the polar retraction at ``B`` (``S``
            not positive definite). Meta tensors, which have no values, are not checked,
            nor are calls under ``torch.func.vmap`` (also inside ``jacfwd`` and
            ``hessian``; a batched value cannot be read on the host): such a ``Q`` then
            gives a meaningless result. Under ``grad``, ``jacrev`` and ``jvp`` the check
            raises as in eager code.

    Cost: :math:`O(n k^2)` for :math:`B^H Q` and :math:`Q S`, plus a dense solve of size
    :math:`k^2`, :math:`O(k^6)`: cheap for ``k`` up to a few tens.

    Reference: Kaneko, Fiori & Tanaka (2013).
    """
    _check(B, Q, "Q")
    M = B.mH @ Q
    k = M.shape[-1]
    I = _eye(k, M)
    K = torch.einsum("...il,jm->...ijlm", M, I) + torch.einsum("il,...jm->...ijlm", I, M.conj())
    K = K.reshape(*M.shape[:-2], k * k, k * k)
    rhs = (2 * I).reshape(k * k).expand(*M.shape[:-2], k * k)
    try:
        S = solve(K, rhs.unsqueeze(-1)).reshape(M.shape)
    except torch.linalg.LinAlgError as err:  # the documented error, not LAPACK's
        raise ValueError(
            "Q: expected a point in the image of the polar retraction at B, got one where "
            "M S + S M^H = 2I (M = B^H Q) has no unique solution (singular system)"
        ) from err
    S = (S + S.mH) / 2
    if not values_checkable(S):
        return Q @ S - B
    with torch.no_grad():
        lam = torch.linalg.eigvalsh(S)
    if not bool(torch.isfinite(lam).all()) or bool((lam <= 0).any()):
        lam_min = float(lam.nan_to_num(-1.0).min())
        raise ValueError(
            "Q: expected a point in the image of the polar retraction at B (positive "
            f"definite S in B + V = Q S), got min eigenvalue {lam_min:.3g}"
        )
    return Q @ S - B


# --------------------------------------------------------------------------- Cayley


@upcast_half
def stiefel_cayley(B: Tensor, V: Tensor) -> Tensor:
    r"""Cayley retraction in low-rank (Woodbury) form (Wen & Yin, 2013).

    With :math:`P = I - \tfrac12 B B^H` (applied as :math:`PV = V - \tfrac12 B (B^H V)`),
    :math:`U = [PV, B]` and :math:`W = [B, -PV]` (both ``n x 2k``),

    .. math:: R_B(V) = B + U \left(I_{2k} - \tfrac12 W^H U\right)^{-1} W^H B,

    which equals the dense Cayley transform :math:`(I - \Omega/2)^{-1}(I + \Omega/2) B` of
    the skew :math:`\Omega = U W^H = PV B^H - B (PV)^H` (Sherman--Morrison--Woodbury), and
    :math:`\Omega B = V` for tangent ``V``. For square ``B`` it is
    :math:`B\,\operatorname{cayley}(B^H V)`; at ``B = I_{n,k}`` it is what
    ``torch.nn.utils.parametrizations.orthogonal(..., orthogonal_map="cayley")`` computes
    on tall weights. The Gram products use the actual ``B`` (not :math:`B^H B = I`), so the
    identity with the dense formula holds exactly for any ``B``.

    :math:`W^H U` holds the Gram matrix :math:`PV^H PV`, whose rounding grows as
    :math:`\|PV\|_2^2`: where :math:`\|PV\|_2` may exceed
    :data:`~dtriv.retractions._skew_basis.GRAM_MAX_NORM` (10) for a matrix of the batch, the
    same map is computed in an orthonormal basis of ``[PV, B]`` instead, as accurate as the
    dense formula (:mod:`dtriv.retractions._skew_basis`; eager code only, where the norm can
    be read).

    Args:
        B: points of the Stiefel manifold, ``(..., n, k)``, ``n >= k``.
        V: tangent vectors at ``B``, same shape.

    Cost: five ``n x k`` by ``k x k`` products/Gram matrices and one ``2k x 2k`` solve,
    :math:`O(n k^2 + k^3)`; with the basis, a Householder QR of ``[PV, B]`` as well.

    Reference: Wen & Yin (2013), Sec. 2 (the Sherman--Morrison--Woodbury form of the update).
    """
    _check(B, V)
    BhV = B.mH @ V
    PV = V - B @ BhV / 2
    PP = PV.mH @ PV
    if takes_basis(PP):
        return map_in_basis("cayley", B, V, _cayley_woodbury)
    return _cayley_woodbury(B, V, BhV, PV, PP)


def _cayley_woodbury(B: Tensor, V: Tensor, BhV: Tensor | None = None, PV: Tensor | None = None,
                     PP: Tensor | None = None) -> Tensor:
    """:func:`stiefel_cayley` in its Woodbury form (``B^H V``, ``PV`` and ``PV^H PV`` when the
    caller has them)."""
    k = B.shape[-1]
    if BhV is None or PV is None or PP is None:
        BhV = B.mH @ V
        PV = V - B @ BhV / 2
        PP = PV.mH @ PV
    BB = B.mH @ B
    BP = B.mH @ PV
    WhU = torch.cat(
        [torch.cat([BP, BB], dim=-1), torch.cat([-PP, -BP.mH], dim=-1)], dim=-2
    )  # W^H U, (2k, 2k)
    WhB = torch.cat([BB, -BP.mH], dim=-2)  # W^H B, (2k, k)
    Y = solve(_eye(2 * k, B) - WhU / 2, WhB)
    return B + PV @ Y[..., :k, :] + B @ Y[..., k:, :]


# --------------------------------------------------------------------------- geodesics


@upcast_half
def stiefel_exp(B: Tensor, V: Tensor) -> Tensor:
    r"""Exponential map of the embedded (Euclidean) metric: the geodesic at time 1.

    With :math:`A = B^H V` and :math:`S = V^H V`, Edelman, Arias & Smith's form is

    .. math:: \gamma(1) = [B, V]\, \exp\!\begin{pmatrix} A & -S \\ I & A \end{pmatrix}
              \begin{pmatrix} \exp(-A) \\ 0 \end{pmatrix}.

    The curve :math:`\gamma(t) = R_B(tV)` solves :math:`\gamma'' = -\gamma\,(\gamma'^H
    \gamma')`: its acceleration is normal to the manifold. With the normal part
    :math:`N = V - B A = QR`, in the basis ``[B, Q]`` the block matrix becomes
    :math:`\begin{pmatrix} 2A & -R^H \\ R & 0 \end{pmatrix}` (the similarity by
    :math:`[B, V] = [B, Q] \begin{pmatrix} I & A \\ 0 & R\end{pmatrix}`), so

    .. math:: \gamma(1) = \exp(\Omega) B \exp(-A), \qquad
              \Omega = 2 B A B^H + N B^H - B N^H,

    the canonical geodesic's form with :math:`2A` for :math:`A` in :math:`\Omega`
    (:func:`stiefel_exp_canonical`), and computed as it is: :math:`\exp(\Omega) B =
    U \exp(W^H U) [0; I]` with :math:`U = [N, B]`, :math:`W = [B, 2 B A^H - N]` (a ``2k x 2k``
    exponential, balanced by the scalar similarity ``diag(I/s, I)``,
    ``s = max(1, |N|_F)``), exact for any ``B``, derivatives included; and where
    :math:`\|N\|_2` may exceed :data:`~dtriv.retractions._skew_basis.GRAM_MAX_NORM` (10) for a
    matrix of the batch, in an orthonormal basis of ``[N, B]``, as accurate as the dense
    formula (:mod:`dtriv.retractions._skew_basis`; eager code only). For square ``B`` it is
    :math:`B \exp(B^H V)`.

    Args:
        B: points of the Stiefel manifold, ``(..., n, k)``, ``n >= k``.
        V: tangent vectors at ``B``, same shape.

    Cost: three ``n x k`` by ``k x k`` products and three Gram matrices, :math:`O(n k^2)`,
    plus exponentials of size ``2k`` and ``k``, :math:`O(k^3)`; with the basis, a
    Householder QR of ``[N, B]`` as well.

    Reference: Edelman, Arias & Smith (1998), geodesics of the embedded metric.
    """
    _check(B, V)
    A = B.mH @ V
    N = V - B @ A
    NN = N.mH @ N
    if takes_basis(NN):
        return map_in_basis("exp", B, V, _embedded_rotation) @ expm(-A)
    # the right factor taken into the 2k x k coefficients: one n x k product less
    return _exp_gram(B, V, 2.0, A, N, NN, right=expm(-A))


def _embedded_rotation(B: Tensor, V: Tensor) -> Tensor:
    r""":math:`\exp(\Omega) B` with :math:`\Omega = 2 B A B^H + N B^H - B N^H` (the embedded
    geodesic before its right factor :math:`\exp(-A)`), in its Gram form."""
    return _exp_gram(B, V, 2.0)


@upcast_half
def stiefel_exp_canonical(B: Tensor, V: Tensor) -> Tensor:
    r"""Exponential map of the canonical metric: :math:`\exp(\Omega) B` without forming Ω.

    With :math:`A = B^H V`, the normal part :math:`N = V - B A` and
    :math:`\Omega = B A B^H + N B^H - B N^H` (``n x n`` skew, :math:`\Omega B = V`), the
    canonical geodesic :math:`\gamma(1) = \exp(\Omega) B`. Written
    :math:`\Omega = U W^H` with :math:`U = [N, B]`, :math:`W = [B, B A^H - N]`, and since
    :math:`B = U [0; I]`,

    .. math:: \exp(\Omega) B = B + U \varphi(W^H U) W^H U [0; I] = U \exp(W^H U) [0; I]
              = N E_{12} + B E_{22}, \qquad E = \exp(K),\ K = W^H U =
              \begin{pmatrix} B^H N & B^H B \\ A B^H N - N^H N & A B^H B - N^H B
              \end{pmatrix},

    a ``2k x 2k`` exponential (:math:`\varphi(x) = (e^x - 1)/x`), balanced by the scalar
    similarity ``diag(I/s, I)``, ``s = max(1, |N|_F)``; no QR, so also when ``N`` is rank
    deficient (e.g. ``n < 2k``). For a point of the manifold :math:`K = \begin{pmatrix}
    0 & I \\ -N^H N & A\end{pmatrix}` (Edelman, Arias & Smith's form with ``N = QR``:
    only :math:`R^H R = N^H N` enters); the Gram matrix :math:`B^H B` keeps the identity
    with the dense :math:`\exp(\Omega) B` exact for any ``B``, derivatives in ``B``
    included. Where :math:`\|N\|_2` may exceed
    :data:`~dtriv.retractions._skew_basis.GRAM_MAX_NORM` (10) for a matrix of the batch (the
    rounding of :math:`N^H N` grows as :math:`\|N\|_2^2`), the same map is computed in an
    orthonormal basis of ``[N, B]`` instead, as accurate as the dense exponential
    (:mod:`dtriv.retractions._skew_basis`; eager code only, where the norm can be read).

    This is what ``torch.nn.utils.parametrizations.orthogonal(..., orthogonal_map=
    "matrix_exp")`` computes on tall weights: with ``Y = [X.tril(), 0]`` (``n x n``) and
    ``A = Y - Y^H``, ``matrix_exp(A)[:, :k] == stiefel_exp_canonical(eye(n, k), A[:, :k])``,
    here in :math:`O(n k^2)` instead of :math:`O(n^3)`. For square ``B`` it is
    :math:`B \exp(B^H V)`.

    Args:
        B: points of the Stiefel manifold, ``(..., n, k)``, ``n >= k``.
        V: tangent vectors at ``B``, same shape.

    Cost: three ``n x k`` by ``k x k`` products and three Gram matrices, :math:`O(n k^2)`,
    plus one exponential of size ``2k``, :math:`O(k^3)`; with the basis, a Householder QR
    of ``[N, B]`` as well.

    Reference: Edelman, Arias & Smith (1998), geodesics of the canonical metric.
    """
    _check(B, V)
    A = B.mH @ V
    N = V - B @ A
    NN = N.mH @ N
    if takes_basis(NN):
        return map_in_basis("exp_canonical", B, V, _exp_gram)
    return _exp_gram(B, V, 1.0, A, N, NN)


def _exp_gram(B: Tensor, V: Tensor, c: float = 1.0, A: Tensor | None = None,
              N: Tensor | None = None, NN: Tensor | None = None,
              right: Tensor | None = None) -> Tensor:
    r""":math:`\exp(\Omega) B` with :math:`\Omega = c B A B^H + N B^H - B N^H` by the ``2k x 2k``
    exponential of ``W^H U`` (:func:`stiefel_exp_canonical`: ``c = 1``; :func:`stiefel_exp`:
    ``c = 2``), times ``right`` (``k x k``) when given; ``A``, ``N`` and ``N^H N`` when the
    caller has them."""
    k = B.shape[-1]
    if A is None or N is None or NN is None:
        A = B.mH @ V
        N = V - B @ A
        NN = N.mH @ N
    BB = B.mH @ B
    BN = A - BB @ A  # B^H N
    cA = A if c == 1.0 else c * A
    s = _balance(N)
    K = torch.cat(
        [torch.cat([BN, s * BB], dim=-1),
         torch.cat([(cA @ BN - NN) / s, cA @ BB - BN.mH], dim=-1)],
        dim=-2,
    )
    E = expm(K)[..., :, k:]
    if right is not None:
        E = E @ right
    return (N / s) @ E[..., :k, :] + B @ E[..., k:, :]


# --------------------------------------------------------------------------- registry

register("stiefel", "qr", stiefel_qr, stiefel_qr_inverse)
register("stiefel", "polar", stiefel_polar, stiefel_polar_inverse)
register("stiefel", "polar_ns", stiefel_polar_newton_schulz, stiefel_polar_inverse)
register("stiefel", "cayley", stiefel_cayley)
register("stiefel", "exp", stiefel_exp)
register("stiefel", "exp_canonical", stiefel_exp_canonical)
