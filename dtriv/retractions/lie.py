r"""Lie-algebra maps: skew-Hermitian matrices to orthogonal/unitary ones, and their inverses.

For a skew-Hermitian :math:`A` (:math:`A^H = -A`, real or complex, shape ``(..., n, n)``):

* :func:`expm` -- the matrix exponential :math:`e^A` (surjective onto SO(n)/U(n));
* :func:`cayley` -- the Cayley transform :math:`(I - A/2)^{-1}(I + A/2)`;
* :func:`logm` -- the principal logarithm of an orthogonal/unitary :math:`Q` without
  eigenvalue :math:`-1` (its inverse on skew :math:`A` with spectral radius :math:`< \pi`);
* :func:`cayley_inverse` -- :math:`2(Q - I)(Q + I)^{-1}`.

Both inverses are singular at matrices with eigenvalue :math:`-1`. Near them they raise a
``ValueError`` that states the measured distance of the spectrum from :math:`-1` rather than
return a result dominated by rounding errors.

Registered as kind ``"lie"``: ``"expm"`` (inverse :func:`logm`) and ``"cayley"`` (inverse
:func:`cayley_inverse`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _lu
from ._block_inverse import LEAF as BLOCK_LEAF
from ._block_inverse import block_inverse
from ._common import (
    apply_function,
    backward_without_autocast,
    cached_eye,
    cached_outside_transforms,
    check_flag,
    check_floating,
    check_matrix,
    derivative_transform_around,
    eps,
    forward_ad_active,
    jvp_differentiated,
    jvp_transform_active,
    nested_forward_ad,
    no_host_reads,
    reports_backward,
    solve,
    tracing,
    transforms_active,
    upcast_half,
    values_checkable,
)
from ._expm import (
    NonFiniteError,
    TaylorSplit,
    _mm_into,
    _one_norm,
    choose_degree,
    expm_of_skew_taylor,
    expm_pade_autograd,
    expm_skew_taylor,
    groups_by_squarings,
    skew_of,
    skew_of_adjoint,
)
from ._layout import transposable
from ._scratch import Arena
from .registry import register

__all__ = ["expm", "expm_of_skew", "logm", "cayley", "cayley_of_skew", "cayley_inverse"]


def _default_tol(dtype: torch.dtype, tol: float | None) -> float:
    return math.sqrt(eps(dtype)) if tol is None else float(tol)


def _complex(X: Tensor) -> Tensor:
    return X if X.is_complex() else X.to(torch.complex128 if X.dtype == torch.float64
                                         else torch.complex64)


def _eye(Q: Tensor) -> Tensor:
    return torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)


def _distance_to_minus_one(Q: Tensor) -> Tensor:
    """Smallest singular value of ``Q + I`` per matrix (for normal ``Q``: the distance of its
    spectrum from -1); zero where it is not finite."""
    M = Q + _eye(Q)
    finite = torch.isfinite(M).all(dim=(-2, -1))
    M = torch.where(finite[..., None, None], M, torch.zeros_like(M))
    return torch.linalg.svdvals(M)[..., -1]


def _raise_near_minus_one(Q: Tensor, name: str, bad: Tensor, tol: float,
                          detail: str = "") -> None:
    """Raise the error of the inverses for the first flagged matrix of the batch."""
    dist = _distance_to_minus_one(Q)
    flat_bad = bad.reshape(-1)
    flat_dist = torch.where(flat_bad, dist.reshape(-1), torch.inf)
    worst = int(torch.argmin(flat_dist))
    d = float(dist.reshape(-1)[worst])
    where = ""
    if bad.ndim > 0:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), bad.shape))
        where = f" at batch index {index}"
    if not bool(torch.isfinite(Q.reshape(-1, *Q.shape[-2:])[worst]).all()):
        raise ValueError(f"{name}: expected finite entries, got NaN or infinity{where}")
    msg = (
        f"{name}: expected a matrix without eigenvalue -1 (distance of the spectrum from -1, "
        f"measured as the smallest singular value of {name} + I, at least {tol:.2e}), "
        f"got distance {d:.3e}{where}"
    )
    if not Q.is_complex() and Q.shape[-1] > 0:
        det = torch.linalg.det(Q.reshape(-1, *Q.shape[-2:])[worst])
        if det < 0:
            msg += (
                f"; det({name}) = {float(det):.6f}: a real orthogonal matrix with det -1 always "
                "has the eigenvalue -1, so neither the exponential nor the Cayley map of a real "
                "skew matrix reaches it (flip the sign of one column to reach det +1)"
            )
    msg += detail + "; the map is singular (its inverse is unbounded) at eigenvalue -1"
    raise ValueError(msg)


def _is_skew(A: Tensor) -> bool:
    """Whether ``A^H = -A`` holds exactly (``X - X^H`` is exactly skew in floating point)."""
    return bool(torch.equal(A.mH, -A)) if not A.requires_grad else bool(
        torch.equal(A.detach().mH, -A.detach()))


# Up to this size torch's C++ matrix_exp is used: at n = 1 its forward is a scalar exp
# (~2 us against ~150 us for the Python-level Padé dispatch). n = 2 is not delegated although
# torch is faster on batches there (ours 0.6-0.9x forward + backward): torch's float32 result
# is off the orthogonal group by up to 3e-5 (a rotation by 0.57 rad), where the Padé path stays
# at rounding level (test_expm_float32_is_orthogonal_for_2x2_rotations).
TORCH_MAX_N = 1


@upcast_half
def expm(A: Tensor) -> Tensor:
    r"""Matrix exponential :math:`Q = e^A = \sum_{j \ge 0} A^j / j!`.

    For skew-Hermitian :math:`A` (:math:`A^H = -A`) the result is orthogonal (real) or
    unitary (complex); every special-orthogonal/unitary matrix is reached. Any square
    :math:`A` is accepted (the gradient is exact for general :math:`A` too).

    Forward: scaling and squaring with a diagonal Padé approximant (Higham 2005),
    :math:`e^A \approx r_m(2^{-s}A)^{2^s}`, :math:`r_m = (V - U)^{-1}(V + U)`, degree
    :math:`m \in \{3, 5, 7, 9, 13\}` and :math:`s` chosen from the largest 1-norm of the
    batch against the thresholds :math:`\theta_m` of the precision (double: Higham's table
    up to :math:`m = 13`; single: his single-precision table up to :math:`m = 7`). A batch
    whose matrices ask for values of :math:`s` two or more apart is computed one group of
    equal :math:`s` at a time, so that a small matrix does not take a large one's squarings.
    Backward: the adjoint of the Fréchet derivative,
    :math:`\bar A = L_{\exp}(A)^*[G] = L_{\exp}(A^H, G)`, by the Al-Mohy--Higham (2009)
    recurrences with the forward's degree, scaling, powers, LU factors of :math:`V - U`
    (solved with the adjoint) and squarings (see :mod:`dtriv.retractions._expm`).
    Second derivatives (``create_graph=True``) are computed by torch's block formula.

    Exactly skew-Hermitian inputs (``A.mH == -A``, as ``X - X^H`` always is) take a faster
    path without any solve: the optimized Taylor polynomials of Bader, Blanes & Casas (2019),
    degree up to 18 in at most 5 products, with the degree and scaling chosen from the
    bound :math:`\|A\|_2 \le \min_k \|A^k\|_1^{1/k}` (valid for normal matrices, and much
    tighter than :math:`\|A\|_1`), differentiated by autograd through the products
    (:func:`~dtriv.retractions._expm.expm_skew_taylor`): forward :math:`\pi_m + s`
    products, backward twice that. There too a batch whose matrices' own bounds
    :math:`\|A_i^2\|_1^{1/2}` ask for squaring counts two or more apart is computed one
    group at a time (their 1-norms may be close while their spectra are not).
    Forward-mode derivatives (``torch.func.jvp``, ``jacfwd``) use the same recurrences.
    Triangular inputs that would take ``PADE_MAX_SQUARINGS`` squarings or more (the solve
    would leave rounding in their zeros, which the squarings double), matrices with
    ``n <= TORCH_MAX_N``, empty inputs, inputs with non-finite entries, calls
    under ``torch.func.vmap``, ``torch.jit.trace`` or ``torch.export`` and meta tensors (the
    degree is chosen from a data-dependent norm) go to ``torch.linalg.matrix_exp``; so do
    calls under nested forward mode (``jacfwd(jacfwd(f))``, where torch 2.13 drops the
    second-order terms of a custom Function's ``jvp``). A ``jvp`` that is itself
    differentiated (``jacrev(jacfwd(f))``) is torch's differentiable block formula.

    Args:
        A: ``(..., n, n)`` real or complex (skew-Hermitian for an orthogonal result).

    Returns:
        ``(..., n, n)``, same dtype as ``A``.

    Cost: forward :math:`\pi_m + s` matrix products (:math:`\pi_m = 2, 3, 4, 5, 6` for
    :math:`m = 3, \dots, 13`), one LU factorisation and a solve with :math:`n` right-hand
    sides;
    :math:`s = \max(0, \lceil\log_2(\|A\|_1/\theta_m)\rceil)`. Backward about
    :math:`2\pi_m + 1 + 2s` products and one pair of triangular solves, 2 to 3 times the
    forward (torch's backward is a :math:`2n \times 2n` exponential, about 8 times its
    forward, with a degree that grows with :math:`\|G\|`). Memory: about :math:`9 + s`
    saved :math:`n \times n` matrices per input matrix.
    """
    check_matrix(A, "A", square=True)
    check_floating(A, "A")
    if (A.shape[-1] <= TORCH_MAX_N or A.numel() == 0 or no_host_reads(A)
            or nested_forward_ad()):
        return torch.linalg.matrix_exp(A)
    try:
        norms = _one_norms(A)
    except RuntimeError:  # no data-dependent value here (inside torch.func.vmap)
        return torch.linalg.matrix_exp(A)
    if not all(map(math.isfinite, norms)):
        return torch.linalg.matrix_exp(A)
    groups = _scale_groups(norms, A.dtype)
    if groups is not None:  # matrices of very different norms: each group its own squarings
        return _per_group(A, groups, expm)
    norm = max(norms)
    if _is_skew(A):
        try:
            return expm_skew_taylor(A)
        except TaylorSplit as split:  # very different ||A_i^2||: each group its own plan
            return _per_group(A, split.groups, expm)
        except NonFiniteError:  # ||A^2|| overflows: torch's result
            return torch.linalg.matrix_exp(A)
    m, s = choose_degree(norm, A.dtype)
    if s >= PADE_MAX_SQUARINGS and _is_triangular(A):
        return torch.linalg.matrix_exp(A)
    return expm_pade_autograd(A, m, s)


# From this many squarings a triangular input goes to torch's matrix_exp. The Padé solve
# leaves rounding in the entries that are exactly zero, and every squaring doubles it, while
# torch's products keep the zeros: float64, [[a, b], [0, -a]], relative error 4.8e-6 at
# (0.1, 1e6) (18 squarings), 3e-2 at (5, 1e8) and 1e13 at (1, 1e10), against 1e-11, 9e-9 and
# 2e-6 for torch; float32, 0.43 at (1, 1e4) (12 squarings) against 1.2e-4. Up to 7 squarings
# the Padé path is as accurate. Other matrices stay on it: for them torch's result is no
# better, and its 2n x 2n backward less accurate (float32, the 2k + k block matrix of
# stiefel_exp's basis form at a tangent of norm 1e3: gradient 3e-4 against 1e-4 relative).
PADE_MAX_SQUARINGS = 8


def _is_triangular(A: Tensor) -> bool:
    """Whether every matrix of ``A`` is upper triangular, or every one lower triangular (two
    comparisons and host reads: only asked where the squarings are many)."""
    Ad = A.detach()
    return bool((Ad.tril(-1) == 0).all()) or bool((Ad.triu(1) == 0).all())


def _one_norms(A: Tensor) -> list[float]:
    """The 1-norm of each matrix of the batch ``A``, on the host (one read)."""
    return A.detach().abs().sum(dim=-2).amax(dim=-1).reshape(-1).tolist()


def _scale_groups(norms: list[float], dtype: torch.dtype) -> list[list[int]] | None:
    r"""The batch's matrices grouped by the number of squarings their own 1-norm asks for
    (:func:`~dtriv.retractions._expm.choose_degree`), or ``None`` when the counts differ by
    at most one.

    The degree and the scaling are chosen once per batch, from its largest norm: a matrix far
    smaller than the largest would take all of its squarings, and its error grows as
    :math:`2^{s - s_i}` times its own (measured, float32, n = 16: a generator of norm 1
    beside one of 1e3, 2.6e-5 against 6e-8 alone). So a batch whose counts differ by two or
    more is computed one group of equal counts at a time. One squaring more than needed
    changes the result at the rounding level (and keeps such batches one batched call)."""
    return groups_by_squarings(norms, lambda norm: choose_degree(norm, dtype)[1])


def _per_group(A: Tensor, groups: list[list[int]], fn) -> Tensor:
    """``fn`` on each group of the batch ``A`` (indices into its flattened batch), the results
    put back in order (``index_select`` and ``cat``: differentiable)."""
    flat = A.reshape(-1, *A.shape[-2:])
    order = torch.tensor([i for group in groups for i in group], device=A.device)
    pieces = [fn(flat.index_select(0, torch.tensor(group, device=A.device)))
              for group in groups]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=A.device)
    return torch.cat(pieces).index_select(0, inverse).reshape(A.shape)


@upcast_half
def expm_of_skew(X: Tensor, *, lower: bool = False) -> Tensor:
    r"""Exponential of the skew-Hermitian part: :math:`Q = e^{X - X^H}` (orthogonal/unitary).

    Equal to :func:`expm` ``(X - X.mH)`` (the same Taylor scheme, degree and scaling), with the
    exact gradient with respect to :math:`X`, :math:`\bar X = \bar A - \bar A^H` for
    :math:`\bar A` the gradient with respect to :math:`A = X - X^H`. Since only the
    skew-Hermitian part of :math:`\bar A` is needed, the backward through the squares
    :math:`A^2` and :math:`A^6 = (A^3)^2` (Hermitian along skew directions) costs one product
    each instead of two, and that through :math:`A^2` and :math:`A^3 = A^2 A` together two
    instead of three (:class:`~dtriv.retractions._expm.ExpmOfSkewTaylor`; in eager code
    written out, :class:`~dtriv.retractions._expm.ExpmOfSkewWrittenOut`). The same
    fallbacks as :func:`expm` apply (``n <= TORCH_MAX_N``, empty or non-finite input,
    ``torch.func.vmap``, tracing, meta tensors). Second derivatives and forward mode are
    supported.

    Args:
        X: ``(..., n, n)`` real or complex.
        lower: read ``X`` through its lower triangle, as torch's ``orthogonal`` does:
            :math:`Q = e^{L - L^H}` with :math:`L = \operatorname{tril}(X)`, the gradient
            :math:`\operatorname{tril}(\bar A - \bar A^H)`. Equal to
            ``expm_of_skew(X.tril())``, without the separate ``tril`` pass and its autograd
            node.

    Returns:
        ``(..., n, n)``, same dtype as ``X``.

    Cost: forward as :func:`expm` on a skew input (:math:`\pi_m + s` products); backward
    :math:`2(\pi_m + s)` products less one for :math:`A^6` and one for :math:`A^2` (two for
    :math:`A^2, A^3` together where the plan has both): for random
    generators with :math:`\|A\|_2 \approx 2` (degree 18, no squaring), 5 products forward
    and 7 backward; on CPU from ``n = 384`` the powers :math:`A^2, A^6` (Hermitian) and
    :math:`A^3` (skew-Hermitian) of the forward take three quarters of a product each (4.25
    forward).
    """
    check_matrix(X, "X", square=True)
    check_floating(X, "X")
    check_flag(lower, "lower")

    def reference() -> Tensor:
        L = X.tril() if lower else X
        return torch.linalg.matrix_exp(L - L.mH)

    if (X.shape[-1] <= TORCH_MAX_N or X.numel() == 0 or no_host_reads(X)
            or nested_forward_ad()):
        return reference()
    try:
        if X.ndim > 2:  # matrices of very different norms: each group its own squarings
            L = X.tril() if lower else X
            norms = _one_norms(L - L.mH)  # those of the generators exponentiated
            groups = _scale_groups(norms, X.dtype) if all(map(math.isfinite, norms)) else None
            if groups is not None:
                return _per_group(X, groups, lambda part: expm_of_skew(part, lower=lower))
        return expm_of_skew_taylor(X, lower)
    except TaylorSplit as split:  # very different ||A_i^2||: each group its own plan
        return _per_group(X, split.groups, lambda part: expm_of_skew(part, lower=lower))
    except NonFiniteError:  # non-finite entries (or ||A^2|| overflows): torch's result
        return reference()
    except RuntimeError:  # no data-dependent value here (inside torch.func.vmap)
        if not transforms_active():
            raise
        return reference()


# Up to this size cayley is one torch.linalg.solve (fewer Python-level autograd nodes; the
# inverse with its two-product backward wins from about n = 96 on CPU).
CAYLEY_SOLVE_MAX_N = 95


def _cayley_check(info: Tensor) -> None:
    if bool((info != 0).any()):
        raise ValueError(
            "A: expected a matrix A with I - A/2 invertible (true for every skew-Hermitian A), "
            "got one for which I - A/2 is singular"
        )


@backward_without_autocast
@reports_backward
class _Cayley(torch.autograd.Function):
    r""":math:`Q = 2M^{-1} - I`, :math:`M = I - A/2`, with the backward
    :math:`\bar A = M^{-H} G M^{-H}` from the saved :math:`M^{-1}`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(A: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        Id = _eye(A)
        if _block_inverse_applies(A, None, check_skew=True):  # as in _CayleyOfSkew
            Minv = block_inverse(torch.add(Id, A, alpha=-0.5), BLOCK_LEAF)
            return torch.add(-Id, Minv, alpha=2.0), Minv
        # Factor M^H (for a row-major M the column-major matrix LAPACK reads without a
        # copy) and solve M X = I as the adjoint system: measured 20% faster than inv(M).
        LU, pivots, info = _lu.lu_factor_ex(torch.add(Id, A, alpha=-0.5).mH)
        # Under torch.func transforms, jit tracing and export, and on meta tensors, info is
        # not read (data-dependent control flow; a singular I - A/2 then gives non-finite
        # entries), and vmap has no batching rule for out=.
        transformed = transforms_active() or no_host_reads(A)
        if not transformed:
            _cayley_check(info)
        Minv = torch.linalg.lu_solve(LU, pivots, Id.expand_as(A), adjoint=True)
        if transformed:
            return torch.add(-Id, Minv, alpha=2.0), Minv
        Q = torch.empty_like(Minv, memory_format=torch.contiguous_format)
        torch.mul(Minv, 2.0, out=Q)
        Q.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        return Q, Minv

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (A,) = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero gradient for M^{-1} (an n x n allocation)
        # the same tensors for both: torch.func's generated vmap rule keeps the batch dims of
        # the last call only (different ones failed jacrev(jacfwd) with "flat_bdims")
        ctx.save_for_backward(A, output[1])
        ctx.save_for_forward(A, output[1])

    @staticmethod
    def backward(ctx, G: Tensor | None, _unused: Tensor | None = None):  # type: ignore[override]
        if G is None:
            return None
        A, Minv = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: a differentiable M^{-1}
            Minv = _lu.inv(torch.add(_eye(A), A, alpha=-0.5))
        MinvH = Minv.mH
        return MinvH @ G.to(Minv.dtype) @ MinvH

    @staticmethod
    def jvp(ctx, dA: Tensor):  # type: ignore[override]
        A, Minv = ctx.saved_tensors
        if jvp_differentiated(A):  # reverse over forward: a differentiable M^{-1}
            Minv = _lu.inv(torch.add(_eye(A), A, alpha=-0.5))
        return Minv @ dA @ Minv, None


@upcast_half
def cayley(A: Tensor) -> Tensor:
    r"""Cayley transform :math:`Q = (I - A/2)^{-1}(I + A/2)`.

    For skew-Hermitian :math:`A` the matrix :math:`I - A/2` is invertible (its eigenvalues
    are :math:`1 - i\mu/2`, :math:`\mu` real) and :math:`Q` is orthogonal/unitary without
    eigenvalue :math:`-1`; it agrees with :math:`e^A` to second order at :math:`A = 0`.

    Computed as :math:`Q = 2M^{-1} - I` with :math:`M = I - A/2`, since
    :math:`I + A/2 = 2I - M` (for any square :math:`A`). With :math:`dM = -dA/2`,
    :math:`dQ = M^{-1}\,dA\,M^{-1}`, so the gradient is
    :math:`\bar A = M^{-H} G M^{-H}`: two products with the forward's :math:`M^{-1}`
    (torch's ``solve`` backward needs a solve with :math:`M^H` and a product). Any square
    :math:`A` with :math:`I - A/2` invertible is accepted; second derivatives and forward
    mode are supported. For ``n <= CAYLEY_SOLVE_MAX_N`` it is one
    ``torch.linalg.solve(I - A/2, I + A/2)`` instead (less overhead at small sizes); under
    ``torch.func`` transforms that solve is a product with ``torch.linalg.inv``
    (:func:`~dtriv.retractions._common.solve`: torch's forward-mode ``solve`` is wrong
    there), and under nested forward mode (``jacfwd(jacfwd(f))``) the map is the composition
    :math:`2\,\mathrm{inv}(I - A/2) - I` of torch operations.

    Args:
        A: ``(..., n, n)`` real or complex (skew-Hermitian for an orthogonal result).

    Returns:
        ``(..., n, n)``, same dtype as ``A``.

    Raises:
        ValueError: when :math:`I - A/2` is singular (inverse path; the solve path raises
            torch's error). Under ``torch.func`` transforms the inverse path cannot read the
            factorization's status and returns non-finite entries instead.

    Cost: one inverse (LU of :math:`M^H` and the adjoint solve with :math:`n` right-hand
    sides, about :math:`8n^3/3` flops, 4 products' time on CPU; for an exactly
    skew-Hermitian ``A`` the block elimination of :func:`cayley_of_skew` where it applies)
    forward; two products backward.
    """
    check_matrix(A, "A", square=True)
    check_floating(A, "A")
    if A.numel() == 0:
        return A.clone()
    if A.shape[-1] <= CAYLEY_SOLVE_MAX_N:
        # small n: one C++ solve node costs less than the Python autograd.Function overhead
        Id = _eye(A)
        return solve(torch.add(Id, A, alpha=-0.5), torch.add(Id, A, alpha=0.5))
    if nested_forward_ad():
        return _cayley_reference(A)
    return apply_function(_Cayley, A)[0]


def _cayley_reference(A: Tensor) -> Tensor:
    r""":math:`2(I - A/2)^{-1} - I` composed of torch operations (``torch.linalg.inv_ex``:
    non-finite entries where :math:`I - A/2` is singular), whose derivatives are right in
    every composition of ``torch.func`` transforms; for nested forward mode
    (:func:`~dtriv.retractions._common.nested_forward_ad`), where those of :class:`_Cayley`
    and :class:`_CayleyOfSkew` are not."""
    Id = _eye(A)
    return torch.add(-Id, _lu.inv_ex(torch.add(Id, A, alpha=-0.5))[0], alpha=2.0)


@cached_outside_transforms(maxsize=16)
def _eyes_cached(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    Id = cached_eye(n, dtype, device)
    return Id, -Id


def _eyes(X: Tensor) -> tuple[Tensor, Tensor]:
    """``(I, -I)`` of the size of ``X`` (cached outside ``torch.compile``; read-only)."""
    if torch.compiler.is_compiling():
        Id = _eye(X)
        return Id, -Id
    return _eyes_cached(X.shape[-1], X.dtype, X.device)


# The block inverse (no pivoting) is taken for M = I - A/2 when ||A||_1 is at most this: its
# error grows with ||A||_2^2 where LU's grows with ||A||_2 (M has Hermitian part I, so
# ||M^{-1}||_2 <= 1 and the error of Q = 2M^{-1} - I is at most twice the residual). The worst
# generators found couple the two halves of the indices by sums of signed permutations: over
# 12 of them in float32 at n = 400, the largest error on Q was 2.9e-6 at ||A||_1 = 16, 4.6e-6
# at 24, 7.3e-6 at 28 and 1.1e-5 at 32 (LU: below 1.3e-6 on all). 24 keeps that worst case
# within half the float32 tolerance of 1e-5 (orthogonality error 9.2e-6 there). Random
# generators with entries of variance 1/n are no less accurate than LU; their ||A||_1 is
# about 20 at n = 512 and 27 at n = 1024 (which takes LU).
BLOCK_MAX_NORM = 24.0
# Each level of the recursion adds its rounding: above 4 * BLOCK_LEAF rows (three levels or
# more) the same kind of generator (two-level couplings, 3 seeds) reached 1.25e-5 at n = 800
# and 1.5e-5 at n = 1600 with ||A||_1 = 24, 7.7e-6 and 1.2e-5 at 20, 7.5e-6 and 6.1e-6 at 16
# (at n = 512 and 768, two levels: 7.4e-6 and 6.7e-6 at 24). Those sizes take the block
# inverse up to this norm.
BLOCK_MAX_NORM_DEEP = 16.0


def _block_max_norm(n: int) -> float:
    r"""The largest :math:`\|A\|_1` for which an ``n x n`` Cayley transform takes the block
    inverse: ``BLOCK_MAX_NORM`` up to two levels of recursion, ``BLOCK_MAX_NORM_DEEP`` beyond."""
    return BLOCK_MAX_NORM if n <= 4 * BLOCK_LEAF else BLOCK_MAX_NORM_DEEP


def _block_inverse_applies(A: Tensor, arena: Arena | None, check_skew: bool = False) -> bool:
    r"""Whether the Cayley transform inverts ``M = I - A/2`` by :func:`block_inverse`: above
    ``BLOCK_LEAF`` rows, in plain eager code (the checks read values on the host), for a
    skew-Hermitian ``A`` (tested exactly with ``check_skew``; :class:`_CayleyOfSkew` builds
    one) and for :math:`\|A\|_1 \le` ``BLOCK_MAX_NORM`` (max row sum, A being skew; false
    for non-finite entries, which take the LU path; ``BLOCK_MAX_NORM_DEEP`` above
    ``4 * BLOCK_LEAF`` rows, :func:`_block_max_norm`). ``arena``: where ``|A|`` is written."""
    if A.shape[-1] <= BLOCK_LEAF or transforms_active() or no_host_reads(A):
        return False
    if check_skew and not _is_skew(A):
        return False
    scratch = None if arena is None or A.is_complex() else arena.empty()
    return _one_norm(A, scratch) <= _block_max_norm(A.shape[-1])


def _left_times_cayley(B: Tensor, Minv: Tensor) -> Tensor:
    r""":math:`B Q = 2 B M^{-1} - B` for :math:`Q = 2 M^{-1} - I`, one fused product."""
    return _mm_into(B, B, Minv, inplace=False, beta=-1.0, alpha=2.0)


@backward_without_autocast
@reports_backward
class _CayleyOfSkew(torch.autograd.Function):
    r""":math:`Q = 2M^{-1} - I`, :math:`M = I - A/2`, :math:`A = X - X^H` (with ``lower``,
    :math:`A = L - L^H`, :math:`L = \operatorname{tril}(X)`), with the backward
    :math:`\bar X = \bar A - \bar A^H` (its lower triangle with ``lower``),
    :math:`\bar A = M^{-H} G M^{-H}`.

    With a ``left`` factor :math:`B` the output is :math:`BQ = 2BM^{-1} - B` (one product,
    :math:`BM^{-1}`, which is saved), the gradient in :math:`Q` is :math:`B^H G`, so that
    :math:`\bar A = (BM^{-1})^H G M^{-H}` takes two products as without it, and that in
    :math:`B` is :math:`G Q^H = 2 G M^{-H} - G`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor, lower: bool, left: Tensor | None  # type: ignore[override]
                ) -> tuple[Tensor, Tensor]:
        # Few and fused operations: at small n each one costs about as much as the O(n^3) work.
        Id, neg_Id = _eyes(X)
        with Arena(X) as arena:  # A and M^H are temporaries (the factorization copies M^H)
            A = skew_of(X, lower, arena, out=arena.empty())
            if _block_inverse_applies(A, arena):
                Minv = block_inverse(torch.add(Id, A, alpha=-0.5), BLOCK_LEAF)
            else:
                Minv = None
                # Factor M^H = I + A/2 (for a row-major M the column-major matrix LAPACK reads
                # without a copy) and solve M Y = I as the adjoint system: measured 20% faster
                # than inv(M).
                LU, pivots, info = _lu.lu_factor_ex(
                    torch.add(Id, A, alpha=0.5, out=arena.empty()))
        column_major = Minv is None
        if column_major:
            # M is invertible for every X (A is skew): only non-finite input can fail, and
            # under torch.func transforms, tracing or on meta tensors info cannot be read
            # (data-dependent control flow).
            if not (transforms_active() or no_host_reads(X)) and (
                    info.item() if info.dim() == 0 else info.any()):
                _cayley_check(info)
            Minv = torch.linalg.lu_solve(LU, pivots, Id.expand_as(X), adjoint=True)
        if left is not None:  # B Q = 2 B M^{-1} - B; B M^{-1} is kept for the backward
            BMinv = torch.matmul(left, Minv)
            return torch.lerp(left, BMinv, 2.0), Minv, BMinv
        if not column_major:
            return torch.add(neg_Id, Minv, alpha=2.0), Minv
        # LAPACK returns M^{-1} column by column: the row-major Q reads it transposed, from
        # padded rows where that read would alias (_layout)
        return torch.add(neg_Id, transposable(Minv.mT).mT, alpha=2.0), Minv

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        X, lower, left = inputs
        ctx.lower = lower
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for M^{-1}, B M^{-1}
        # the same tensors for both (see _Cayley.setup_context); B M^{-1} last, with a left
        ctx.save_for_backward(X, *output[1:2], left, *output[2:])
        ctx.save_for_forward(X, *output[1:2], left, *output[2:])

    @staticmethod
    def backward(ctx, G: Tensor | None, *_unused: Tensor | None):  # type: ignore[override]
        if G is None:
            return None, None, None
        X, Minv, left, *kept = ctx.saved_tensors
        BMinv = kept[0] if kept else None
        if torch.is_grad_enabled():  # double backward: a differentiable M^{-1}
            Minv = _lu.inv(torch.add(_eye(X), skew_of(X, ctx.lower), alpha=-0.5))
            BMinv = None
        MinvH = Minv.mH
        G = G.to(Minv.dtype)
        grad_left = None
        if left is not None and ctx.needs_input_grad[2]:
            grad_left = _left_times_cayley(G, MinvH)  # G Q^H
        if not ctx.needs_input_grad[0]:
            return None, None, grad_left
        with Arena(Minv) as arena:  # the products are temporaries (none in grad mode)
            if BMinv is not None:  # M^{-H} (B^H G) M^{-H} = (B M^{-1})^H G M^{-H}
                left_factor = BMinv.mH
            else:
                if left is not None:
                    G = torch.matmul(left.mH, G, out=arena.empty())  # the gradient in Q
                left_factor = MinvH
            Abar = torch.matmul(torch.matmul(left_factor, G, out=arena.empty()), MinvH,
                                out=arena.empty())
            return skew_of_adjoint(Abar, ctx.lower, arena), None, grad_left

    @staticmethod
    def jvp(ctx, dX: Tensor | None, _lower: None, dleft: Tensor | None):  # type: ignore[override]
        X, Minv, left, *_ = ctx.saved_tensors
        if dX is not None and jvp_differentiated(X):  # a differentiable M^{-1}
            Minv = _lu.inv(torch.add(_eye(X), skew_of(X, ctx.lower), alpha=-0.5))
        dQ = None if dX is None else Minv @ skew_of(dX, ctx.lower) @ Minv
        if left is None:
            return dQ, None
        out = None if dQ is None else left @ dQ
        if dleft is not None:
            dBQ = _left_times_cayley(dleft, Minv)
            out = dBQ if out is None else out + dBQ
        return out, None, None


@upcast_half
def cayley_of_skew(X: Tensor, *, lower: bool = False, left: Tensor | None = None) -> Tensor:
    r"""Cayley transform of the skew-Hermitian part: :math:`Q = \mathrm{cay}(X - X^H)`.

    With :math:`A = X - X^H` (skew-Hermitian for every square :math:`X`, so :math:`Q` is
    orthogonal/unitary) and :math:`M = I - A/2`, :math:`Q = 2M^{-1} - I`
    (:func:`cayley`). The gradient is exact with respect to :math:`X`:
    :math:`\bar X = \bar A - \bar A^H` with :math:`\bar A = M^{-H} G M^{-H}`. This is one
    autograd node for what :func:`cayley` ``(X - X.mH)`` builds from several (the
    parametrizations call it at every forward, where small ``n`` is dominated by per-node
    overhead). Second derivatives and forward mode are supported.

    Args:
        X: ``(..., n, n)`` real or complex.
        lower: read ``X`` through its lower triangle, as torch's ``orthogonal`` does:
            :math:`Q = \mathrm{cay}(L - L^H)` with :math:`L = \operatorname{tril}(X)`, the
            gradient :math:`\operatorname{tril}(\bar A - \bar A^H)`. Equal to
            ``cayley_of_skew(X.tril())``, without the separate ``tril`` pass and its node.
        left: ``(..., m, n)`` with the batch shape and dtype of ``X``, or ``None``: return
            :math:`B Q` for :math:`B` = ``left`` (a dynamic trivialization's base), equal to
            ``left @ cayley_of_skew(X, lower=lower)`` with its gradients in ``X`` and
            ``left``, in one node: :math:`BQ = 2BM^{-1} - B` is one product, and the
            backward's :math:`\bar A = M^{-H} B^H G M^{-H} = (BM^{-1})^H G M^{-H}` reuses
            :math:`BM^{-1}` (saved: one matrix more), two products as without ``left``.

    Returns:
        ``(..., n, n)``, same dtype as ``X`` (``(..., m, n)`` with ``left``).

    Cost: the inverse of :math:`M` forward: above ``BLOCK_LEAF`` rows and for
    :math:`\|A\|_1 \le` ``BLOCK_MAX_NORM`` by block elimination without pivoting
    (:func:`~dtriv.retractions._block_inverse.block_inverse`: :math:`M` has Hermitian part
    :math:`I`, so no pivot block is singular and every one has an inverse of norm at most 1;
    about :math:`2n^3` flops in products, half the time of the LU route at
    :math:`n = 512` on CPU), else one LU factorisation and a solve with :math:`n` right-hand
    sides (about :math:`8n^3/3` flops; the error of elimination without pivoting grows with
    :math:`\|A\|_2^2`, that of LU with :math:`\|A\|_2`). Backward: two products and one
    transposed subtraction (with ``left``: one product more forward, and one more backward
    only for the gradient in ``left``).
    """
    check_matrix(X, "X", square=True)
    check_floating(X, "X")
    check_flag(lower, "lower")
    if left is not None:
        check_matrix(left, "left")
        if left.shape[:-2] != X.shape[:-2] or left.shape[-1] != X.shape[-1]:
            raise ValueError(
                f"left: expected shape (..., m, {X.shape[-1]}) with the batch shape "
                f"{tuple(X.shape[:-2])} of X, got {tuple(left.shape)}"
            )
        if left.dtype != X.dtype:
            raise ValueError(f"left: expected the dtype of X ({X.dtype}), got {left.dtype}")
    if X.numel() == 0:
        return X.clone() if left is None else left @ X
    if nested_forward_ad():
        L = X.tril() if lower else X
        Q = _cayley_reference(L - L.mH)
        return Q if left is None else left @ Q
    return apply_function(_CayleyOfSkew, X, lower, left)[0]


def _cayley_inverse(Q: Tensor) -> tuple[Tensor, Tensor]:
    """``2 (Q - I)(Q + I)^{-1}`` and the LAPACK ``info`` of the solve (nonzero: singular);
    under ``torch.func`` transforms a product with the inverse (see
    :func:`~dtriv.retractions._common.solve`)."""
    Id = _eye(Q)
    if transforms_active():
        inv, info = _lu.inv_ex(Q + Id)
        return 2 * (Q - Id) @ inv, info
    X, info = _lu.solve_ex(Q + Id, 2 * (Q - Id), left=False)
    return X, info


@upcast_half
def cayley_inverse(Q: Tensor, *, tol: float | None = None) -> Tensor:
    r"""Inverse Cayley transform :math:`A = 2(Q - I)(Q + I)^{-1}`.

    For orthogonal/unitary :math:`Q` without eigenvalue :math:`-1` the result is
    skew-Hermitian and ``cayley(cayley_inverse(Q)) == Q``; an eigenvalue
    :math:`e^{i\theta}` of :math:`Q` becomes :math:`2i\tan(\theta/2)`, unbounded as
    :math:`\theta \to \pm\pi`. Computed with one linear solve from the right.

    Raises:
        ValueError: when the smallest singular value of :math:`Q + I` (for normal
            :math:`Q` the distance of its spectrum from :math:`-1`) is below ``tol``
            (default :math:`\sqrt{\varepsilon}` of the dtype; ``tol=0`` keeps only the
            check that :math:`Q + I` is numerically invertible). Meta tensors, which have
            no values, are not checked, nor are calls under ``torch.func.vmap`` (also
            inside ``jacfwd`` and ``hessian``; a batched value cannot be read on the host):
            a singular :math:`Q + I` gives non-finite entries there. Under ``grad``,
            ``jacrev`` and ``jvp`` the check raises as in eager code.

    Args:
        Q: ``(..., n, n)`` real or complex.
        tol: minimum admitted distance of the spectrum from :math:`-1`.

    Returns:
        ``(..., n, n)``, same dtype as ``Q``.

    Cost: one LU solve (about :math:`8n^3/3` flops) plus the singular values of
    :math:`Q + I` for the check (about :math:`4n^3` more, skipped when ``tol=0``).
    """
    check_matrix(Q, "Q", square=True)
    check_floating(Q, "Q")
    tol = _default_tol(Q.dtype, tol)
    X, info = _cayley_inverse(Q)
    if Q.numel() and values_checkable(Q):
        with torch.no_grad():
            finite = torch.isfinite(X).all(dim=(-2, -1)) & (info == 0)
            bad = ~finite
            if tol > 0:
                bad = bad | (_distance_to_minus_one(Q.detach()) <= tol)
            if bool(bad.any()):
                _raise_near_minus_one(Q.detach(), "Q", bad, tol)
    return X


def _logm_frechet(U: Tensor, F: Tensor, E: Tensor, real: bool) -> Tensor:
    r"""Daleckii--Krein: :math:`L_{\log}(Q)[E] = U(F \circ (U^H E U))U^H` (real part for
    real :math:`Q`); with ``F.conj()`` its adjoint :math:`L_{\log}(Q)^*[E]`."""
    Uh = U.mH
    out = U @ (F * (Uh @ _complex(E) @ U)) @ Uh
    return out.real if real else out


def _expm_hvp(L: Tensor, B: Tensor, Y: Tensor) -> Tensor:
    r"""Hessian of :math:`X \mapsto \langle B, e^X\rangle` at :math:`L` applied to :math:`Y`
    (forward over reverse through ``torch.linalg.matrix_exp``, whose derivatives are right in
    every composition; reverse over reverse while a dual level is open)."""

    def grad_psi(X: Tensor) -> Tensor:
        return torch.func.vjp(torch.linalg.matrix_exp, X)[1](B)[0]

    if transforms_active() or not forward_ad_active():
        return torch.func.jvp(grad_psi, (L,), (Y,))[1]
    # a dual level is open (a dual tangent's backward), where no nested forward mode exists:
    # reverse over reverse, the Hessian being self-adjoint
    with torch.enable_grad():
        X = L.detach().requires_grad_()
        (g,) = torch.autograd.grad(torch.linalg.matrix_exp(X), X, B, create_graph=True)
        (hv,) = torch.autograd.grad(g, X, Y)
    return hv


@backward_without_autocast
class _LogmGrad(torch.autograd.Function):
    r"""The gradient of :func:`logm`, :math:`b = L_{\log}(Q)^*[G]`, as a node of ``(G, L)``
    (:math:`L = \log Q`, the output of :class:`_Logm`, through which the graph reaches
    :math:`Q`) so that it can be differentiated once more (second derivatives).

    With :math:`\varphi(Q) = \langle G, \log Q\rangle`, differentiating :math:`e^{\log Q} = Q`
    twice gives :math:`\log''(Q)[E_1, E_2] = -\log'(Q)[\exp''(L)[\log'E_1, \log'E_2]]`, so
    the Hessian-vector product is :math:`H_\varphi W = -L_{\log}^*[H_\psi(L_{\log}W)]` with
    :math:`\psi(X) = \langle b, e^X\rangle`. The backward returns
    :math:`\bar G = L_{\log}(Q)[W]` and :math:`\bar L = -H_\psi(L_{\log}(Q)[W])`, which
    :class:`_Logm`'s backward maps to :math:`\bar Q = L_{\log}^*[\bar L]`. Exact for the
    principal logarithm at unitary :math:`Q`, stable with repeated eigenvalues (divided
    differences and torch's block formula for the exponential)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(G: Tensor, L: Tensor, U: Tensor, F: Tensor, real: bool) -> Tensor:  # type: ignore[override]
        return _logm_frechet(U, F.conj(), G, real)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _G, L, U, F, real = inputs
        ctx.real = real
        ctx.save_for_backward(L, U, F, output)

    @staticmethod
    @once_differentiable
    def backward(ctx, W: Tensor):  # type: ignore[override]
        L, U, F, b = ctx.saved_tensors
        Y = _logm_frechet(U, F, W, ctx.real)
        grad_L = -_expm_hvp(L, b.to(L.dtype), Y.to(L.dtype))
        return Y, grad_L, None, None, None


@backward_without_autocast
class _Logm(torch.autograd.Function):
    """Principal logarithm of a (near-)unitary matrix through a Hermitian eigendecomposition.

    Returns ``(L, U, F)``: the logarithm, and the eigenvectors and divided differences of the
    backward (non-differentiable outputs, so that they can be saved in ``setup_context``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(Q: Tensor, tol: float, unitary_tol: float):  # type: ignore[override]
        n = Q.shape[-1]
        Id = _eye(Q)
        # (not under jit tracing or export either; under grad this forward runs unwrapped)
        checked = Q.numel() > 0 and values_checkable(Q) and not tracing()
        if checked:
            err = (Q.mH @ Q - Id).abs().amax(dim=(-2, -1))
            if bool((~torch.isfinite(err)).any()) or bool((err > unitary_tol).any()):
                raise ValueError(
                    f"Q: expected an orthogonal/unitary matrix (max |Q^H Q - I| <= "
                    f"{unitary_tol:.2e}), got max |Q^H Q - I| = {float(err.max()):.3e}"
                )
        if checked and not Q.is_complex():
            negative = _lu.det(Q) < 0
            if bool(negative.any()):
                _raise_near_minus_one(Q, "Q", negative, tol)
        C, info = _cayley_inverse(Q)
        finite = torch.isfinite(C).all(dim=(-2, -1)) & (info == 0)
        C = torch.where(finite[..., None, None], C, torch.zeros_like(C))
        H = -1j * _complex(C)
        H = (H + H.mH) / 2
        lam, U = torch.linalg.eigh(H)  # eigenvalues 2 tan(theta / 2)
        # |1 + e^{i theta}| = 2 |cos(theta / 2)| = 2 / sqrt(1 + tan^2(theta / 2)); the bound from
        # max |C| <= |C|_2 also sees a real eigenvalue near -1, whose huge part of C is not skew.
        dist = (2 / torch.sqrt(1 + (lam / 2) ** 2)).amin(dim=-1) if n else lam.sum(-1) + 2
        c_max = C.abs().amax(dim=(-2, -1)) if n else dist * 0
        dist = torch.minimum(dist, 2 / torch.sqrt(1 + (c_max / 2) ** 2))
        dist = torch.where(finite, dist, torch.zeros_like(dist))
        if checked and bool((dist <= tol).any()):
            _raise_near_minus_one(Q, "Q", dist <= tol, tol)
        theta = 2 * torch.atan(lam / 2)  # in (-pi, pi)
        # Daleckii-Krein divided differences of log at q = e^{i theta}:
        # (i theta_a - i theta_b) / (q_a - q_b) = e^{-i s} d / sin d, s = mean, d = half difference.
        s = (theta[..., :, None] + theta[..., None, :]) / 2
        d = (theta[..., :, None] - theta[..., None, :]) / 2
        F = torch.polar(1 / torch.sinc(d / math.pi), -s)
        q = torch.polar(torch.ones_like(theta), theta)
        Uh = U.mH
        # First-order (Newton) correction from the normal matrix U diag(q) U^H to Q itself:
        # log Q = U (diag(i theta) + F o (U^H Q U - diag(q))) U^H + O(|Q - U diag(q) U^H|^2).
        R = Uh @ _complex(Q) @ U - torch.diag_embed(q)
        # The correction is accurate while |R| << dist (the second derivative of log is
        # O(1 / dist)); a larger residual means Q is too far from unitary for how close its
        # spectrum is to -1 (e.g. a real eigenvalue near -1 of a slightly non-orthogonal Q).
        # Rounding alone leaves |R| ~ eps / dist (C's error, eps / dist^2, over the eigenvalue
        # gap, 1 / dist), more than 0.1 dist for an orthogonal Q within a few sqrt(eps) of -1;
        # admitted up to 16 eps / dist, where the result is accurate to the conditioning of
        # log (eps / dist).
        if checked:
            residual = R.abs().amax(dim=(-2, -1))
            bad = ~(residual <= 0.1 * dist + 16 * eps(Q.dtype) / dist)
            if bool(bad.any()):
                _raise_near_minus_one(
                    Q, "Q", bad, tol,
                    f"; and |Q - U diag(e^(i theta)) U^H| = {float(residual.max()):.3e} is not "
                    "small against it (Q too far from orthogonal/unitary for a logarithm "
                    "this close to the branch cut)",
                )
        L = U @ (torch.diag_embed(1j * theta.to(U.dtype)) + F * R) @ Uh
        if not Q.is_complex():
            L = L.real.contiguous()
        return L, U, F

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        Q = inputs[0]
        L, U, F = output
        ctx.real = not Q.is_complex()
        ctx.mark_non_differentiable(U, F)
        ctx.set_materialize_grads(False)  # no zero gradients for U, F
        ctx.save_for_backward(L, U, F)
        if forward_ad_active():  # (a microsecond per tensor otherwise)
            ctx.save_for_forward(Q, L, U, F)

    @staticmethod
    def jvp(ctx, dQ: Tensor, *unused):  # type: ignore[override]
        # L_log(Q)[E] = U (F o (U^H E U)) U^H; F is symmetric, so it also equals
        # (L_log(Q)^*[E^H])^H, which _LogmGrad computes as a node that can be differentiated
        # once (reverse over forward: a dual tangent's backward; under torch.func its
        # generated vmap rule fails in that composition, which raises instead)
        Q, L, U, F = ctx.saved_tensors
        dQ = dQ.to(Q.dtype)
        if transforms_active():
            if derivative_transform_around():
                raise NotImplementedError(
                    "logm: a forward-mode derivative differentiated again under torch.func "
                    "(jacrev(jacfwd(f)), jacfwd(jacfwd(f)), grad of a jvp) is not "
                    "implemented; use reverse over reverse (jacrev(jacrev(f))), or a dual "
                    "tensor's tangent and backward outside torch.func")
        elif jvp_differentiated(Q):
            return _LogmGrad.apply(dQ.mH, L, U, F, ctx.real).mH, None, None
        return _logm_frechet(U, F, dQ, ctx.real), None, None

    @staticmethod
    def backward(ctx, G: Tensor | None, _gu: Tensor | None = None,  # type: ignore[override]
                 _gf: Tensor | None = None):
        if G is None:
            return None, None, None
        L, U, F = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: a node that is differentiable once
            if jvp_transform_active():
                raise NotImplementedError(
                    "logm: forward over reverse (torch.func.hessian, jacfwd(jacrev(f))) is "
                    "not implemented; use reverse over reverse (jacrev(jacrev(f)))")
            return _LogmGrad.apply(G, L, U, F, ctx.real), None, None
        return _logm_frechet(U, F.conj(), G, ctx.real), None, None


@upcast_half
def logm(Q: Tensor, *, tol: float | None = None) -> Tensor:
    r"""Principal logarithm :math:`A = \log Q` of an orthogonal/unitary matrix.

    The unique skew-Hermitian :math:`A` with :math:`e^A = Q` and spectrum in
    :math:`i(-\pi, \pi)`; inverse of :func:`expm` on skew :math:`A` of spectral radius
    :math:`< \pi`. A real :math:`Q` needs :math:`\det Q = +1` (and no eigenvalue :math:`-1`);
    the result is then real.

    Algorithm: :math:`C = 2(Q - I)(Q + I)^{-1}` (:func:`cayley_inverse`) is skew-Hermitian
    with eigenvalues :math:`2i\tan(\theta/2)`; the Hermitian eigendecomposition
    :math:`-iC = U \operatorname{diag}(\lambda) U^H` gives
    :math:`\theta = 2\arctan(\lambda/2)` and, with :math:`D = \operatorname{diag}(e^{i\theta})`,
    :math:`\log Q = U(\operatorname{diag}(i\theta) + F \circ (U^H Q U - D))U^H`,
    where :math:`F_{ab} = e^{-i(\theta_a+\theta_b)/2}\,\delta/\sin\delta`,
    :math:`\delta = (\theta_a - \theta_b)/2`, are the divided differences of :math:`\log`
    (the Newton term makes the result exact to first order when :math:`Q` is only
    unitary to rounding). The gradient is the adjoint Daleckii--Krein formula
    :math:`\bar\nabla_Q = U(\bar F \circ (U^H G U))U^H` (real part for real :math:`Q`),
    stable with repeated eigenvalues. Second derivatives (``create_graph=True``,
    ``torch.func.jacrev`` of ``jacrev``) are those of the principal logarithm: from
    :math:`e^{\log Q} = Q`, :math:`\log''(Q)[E_1, E_2] = -\log'(Q)[\exp''(\log Q)[\log'(Q)E_1,
    \log'(Q)E_2]]`, with torch's differentiable ``matrix_exp`` for :math:`\exp''`
    (:class:`_LogmGrad`; third derivatives raise). They are exact at unitary :math:`Q`;
    off it the first derivative is exact only to first order in :math:`|Q^HQ - I|`, so
    ``gradgradcheck``'s finite differences of the backward agree only along directions
    tangent to the unitary group. Forward mode (``torch.func.jvp``, ``jacfwd``, dual tensors)
    is the Daleckii--Krein formula :math:`U(F \circ (U^H E U))U^H`; a dual tangent's
    ``backward`` (reverse over forward) is exact as above, while under ``torch.func`` a
    forward-mode derivative differentiated again (``jacrev(jacfwd)``, ``hessian``,
    ``jacfwd(jacfwd)``) raises ``NotImplementedError``.
    ``torch.func.vmap``, ``grad`` and ``jacrev`` are supported; under ``vmap``, as for meta
    tensors and under ``torch.jit.trace``/``torch.export``, the value checks below are
    skipped (nothing can be read on the host): a matrix with eigenvalue :math:`-1` then
    gives a wrong or non-finite result. Under ``grad`` and ``jacrev`` they raise as in
    eager code.

    Raises:
        ValueError: when some eigenvalue is within ``tol`` of :math:`-1` (default
            :math:`\sqrt{\varepsilon}`; the logarithm jumps across :math:`-1` and a real
            :math:`Q` with :math:`\det Q = -1` always has that eigenvalue; the message
            gives the measured distance), when a real :math:`Q` has
            :math:`\det Q < 0`, when :math:`\max|Q^HQ - I| > \varepsilon^{1/4}` (not
            orthogonal/unitary), or when the Newton residual
            :math:`\max|U^HQU - D|` exceeds a tenth of the distance :math:`d` to
            :math:`-1` plus the rounding level :math:`16\varepsilon/d` of the computed
            eigenvectors (the first-order correction would not be accurate: :math:`Q` is
            too far from unitary for how close its spectrum comes to :math:`-1`). Meta
            tensors, which have no values, are not checked, nor are calls under
            ``torch.func.vmap``.

    Args:
        Q: ``(..., n, n)`` real orthogonal or complex unitary.
        tol: minimum admitted distance :math:`\min_j |1 + e^{i\theta_j}|`.

    Returns:
        ``(..., n, n)`` skew-Hermitian (up to the departure of ``Q`` from unitarity), same
        dtype as ``Q``.

    Cost: :math:`O(n^3)`: the check :math:`Q^HQ` (:math:`2n^3`), a determinant for real
    :math:`Q` (:math:`2n^3/3`), a solve (:math:`8n^3/3`), a complex Hermitian
    eigendecomposition (about :math:`4 \cdot 9n^3` real flops with eigenvectors) and four
    complex matrix products (:math:`32n^3` real flops); the backward pass costs four
    complex products. Measured on CPU: 1 to 3 times :func:`expm`
    (n = 16 to 128, float64).
    """
    check_matrix(Q, "Q", square=True)
    check_floating(Q, "Q")
    tol_ = _default_tol(Q.dtype, tol)
    return apply_function(_Logm, Q, tol_, eps(Q.dtype) ** 0.25)[0]


register("lie", "expm", expm, logm)
register("lie", "cayley", cayley, cayley_inverse)
