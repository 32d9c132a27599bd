r"""The Stiefel maps :math:`f(\Omega) B` of a low-rank skew :math:`\Omega = U W^H`, evaluated in
an orthonormal basis of the columns of ``U``.

Three maps of :mod:`dtriv.retractions.stiefel` are :math:`f(\Omega) B` for an ``n x n``
matrix :math:`\Omega = U W^H` (skew-Hermitian for a tangent ``V``) whose factors, ``n x 2k``,
have their columns in the span of ``B`` and ``V``:

* ``"cayley"`` (:func:`~dtriv.retractions.stiefel.stiefel_cayley`):
  :math:`f(x) = (1 - x/2)^{-1}(1 + x/2)`, ``U = [PV, B]``, ``W = [B, -PV]`` with
  :math:`PV = V - \tfrac12 B (B^H V)`;
* ``"exp_canonical"`` (:func:`~dtriv.retractions.stiefel.stiefel_exp_canonical`):
  :math:`f = \exp`, ``U = [N, B]``, ``W = [B, B A^H - N]`` with :math:`A = B^H V`,
  :math:`N = V - B A`;
* ``"exp"`` (:func:`~dtriv.retractions.stiefel.stiefel_exp`, which multiplies the result by
  :math:`\exp(-A)` from the right): :math:`f = \exp`, ``U = [N, B]``,
  ``W = [B, 2 B A^H - N]``.

Their low-rank forms in :mod:`~dtriv.retractions.stiefel` work on the ``2k x 2k`` matrix
:math:`W^H U`, which holds the Gram matrix :math:`N^H N`: its rounding errors are
:math:`\epsilon \|N\|_2^2`, and the results lose accuracy as :math:`\|N\|_2^2` grows
(measured, float32, ``(64, 4)``, singular values of ``N`` ``(100, 1, 1, 1)``: 3e-5 for the
Cayley map, 7e-5 for the canonical geodesic and 1e-4 for the embedded one, where the dense
``n x n`` formulas in float32 give 5e-6 and 2e-5 for the first two; at ``(10^4, 1, 1, 1)``,
0.3 and 0.4 for the first two, no longer near the manifold). Here the same maps are
computed without a Gram matrix. With the Householder QR ``U = QR`` (``Q``, ``n x m``,
``m = min(n, 2k)``, has orthonormal columns whatever the rank of ``U``: ``V = 0`` included),
:math:`\Omega = Q \hat\Omega Q^H` with the ``m x m`` matrix :math:`\hat\Omega = R R_W^H`,
:math:`R_W = Q^H W` (a rearrangement of the columns of ``R``: ``W``'s columns are
combinations of ``U``'s), so, as :math:`f(0) = I`,

.. math:: f(\Omega) B = B + Q\,(f(\hat\Omega) - I)\,R_B, \qquad R_B = Q^H B,

the last ``k`` columns of ``R``. :math:`f(\hat\Omega)` is the map of a small skew matrix,
whose Cayley factor :math:`I - \hat\Omega/2` has singular values at least 1: the results
are as accurate as the dense formulas in the same precision (same case: 7e-7 and 3e-6;
4e-5 and 2e-5 at ``(10^3, 1, 0.1, 0)``, where the dense formulas give 3e-5 and 6e-5).

Backward. ``Q`` is not differentiated: the QR's derivative is singular where ``U`` loses
rank (``V = 0``, a vertical ``V = B A``, ``n < 2k``), while the map is smooth. Its first
derivative is that of

.. math:: Q f(\hat\Omega) Q^H B + (I - Q Q^H) B + (I - Q Q^H)\, U Z, \qquad
          \hat\Omega = Q^H U W^H Q,

with ``Q`` and :math:`Z = R_W^H \varphi(\hat\Omega) R_B` held constant (the last term is 0):
in the basis ``[Q, Q_\perp]`` the matrix :math:`\Omega` is block diagonal,
:math:`\operatorname{diag}(\hat\Omega, 0)`, and the Fréchet derivative of ``f`` there maps
the block ``(\perp, Q)`` of a direction ``E`` to :math:`E_{\perp Q} \varphi(\hat\Omega)`,
with :math:`\varphi` the divided difference of ``f`` between :math:`\hat\Omega` and 0,
:math:`\varphi(x) = (f(x) - 1)/x` (Cayley: :math:`(1 - x/2)^{-1}`; exponential:
:math:`(e^x - 1)/x`); the block ``(Q, \perp)`` meets ``B`` as 0 and the block
``(\perp, \perp)`` of :math:`d\Omega` is 0. The backward applies the adjoint of that
expression: ``n x m`` by ``m x 2k`` products and ``m x m`` matrix functions.
Second derivatives (a backward with ``create_graph=True``) differentiate the low-rank
reference form of the map instead, recomputed from ``B`` and ``V``: the gradient such a
backward returns has the Gram form's accuracy (float32, singular values ``(10^3, 1, 0.1,
0)``: 1e-2 against 3e-5 without ``create_graph``), as under ``torch.func`` transforms.

Cost: the Householder QR of an ``n x 2k`` matrix, which on a CPU costs about 35 products of
``n x k`` by ``k x k`` (measured, float32, 2 threads: ``n x 2k`` = (4096, 128) 8.1 ms and
(1024, 128) 2.7 ms, against 0.24 and 0.07 ms for one product), several times the Gram form
(5 to 7 such products): the maps take this path only where their Gram form would lose
accuracy (:func:`takes_basis`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._common import (
    backward_without_autocast,
    forward_ad_active,
    no_host_reads,
    solve,
    transforms_active,
)
from .lie import expm

__all__ = ["GRAM_MAX_NORM", "map_in_basis", "takes_basis"]

#: the Gram forms are used while :math:`\|U_1\|_2 \le` this bound for every matrix of the batch
#: (``U_1`` the first block of ``U``: ``PV`` or ``N``), bounded through the 1-norm of the Gram
#: matrix :math:`\|U_1^H U_1\|_1 \ge \|U_1\|_2^2`. There their error, about
#: :math:`\epsilon \|U_1\|_2^2 / 20` (measured, float32, ``(64, 4)`` and ``(64, 8)``), is at
#: most a few units of rounding more than the basis form's, which costs a QR.
GRAM_MAX_NORM = 10.0


def takes_basis(gram: Tensor) -> bool:
    r"""Whether the maps take the basis form for the Gram matrices ``gram`` (``(..., k, k)``,
    :math:`U_1^H U_1`, already computed by the Gram form): the largest 1-norm of the batch
    exceeds ``GRAM_MAX_NORM ** 2``. Only in eager code with values to read: under
    ``torch.func`` transforms, forward-mode derivatives, ``torch.jit.trace``/``torch.export``,
    ``torch.compile`` and for meta tensors the Gram form is kept (a host read there would
    be frozen, refused or impossible); so is it for empty matrices. One reduction over
    ``k x k`` and one host read."""
    if (gram.numel() == 0 or no_host_reads(gram) or transforms_active()
            or forward_ad_active() or torch.compiler.is_compiling()):
        return False
    with torch.no_grad():
        norm = torch.linalg.matrix_norm(gram, ord=1)
        try:  # any: a matrix with NaN entries leaves the others their own test
            return bool((norm > GRAM_MAX_NORM**2).any())
        except RuntimeError:  # no value to read (fake tensors): the Gram form
            return False


#: the factor of ``A`` in the second block of ``W = [B, c B A^H - N]`` of the exponential kinds
_A_FACTOR = {"exp_canonical": 1.0, "exp": 2.0}


def _factors(kind: str, B: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(C, X, Q, R, R_W)``: ``C = B^H V``, the first block ``X`` of ``U = [X, B]`` (``PV`` or
    ``N``), the QR of ``U`` and :math:`R_W = Q^H W`."""
    k = B.shape[-1]
    C = B.mH @ V
    X = V - B @ C * 0.5 if kind == "cayley" else V - B @ C
    Q, R = torch.linalg.qr(torch.cat([X, B], dim=-1))
    R1, R2 = R[..., :k], R[..., k:]
    if kind == "cayley":  # W = [B, -PV]
        RW = torch.cat([R2, -R1], dim=-1)
    else:  # W = [B, c B A^H - N]
        RW = torch.cat([R2, _A_FACTOR[kind] * (R2 @ C.mH) - R1], dim=-1)
    return C, X, Q, R, RW


