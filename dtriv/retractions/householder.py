r"""Householder parametrization of (tall) orthogonal matrices by reflectors.

A real ``(..., n, k)`` matrix :math:`X` (:math:`n \ge k`) stores below its diagonal the
tails :math:`a_j = X_{j+1:n,\,j}` of :math:`k` reflectors :math:`v_j = e_j + a_j`; its diagonal
stores signs. The map is

.. math::
    Q = (H_1 H_2 \cdots H_k)_{:, :k}\, \operatorname{diag}(s), \qquad
    H_j = I - \tau_j v_j v_j^T,\quad \tau_j = \frac{2}{1 + \|a_j\|^2},\quad
    s_j = \operatorname{sign}(X_{jj}),

exactly the ``"householder"`` map of ``torch.nn.utils.parametrizations.orthogonal``, whose
right inverse (``use_trivialization=False``) is :func:`householder_inverse`. Real only: a
complex reflector is not determined by its vector alone (see torch's note
"Householder complex").

Registered as kind ``"lie"``, name ``"householder"`` (square use).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    apply_function,
    backward_without_autocast,
    check_floating,
    check_matrix,
    eager_context,
    geqrf,
    is_meta,
    nested_forward_ad,
    reports_backward,
    transforms_active,
    tril_copy,
    upcast_half,
)
from .registry import register

__all__ = ["householder", "householder_inverse"]


def _check_real(X: Tensor, name: str) -> None:
    if X.is_complex():
        raise ValueError(
            f"{name}: expected a real floating point tensor (the Householder parametrization "
            f"does not support complex matrices), got complex dtype {X.dtype}"
        )


def _reflector_product_wy(A: Tensor) -> Tensor:
    r"""First ``k`` columns of :math:`H_1 \cdots H_k` in compact WY (UT-transform) form.

    With :math:`Y = A + E` (unit lower trapezoidal, :math:`E` = ``eye(n, k)``) and
    :math:`\tau_j = 2/\|y_j\|^2`, :math:`H_1\cdots H_k = I - Y T Y^T` where the upper
    triangular :math:`T` satisfies :math:`T^{-1} = \operatorname{striu}(Y^T Y) +
    \tfrac12\operatorname{diag}(Y^T Y)` (Joffrain, Low, Quintana-Ortí, van de Geijn and
    Van Zee 2006, "Accumulating Householder transformations, revisited"). So
    :math:`Q = E - Y\,(T^{-1})^{-1} Y_{:k,:}^T`: two ``n x k`` by ``k x k`` products and
    one triangular solve, all BLAS3, :math:`O(nk^2)` time and memory, and so is their
    autograd backward.
    """
    E, Y, _, Z = _wy_factors(A)
    return E - Y @ Z


def _ut_of_gram(G: Tensor) -> Tensor:
    r""":math:`\operatorname{striu}(G) + \tfrac12\operatorname{diag}(G)` (linear in ``G``).

    A copy whose lower part ``triu_`` clears in place, then the halved diagonal written in:
    ``G.triu(1) + diag_embed(diag(G) / 2)`` (an out-of-place ``triu`` and a dense diagonal
    matrix) took 1.3 ms at ``k = 512``, this 0.11 ms. Differentiable (in-place operations on
    a fresh tensor); under ``torch.func`` transforms the out-of-place form (``triu_`` has no
    batching rule)."""
    if transforms_active():
        return G.triu(1) + torch.diag_embed(G.diagonal(dim1=-2, dim2=-1) / 2)
    U = G.clone(memory_format=torch.contiguous_format).triu_(1)
    U.diagonal(dim1=-2, dim2=-1).copy_(G.diagonal(dim1=-2, dim2=-1) * 0.5)
    return U


def _wy_factors(A: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""``(E, Y, T^{-1}, Z)`` of :func:`_reflector_product_wy`, :math:`Z = T Y_{:k,:}^T`."""
    n, k = A.shape[-2], A.shape[-1]
    E = torch.eye(n, k, dtype=A.dtype, device=A.device)
    Y = A + E
    T_inv = _ut_of_gram(Y.mT @ Y)
    Z = torch.linalg.solve_triangular(T_inv, Y[..., :k, :].mT, upper=True)
    return E, Y, T_inv, Z


