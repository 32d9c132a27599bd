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

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_floating, check_matrix, compute_dtype, upcast_half

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
    that ``torch.nn.utils.parametrizations.spectral_norm`` creates (it runs 15 steps).

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


@upcast_half
def clip_singular_values(W: Tensor, upper: float = 1.0, lower: float = 0.0) -> Tensor:
    r"""Clip the singular values of ``W`` to ``[lower, upper]``.

    With the thin SVD :math:`W = U\operatorname{diag}(\sigma)V^H`, returns
    :math:`U\operatorname{diag}(\min(\max(\sigma, \ell), u))V^H`, the nearest matrix with
    singular values in :math:`[\ell, u]` (Frobenius and spectral norms). Differentiable
    (through the SVD: finite for distinct singular values), batched, real or complex.

    Args:
        W: ``(..., n, k)`` real or complex.
        upper: largest admitted singular value (> 0; ``float("inf")`` for none).
        lower: smallest admitted singular value (0 <= lower <= upper).

    Returns:
        ``(..., n, k)``, dtype of ``W``.

    Raises:
        ValueError: for ``lower < 0``, ``upper <= 0`` or ``lower > upper``.

    Cost: one thin SVD, :math:`O(nk\min(n, k))`, plus a product of the same order.
    """
    check_matrix(W, "W")
    check_floating(W, "W")
    if not upper > 0:
        raise ValueError(f"upper: expected a positive bound, got {upper}")
    if not lower >= 0:
        raise ValueError(f"lower: expected a non-negative bound, got {lower}")
    if lower > upper:
        raise ValueError(f"lower: expected lower <= upper = {upper}, got {lower}")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    S = S.clamp(min=lower, max=upper)
    return (U * S.unsqueeze(-2).to(U.dtype)) @ Vh