@backward_without_autocast
class _SkewMapInBasis(torch.autograd.Function):
    """:math:`f(\\Omega) B` in the basis of ``U`` (see the module docstring); ``kind`` is
    ``"cayley"``, ``"exp_canonical"`` or ``"exp"``, ``reference(B, V)`` the map's Gram form
    (for second derivatives)."""

    @staticmethod
    def forward(ctx, B: Tensor, V: Tensor, kind: str,  # type: ignore[override]
                reference: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        k = B.shape[-1]
        C, _, Q, R, RW = _factors(kind, B, V)
        Om = R @ RW.mH
        m = Om.shape[-1]
        R2 = R[..., k:]
        if kind == "cayley":
            K = -0.5 * Om
            K.diagonal(dim1=-2, dim2=-1).add_(1.0)
            T = solve(K, R2)  # (I - Om/2)^{-1} R_B = phi(Om) R_B
            D = T.sub(R2).mul_(2.0)  # (f(Om) - I) R_B
            Phi, aux = T, K
        else:
            # exp([[Om, R_B], [0, 0]]) = [[e^Om, phi(Om) R_B], [0, I]]
            aug = Om.new_zeros(*Om.shape[:-2], m + k, m + k)
            aug[..., :m, :m] = Om
            aug[..., :m, m:] = R2
            E = expm(aug)
            F, Phi = E[..., :m, :m], E[..., :m, m:]
            D = F @ R2 - R2
            aux = F
        ctx.kind, ctx.reference = kind, reference
        ctx.save_for_backward(B, V, C, Q, R, RW, Om, Phi, aux)
        return B + Q @ D

    @staticmethod
    def backward(ctx, G: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors  # (read once: activation checkpointing allows one unpack)
        B, V = saved[:2]
        if torch.is_grad_enabled():  # differentiated backward: the Gram form, recorded
            wanted = [t for t, need in zip((B, V), ctx.needs_input_grad[:2]) if need]
            grads = iter(torch.autograd.grad(ctx.reference(B, V), wanted, G,
                                             create_graph=True, allow_unused=True))
            return (*(next(grads) if need else None for need in ctx.needs_input_grad[:2]),
                    None, None)
        return (*_backward(ctx.kind, *saved, G), None, None)


def _backward(kind: str, B: Tensor, V: Tensor, C: Tensor, Q: Tensor, R: Tensor, RW: Tensor,
              Om: Tensor, Phi: Tensor, aux: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    r"""The gradients in ``B`` and ``V``: the adjoint of the first derivative of the expression
    of the module docstring, with ``Q`` and ``Z`` constant."""
    k = B.shape[-1]
    R2 = R[..., k:]
    Gh = Q.mH @ G  # the cotangent in the basis ...
    Gp = G - Q @ Gh  # ... and off it
    Z = RW.mH @ Phi  # (2k, k)
    if kind == "cayley":
        Zh = solve(aux.mH, Gh)  # (I - Om/2)^{-H} Gh
        Om_bar = Zh @ Phi.mH  # (I - Om/2)^{-H} Gh R_B^H (I - Om/2)^{-H}
        RB_bar = 2 * Zh - Gh  # f(Om)^H Gh
    else:
        with torch.enable_grad():  # the adjoint Frechet derivative of expm at Om
            Om_ = Om.detach().requires_grad_(True)
            (Om_bar,) = torch.autograd.grad(expm(Om_), Om_, Gh @ R2.mH)
        RB_bar = aux.mH @ Gh
    RU_bar = Om_bar @ RW  # Om = R R_W^H
    RW_bar = Om_bar.mH @ R
    # U = [X, B] and W = [B, W_2]: the coefficients of Q and of Gp in the gradients of X, B
    X_q = RU_bar[..., :k] - RW_bar[..., k:]
    B_q = RB_bar + RU_bar[..., k:] + RW_bar[..., :k]
    if kind != "cayley":  # W_2 = c B A^H - N
        B_q = B_q + _A_FACTOR[kind] * (RW_bar[..., k:] @ C)
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    grads = Q @ torch.cat([X_q, B_q], dim=-1) + Gp @ torch.cat(
        [Z[..., :k, :].mH, Z[..., k:, :].mH + eye], dim=-1)
    X_bar, B_bar = grads[..., :k], grads[..., k:]
    if kind == "cayley":  # X = PV = V - B C/2, C = B^H V
        D = B.mH @ X_bar
        V_bar = X_bar - B @ D / 2
        B_bar = B_bar - (X_bar @ C.mH + V @ D.mH) / 2
    else:  # X = N = V - B A, A = C = B^H V (and A in W_2 = c B A^H - N)
        A_bar = _A_FACTOR[kind] * (RW_bar[..., k:].mH @ R2) - B.mH @ X_bar
        V_bar = X_bar + B @ A_bar
        B_bar = B_bar - X_bar @ C.mH + V @ A_bar.mH
    return B_bar, V_bar


def map_in_basis(kind: str, B: Tensor, V: Tensor,
                 reference: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """:math:`f(\\Omega) B` of the map ``kind`` (``"cayley"``, ``"exp_canonical"``, ``"exp"``) in
    the basis of ``U`` (module docstring); ``reference`` is the map's Gram form, which a
    differentiated backward records. Eager code only (:func:`takes_basis`)."""
    return _SkewMapInBasis.apply(B, V, kind, reference)