def _reflector_product_wy_jvp(A: Tensor, dA: Tensor) -> Tensor:
    r"""The derivative of :func:`_reflector_product_wy` at ``A`` along ``dA``, in closed form:
    with :math:`dY = dA`, :math:`d(T^{-1}) = \operatorname{striu}(dG) + \tfrac12
    \operatorname{diag}(dG)` for :math:`dG = dY^T Y + Y^T dY`,
    :math:`dZ = T\,(dY_{:k,:}^T - d(T^{-1})\, Z)` and :math:`dQ = -(dY\, Z + Y\, dZ)`.
    Plain torch operations (no ``torch.func`` inside, so it runs under a dual tensor's
    forward mode too), differentiable for reverse over forward; :math:`O(nk^2)`."""
    k = A.shape[-1]
    _, Y, T_inv, Z = _wy_factors(A)
    YtdY = Y.mT @ dA
    dT_inv = _ut_of_gram(YtdY + YtdY.mT)
    dZ = torch.linalg.solve_triangular(T_inv, dA[..., :k, :].mT - dT_inv @ Z, upper=True)
    return -(dA @ Z + Y @ dZ)


def _reflector_product_wy_vjp(A: Tensor, G: Tensor) -> Tensor:
    r"""The vector-Jacobian product of :func:`_reflector_product_wy` at ``A`` with ``G``, in
    closed form (before the restriction to the strict lower triangle).

    With :math:`Q = E - YZ`, :math:`Z = T Y_1^T` (:math:`Y_1 = Y_{:k,:}`, :math:`T^{-1} =
    \operatorname{ut}(Y^T Y)`, :math:`\operatorname{ut}(M) = \operatorname{striu}(M) +
    \tfrac12\operatorname{diag}(M)`, a self-adjoint map):

    .. math::
        \bar Z = -Y^T G, \quad \bar B = T^T \bar Z, \quad \bar S = \operatorname{ut}(-\bar B
        Z^T), \quad \bar Y = Y(\bar S + \bar S^T) - G Z^T + \begin{bmatrix} \bar B^T \\ 0
        \end{bmatrix}.

    Four products and two triangular solves (one for :math:`Z`), where differentiating the
    WY form with ``torch.func.vjp`` also forms :math:`YZ` and takes two products for the
    Gram matrix :math:`Y^T Y`: at :math:`n = k = 256` the vector-Jacobian product went from
    2.7 to 1.9 ms. Plain differentiable torch operations: with ``create_graph=True`` autograd
    records them (the second derivatives are those of the WY form)."""
    k = A.shape[-1]
    _, Y, T_inv, Z = _wy_factors(A)
    recorded = torch.is_grad_enabled()  # out of place; else in place (measured 5 to 8% less)
    gZ = -(Y.mT @ G) if recorded else torch.matmul(Y.mT, G).neg_()
    gB = torch.linalg.solve_triangular(T_inv.mT, gZ, upper=False)  # T^T gZ
    gS = _ut_of_gram(gB @ Z.mT)  # the gradient in Y^T Y, negated
    gY = Y @ (gS + gS.mT)
    gY = -(gY + G @ Z.mT) if recorded else gY.neg_().sub_(G @ Z.mT)
    if recorded:
        return torch.cat([gY[..., :k, :] + gB.mT, gY[..., k:, :]], dim=-2)
    gY[..., :k, :].add_(gB.mT)
    return gY


