r"""Spectral maps: power iteration for the largest singular value, and singular-value clipping.

The power iteration keeps persistent vectors ``u`` (``h``) and ``v`` (``w``) for a matrix
``W`` (``h x w``) and updates them **in place** (``out=``), exactly as
``torch.nn.utils.parametrizations.spectral_norm`` does with its ``_u`` and ``_v`` buffers, so
that buffers shared with module replicas (``DataParallel``) see the update:

.. math::
    u \leftarrow \frac{W v}{\max(\|W v\|, \epsilon)}, \qquad
    v \leftarrow \frac{W^H u}{\max(\|W^H u\|, \epsilon)}, \qquad
    \sigma \approx u^H W v.

:func:`clip_singular_values` maps :math:`W = U\operatorname{diag}(\sigma)V^H` to
:math:`U\operatorname{diag}(\operatorname{clamp}(\sigma, \ell, u))V^H`, the nearest matrix
(in every unitarily invariant norm) with singular values in :math:`[\ell, u]`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    apply_function,
    backward_without_autocast,
    check_floating,
    check_matrix,
    compute_dtype,
    jvp_differentiated,
    nested_forward_ad,
    upcast_half,
)

__all__ = [
    "power_iteration_init",
    "power_iteration_",
    "spectral_norm_estimate",
    "clip_singular_values",
]


def _check_vectors(W: Tensor, u: Tensor, v: Tensor) -> None:
    h, w = W.shape[-2], W.shape[-1]
    batch = tuple(W.shape[:-2])
    for t, name, size in ((u, "u", h), (v, "v", w)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (*batch, size):
            raise ValueError(
                f"{name}: expected shape {(*batch, size)} for W of shape {tuple(W.shape)}, "
                f"got {tuple(t.shape)}"
            )
        if t.dtype != W.dtype:
            raise ValueError(f"{name}: expected dtype {W.dtype} (that of W), got {t.dtype}")


def _mv(W: Tensor, x: Tensor) -> Tensor:
    return torch.mv(W, x) if W.ndim == 2 else (W @ x.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def power_iteration_(W: Tensor, u: Tensor, v: Tensor, n_iterations: int = 1,
                     eps: float = 1e-12) -> None:
    r"""Run ``n_iterations`` steps of the power iteration on ``W``, updating ``u``, ``v`` in place.

    Each step is :math:`u \leftarrow Wv/\max(\|Wv\|, \epsilon)`, then
    :math:`v \leftarrow W^Hu/\max(\|W^Hu\|, \epsilon)`, written into the storage of ``u`` and
    ``v`` with ``F.normalize(..., out=)`` (they keep their identity and ``data_ptr``):
    for a 2-D ``W`` this is bit for bit ``_SpectralNorm._power_method`` of
    ``torch.nn.utils.parametrizations.spectral_norm``. ``u`` converges to the leading left
    singular vector at the rate :math:`(\sigma_2/\sigma_1)^2` per step. Runs under
    ``no_grad``. Half-precision vectors are updated through a float32 computation.

    Args:
        W: ``(..., h, w)`` real or complex matrix (leading dimensions: a batch).
        u: ``(..., h)`` unit vector, dtype of ``W``, updated in place.
        v: ``(..., w)`` unit vector, dtype of ``W``, updated in place.
        n_iterations: number of steps (>= 0).
        eps: lower bound of the norms divided by.

    Cost: :math:`4hw` flops per step (two matrix-vector products).
    """
    check_matrix(W, "W")
    check_floating(W, "W")
    _check_vectors(W, u, v)
    if n_iterations < 0:
        raise ValueError(f"n_iterations: expected a non-negative integer, got {n_iterations}")
    if compute_dtype(W.dtype) != W.dtype:
        Wc = W.to(compute_dtype(W.dtype))
        uc, vc = u.to(Wc.dtype), v.to(Wc.dtype)
        power_iteration_(Wc, uc, vc, n_iterations, eps)
        u.copy_(uc)
        v.copy_(vc)
        return
    _power_steps_(W, u, v, n_iterations, eps)


def _normalize_into(x: Tensor, eps: float, out: Tensor) -> None:
    """``F.normalize(x, dim=-1, eps=eps, out=out)`` without its Python layers (the same two
    kernels: the norm, clamped below by ``eps``, then the division)."""
    torch.div(x, torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(eps), out=out)


def _power_steps_(W: Tensor, u: Tensor, v: Tensor, n_iterations: int, eps: float) -> None:
    """The steps of :func:`power_iteration_` on checked arguments of a compute dtype (float32,
    float64 or complex), recording no graph: ``W`` detached, ``u``, ``v`` without gradient."""
    WH = W.mH
    for _ in range(n_iterations):
        _normalize_into(_mv(W, v), eps, u)
        _normalize_into(_mv(WH, u), eps, v)


@torch.no_grad()
def power_iteration_init(W: Tensor, eps: float = 1e-12, n_warmup: int = 15,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    r"""Random unit vectors ``u``, ``v`` for :func:`power_iteration_`, after ``n_warmup`` steps.

    ``u`` (``h``) then ``v`` (``w``) are drawn from a standard normal distribution (in that
    order, with ``Tensor.normal_``), normalised, and refined by ``n_warmup`` steps of the
    power iteration: from the same random state this reproduces the ``_u``, ``_v`` buffers
    that the constructor of torch's ``_SpectralNorm`` creates (it runs 15 steps);
    ``spectral_norm(module)`` then runs one more step at registration (a training forward).

    Args:
        W: ``(..., h, w)`` real or complex matrix (leading dimensions: a batch).
        eps: lower bound of the norms divided by.
        n_warmup: number of initial power-iteration steps.
        generator: random generator (default: the global one).

    Returns:
        ``(u, v)`` of shapes ``(..., h)`` and ``(..., w)``, dtype and device of ``W``.

    Cost: :math:`O(h + w)` to draw, plus :math:`4hw` flops per warm-up step.
    """
    check_matrix(W, "W")
    check_floating(W, "W")
    batch, h, w = tuple(W.shape[:-2]), W.shape[-2], W.shape[-1]
    u = W.new_empty(*batch, h).normal_(0, 1, generator=generator)
    v = W.new_empty(*batch, w).normal_(0, 1, generator=generator)
    u = F.normalize(u, dim=-1, eps=eps)
    v = F.normalize(v, dim=-1, eps=eps)
    power_iteration_(W, u, v, n_warmup, eps)
    return u, v


def spectral_norm_estimate(W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    r"""Estimate of the largest singular value: :math:`\sigma = u^H W v`.

    Equals :math:`\|W\|_2` when ``u``, ``v`` are the leading singular vectors (e.g. after
    :func:`power_iteration_` has converged). Differentiable in ``W``; ``u`` and ``v`` are
    treated as constants and cloned first (as ``spectral_norm`` does), so that a later
    in-place power-iteration step does not invalidate the autograd graph. Half precision is
    computed in float32.

    Args:
        W: ``(..., h, w)`` real or complex matrix.
        u: ``(..., h)``, dtype of ``W``.
        v: ``(..., w)``, dtype of ``W``.

    Returns:
        ``(...)`` (a 0-dim tensor for 2-D ``W``), dtype of ``W``
        (complex for complex ``W``, with a real part equal to :math:`\sigma` up to rounding).

    Cost: :math:`2hw` flops (one matrix-vector product and one dot product).
    """
    check_matrix(W, "W")
    check_floating(W, "W")
    _check_vectors(W, u, v)
    return _estimate(W, u, v)


@upcast_half
def _estimate(W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    u = u.clone(memory_format=torch.contiguous_format)
    v = v.clone(memory_format=torch.contiguous_format)
    if W.ndim == 2:
        return torch.vdot(u, torch.mv(W, v))
    return (u.conj() * _mv(W, v)).sum(dim=-1)


def _clip_coefficients(S: Tensor, upper: float, lower: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
    r"""The divided differences of :math:`f(s) = \operatorname{clamp}(s, \ell, u)` that the
    derivative of :math:`U f(\Sigma) V^H` needs, for singular values ``S`` ``(..., m)``:

    * ``C_s`` ``(..., m, m)``: :math:`(f(s_i) - f(s_j))/(s_i - s_j)`, and :math:`f'(s_i)` where
      :math:`s_i = s_j` (the diagonal included), with :math:`f' = 1` on the closed interval
      :math:`[\ell, u]` (as ``torch.clamp``'s gradient) and 0 outside;
    * ``C_k`` ``(..., m, m)``: :math:`(f(s_i) + f(s_j))/(s_i + s_j)`;
    * ``q`` ``(..., m)``: :math:`f(s_i)/s_i`.

    At :math:`s_i = s_j = 0` the last two take their limit :math:`f'(0^+) = 1` when
    :math:`\ell = 0`; for :math:`\ell > 0` the map is not differentiable there (the clipped
    directions are arbitrary) and they are infinite (the gradient is not finite).
    """
    F_ = S.clamp(min=lower, max=upper)
    fprime = ((S >= lower) & (S <= upper)).to(S.dtype)
    Si, Sj = S.unsqueeze(-1), S.unsqueeze(-2)
    Fi, Fj = F_.unsqueeze(-1), F_.unsqueeze(-2)
    diff = Si - Sj
    same = diff == 0
    C_s = torch.where(same, fprime.unsqueeze(-1).expand_as(diff),
                      (Fi - Fj) / torch.where(same, torch.ones_like(diff), diff))
    at_zero = 1.0 if lower == 0 else float("inf")
    total = Si + Sj
    positive = total > 0
    C_k = torch.where(positive, (Fi + Fj) / torch.where(positive, total, torch.ones_like(total)),
                      torch.full_like(total, at_zero))
    q = torch.where(S > 0, F_ / torch.where(S > 0, S, torch.ones_like(S)),
                    torch.full_like(S, at_zero))
    return C_s, C_k, q


def _clip_backward(U: Tensor, S: Tensor, Vh: Tensor, G: Tensor, upper: float,
                   lower: float) -> Tensor:
    r"""The gradient of :math:`W = U\Sigma V^H \mapsto U f(\Sigma) V^H` (thin SVD, ``m``
    singular values) given the output's gradient ``G``.

    With :math:`\bar P = U^H G V`, :math:`\operatorname{He}` and :math:`\operatorname{Sk}` its
    Hermitian and skew-Hermitian parts, and the coefficients of :func:`_clip_coefficients`:

    .. math::
        \bar W = U\,(C_s \circ \operatorname{He}\bar P + C_k \circ \operatorname{Sk}\bar P)\,V^H
                  + (G V - U \bar P)\operatorname{diag}(q)\,V^H
                  + U \operatorname{diag}(q)\,(U^H G - \bar P V^H),

    the second term for tall ``W`` (``n > m``), the third for wide (``k > m``). Only sums and
    differences of singular values are divided by, never :math:`s_i^2 - s_j^2`: the gradient
    is finite at repeated singular values (a multiple of the identity, values clipped to the
    same bound), where the generic SVD backward is not.
    """
    C_s, C_k, q = (c.to(G.dtype) for c in _clip_coefficients(S, upper, lower))
    V = Vh.mH
    GV = G @ V
    P = U.mH @ GV
    Ph = P.mH
    M = C_s * ((P + Ph) / 2) + C_k * ((P - Ph) / 2)
    grad = U @ M @ Vh
    n, k, m = G.shape[-2], G.shape[-1], S.shape[-1]
    if n > m:
        grad = grad + ((GV - U @ P) * q.unsqueeze(-2)) @ Vh
    if k > m:
        grad = grad + U @ (q.unsqueeze(-1) * (U.mH @ G - P @ Vh))
    return grad


@backward_without_autocast
class _ClipSingularValues(torch.autograd.Function):
    r"""``W -> U clamp(S, lower, upper) V^H`` with the closed-form backward of
    :func:`_clip_backward` (finite at repeated singular values). Differentiating the backward
    (``create_graph=True``) recomputes the SVD differentiably and applies the same formula.

    The map is the gradient of the unitarily invariant function :math:`\sum_i h(\sigma_i)`
    with :math:`h' = \operatorname{clamp}(\cdot, \ell, u)` (Lewis), so its derivative is
    that function's Hessian, self-adjoint for :math:`\operatorname{Re}\operatorname{tr}(A^H
    B)`: the forward-mode derivative (``jvp``) is the same formula applied to the tangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(W: Tensor, upper: float, lower: float):  # type: ignore[override]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        out = (U * S.clamp(min=lower, max=upper).unsqueeze(-2).to(U.dtype)) @ Vh
        return out, U, S, Vh

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        W, upper, lower = inputs
        ctx.bounds = (upper, lower)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(W, *output[1:])
        ctx.save_for_forward(W, *output[1:])

    @staticmethod
    def jvp(ctx, dW: Tensor | None, *unused):  # type: ignore[override]
        if dW is None:
            return None, None, None, None
        W, U, S, Vh = ctx.saved_tensors
        if jvp_differentiated(W):  # reverse over forward: differentiable in W
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return _clip_backward(U, S, Vh, dW, *ctx.bounds), None, None, None

    @staticmethod
    def backward(ctx, G: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if G is None or not ctx.needs_input_grad[0]:
            return None, None, None
        W, U, S, Vh = ctx.saved_tensors
        if torch.is_grad_enabled():  # differentiable recomputation for higher orders
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return _clip_backward(U, S, Vh, G, *ctx.bounds), None, None


@upcast_half
def clip_singular_values(W: Tensor, upper: float = 1.0, lower: float = 0.0) -> Tensor:
    r"""Clip the singular values of ``W`` to ``[lower, upper]``.

    With the thin SVD :math:`W = U\operatorname{diag}(\sigma)V^H`, returns
    :math:`U\operatorname{diag}(\min(\max(\sigma, \ell), u))V^H`, the nearest matrix with
    singular values in :math:`[\ell, u]` (Frobenius and spectral norms). Batched, real or
    complex. The gradient is the closed form of :func:`_clip_backward`, which divides by sums
    and differences of singular values only: it is finite at repeated singular values (e.g.
    ``W`` a multiple of the identity, or several values clipped to one bound). It is not
    finite only at a zero singular value with ``lower > 0``, where the map is not
    differentiable.

    Args:
        W: ``(..., n, k)`` real or complex.
        upper: largest admitted singular value (> 0; ``float("inf")`` for none).
        lower: smallest admitted singular value (0 <= lower <= upper).

    Returns:
        ``(..., n, k)``, dtype of ``W``.

    Raises:
        ValueError: for ``lower < 0`` or infinite, ``upper <= 0`` or ``lower > upper``.

    Cost: one thin SVD, :math:`O(nk\min(n, k))`, plus a product of the same order; the
    backward :math:`O(nk\min(n, k))` (a few products, no second SVD).
    """
    check_matrix(W, "W")
    check_floating(W, "W")
    if not upper > 0:
        raise ValueError(f"upper: expected a positive bound, got {upper}")
    if not (lower >= 0 and math.isfinite(lower)):
        raise ValueError(f"lower: expected a finite non-negative bound, got {lower}")
    if lower > upper:
        raise ValueError(f"lower: expected lower <= upper = {upper}, got {lower}")
    if nested_forward_ad():  # torch 2.13 does not differentiate a custom jvp here
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return (U * S.clamp(min=lower, max=upper).unsqueeze(-2).to(U.dtype)) @ Vh
    return apply_function(_ClipSingularValues, W, float(upper), float(lower))[0]