@backward_without_autocast
@reports_backward
class _ReflectorProduct(torch.autograd.Function):
    r"""``householder_product(A, 2 / (1 + |a_j|^2))`` with an O(n k^2) backward.

    Forward: LAPACK's blocked ``orgqr`` through ``torch.linalg.householder_product`` (bit for
    bit torch's result). Backward: the vector-Jacobian product of the same map written in
    compact WY form, in closed form (:func:`_reflector_product_wy_vjp`), recomputed from
    ``A``. torch's own backward of ``householder_product`` applies the reflectors one at a
    time and allocates ``n x n`` matrices: 10 s for ``n = k = 1024`` and 320 GB for
    ``(200000, 8)``.

    The backward is itself differentiable (``create_graph=True``: autograd records the WY
    vector-Jacobian product, so second derivatives are those of the WY form, again
    :math:`O(nk^2)`). Forward mode (``torch.func.jvp``, ``jacfwd``) is the Jacobian-vector
    product of the WY form; ``torch.func.vmap`` runs forward, backward and ``jvp`` batched.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(A: Tensor) -> Tensor:  # type: ignore[override]
        tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
        return torch.linalg.householder_product(A, tau)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (A,) = inputs
        ctx.save_for_backward(A)
        ctx.save_for_forward(A)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Without create_graph the engine runs this under no_grad and the result carries no
        # graph (restricted in place); with it, the operations of the WY product and its vjp
        # are recorded.
        (A,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _reflector_product_wy_vjp(A, grad).tril(-1)
        return _reflector_product_wy_vjp(A, grad).tril_(-1)

    @staticmethod
    def jvp(ctx, dA: Tensor) -> Tensor:  # type: ignore[override]
        (A,) = ctx.saved_tensors
        return _reflector_product_wy_jvp(A, dA.tril(-1))


@backward_without_autocast
class _StrictLowerTriangle(torch.autograd.Function):
    r"""``X -> tril(X, -1)`` (and its adjoint, the same restriction of the gradient) by
    :func:`~._common.tril_copy`: a copy and the in-place ``tril_``, where torch's ``tril``
    node runs the out-of-place ``tril`` forward and backward, about 5x slower (measured,
    float32: 116 against 22 us at 512 x 512, 154 against 21 us at (4096, 64)). Saves
    nothing (the node does not hold ``X``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor) -> Tensor:  # type: ignore[override]
        return tril_copy(X, -1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.tril(-1) if torch.is_grad_enabled() else tril_copy(grad, -1)

    @staticmethod
    def jvp(ctx, dX: Tensor) -> Tensor:  # type: ignore[override]
        return dX.tril(-1)


#: from this many entries the strict lower triangle is taken by :class:`_StrictLowerTriangle`
#: when autograd records it (below, torch's ``tril`` costs less than a Python node)
STRICT_LOWER_NODE_MIN_NUMEL = 1 << 14


def _strict_lower(X: Tensor) -> Tensor:
    """``X.tril(-1)``, the reflectors' tails: without a node when autograd does not record
    it, by :class:`_StrictLowerTriangle` for large ``X`` in eager code, else torch's."""
    if not (torch.is_grad_enabled() and X.requires_grad) and eager_context():
        return tril_copy(X, -1)
    if X.numel() >= STRICT_LOWER_NODE_MIN_NUMEL and eager_context():
        return apply_function(_StrictLowerTriangle, X)
    return X.tril(-1)


@upcast_half
def householder(X: Tensor) -> Tensor:
    r"""Product of the Householder reflectors stored below the diagonal of ``X``.

    :math:`Q = (H_1\cdots H_k)_{:, :k}\operatorname{diag}(s)` with
    :math:`H_j = I - \tau_j v_j v_j^T`, :math:`v_j = e_j + X_{j+1:n, j}`,
    :math:`\tau_j = 2/\|v_j\|^2`, and the column signs :math:`s_j = \operatorname{sign}(X_{jj})`
    (:math:`+1` for a zero diagonal entry). The columns of :math:`Q` are orthonormal for any
    ``X``; the diagonal only selects signs and receives no gradient. On diagonals of
    :math:`\pm 1` (those :func:`householder_inverse` returns) this is bit for bit the forward
    of ``torch.nn.utils.parametrizations.orthogonal(..., orthogonal_map="householder")``
    (torch truncates the diagonal with ``.int()``, which maps entries in :math:`(-1, 1)` to
    a zero column; here they give a sign).

    Range: :math:`\tau_j` is computed from :math:`\|a_j\|^2`; for a tail with
    :math:`\|a_j\|^2` beyond the largest finite number of the dtype (:math:`\|a_j\| \gtrsim
    1.8 \cdot 10^{19}` in single precision, :math:`10^{154}` in double) it is 0 and that
    reflector is dropped: ``Q`` is still orthonormal but not the map's value (the unit-leading
    reflectors of ``householder_product`` cannot represent it).

    Args:
        X: real ``(..., n, k)``, :math:`n \ge k`.

    Returns:
        ``(..., n, k)`` with :math:`Q^T Q = I_k`, same dtype as ``X``.

    Second derivatives (``create_graph=True``, ``torch.func.hessian``), forward mode
    (``torch.func.jvp``, ``jacfwd``) and ``torch.func.vmap`` are supported: they are the
    derivatives of the same map in compact WY form. Under nested forward mode
    (``jacfwd(jacfwd(f))``, where torch 2.13 drops the second-order terms of a custom
    Function's ``jvp``) the map is the compact WY form itself, differentiated by torch
    (equal to the fast path to rounding; torch 2.13's own forward-mode derivative of
    ``householder_product`` is wrong at second order, by about 2 on a 5 x 3 example).

    Cost: forward ``torch.linalg.householder_product`` (LAPACK ``orgqr``), about
    :math:`4nk^2 - 4k^3/3` flops; backward through the compact WY form, about :math:`8nk^2 +
    4k^3` flops, all BLAS3 (two of them triangular solves), :math:`O(nk^2)` memory (torch's
    backward of ``householder_product`` needs :math:`n \times n`); a double backward or a
    Jacobian-vector product is a few times that, also :math:`O(nk^2)`.
    """
    check_matrix(X, "X", tall=True)
    check_floating(X, "X")
    _check_real(X, "X")
    if nested_forward_ad():  # torch 2.13 does not differentiate a custom jvp here
        Q = _reflector_product_wy(X.tril(diagonal=-1))
    else:
        Q = apply_function(_ReflectorProduct, _strict_lower(X))
    diag = X.detach().diagonal(dim1=-2, dim2=-1)
    signs = torch.where(diag < 0, -1.0, 1.0).to(Q.dtype)
    return Q * signs.unsqueeze(-2)


@upcast_half
def householder_inverse(Q: Tensor) -> Tensor:
    r"""Reflectors of an orthogonal ``Q``: ``householder(householder_inverse(Q)) == Q``.

    The Householder QR :math:`Q = H_1\cdots H_k R` (``torch.geqrf``) of a matrix with
    orthonormal columns has a diagonal :math:`R` with entries :math:`\pm 1`. The result keeps
    the reflector tails below the diagonal and stores :math:`\operatorname{sign}(R_{jj})` on
    it, negated where LAPACK skipped a reflection (:math:`\tau_j = 0`: the forward then
    applies :math:`H_j = I - 2e_je_j^T`, which flips column :math:`j`). These are the
    conventions of ``torch.nn.utils.parametrizations.orthogonal``'s ``right_inverse`` with
    ``use_trivialization=False``; the outputs agree bit for bit.

    For a ``Q`` whose columns are not orthonormal, ``householder`` of the result is the
    q-factor of ``Q`` with :math:`\operatorname{diag}(R) > 0`. Not differentiable
    (``torch.geqrf`` has no derivative): computed under ``no_grad``. For a meta tensor (no
    values, and no ``geqrf`` kernel in torch) an uninitialised meta tensor of the shape.

    Args:
        Q: real ``(..., n, k)``, :math:`n \ge k`.

    Returns:
        ``(..., n, k)``, same dtype as ``Q``.

    Cost: one Householder QR, about :math:`2nk^2 - 2k^3/3` flops.
    """
    check_matrix(Q, "Q", tall=True)
    check_floating(Q, "Q")
    _check_real(Q, "Q")
    with torch.no_grad():
        A, tau = geqrf(Q)  # torch has no geqrf for meta tensors: ours gives the shapes
        if is_meta(Q):  # no values: the sign fixes below would select entries by value
            return A
        A.diagonal(dim1=-2, dim2=-1).sign_()
        A.diagonal(dim1=-2, dim2=-1)[tau == 0.0] *= -1
    return A


register("lie", "householder", householder, householder_inverse)
