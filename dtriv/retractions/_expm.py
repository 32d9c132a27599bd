r"""Matrix exponential by scaling and squaring with Padé approximants, and its adjoint derivative.

Forward (Higham 2005, "The scaling and squaring method for the matrix exponential revisited",
Algorithm 2.3): with :math:`B = 2^{-s} A`, the diagonal Padé approximant
:math:`r_m(B) = (V - U)^{-1}(V + U)`, where :math:`U = B\,\sum_k b_{2k+1} B^{2k}` and
:math:`V = \sum_k b_{2k} B^{2k}` are its odd and even parts, and then
:math:`e^A \approx R_s`, :math:`R_0 = r_m(B)`, :math:`R_{j+1} = R_j^2`.
The degree :math:`m \in \{3, 5, 7, 9, 13\}` and :math:`s` come from the 1-norm and the
thresholds :math:`\theta_m` of the table for the working precision:

* double (float64, complex128): :math:`\theta_{3,5,7,9,13}` of Higham's Table 2.3; the
  smallest :math:`m \le 9` with :math:`\|A\|_1 \le \theta_m` and :math:`s = 0`, else
  :math:`m = 13`, :math:`s = \max(0, \lceil \log_2(\|A\|_1 / \theta_{13}) \rceil)`;
* single (float32, complex64): Higham's single-precision thresholds
  :math:`\theta_{3,5,7}` (his recommended :math:`m_{\max} = 7` for IEEE single, as in
  Eigen's ``MatrixExponential``), so that the truncation error is at the level of the
  single-precision unit roundoff; degree 7 with squarings beyond :math:`\theta_7`. This is
  cheaper than running the double-precision table in single precision and as accurate as
  the format allows (about :math:`10^{-7}` relative on orthogonal results).

The degree and :math:`s` are chosen once per call from the largest 1-norm over the batch
(one host synchronisation, every matrix of the batch goes through the same batched
products). The public maps (:func:`dtriv.retractions.lie.expm`, ``expm_of_skew``) first
split a batch whose matrices ask for squaring counts two or more apart into groups that
ask for one (a matrix of norm 1 beside one of norm 1e3 took all of its squarings: an error
of :math:`2^s \epsilon`, 2.6e-5 in float32 against 6e-8 alone).

Backward: for :math:`Q = e^A` the gradient is the adjoint of the Fréchet derivative,
:math:`\bar A = L_{\exp}(A)^*[G] = L_{\exp}(A^H, G)`. Since the computed function
:math:`f(X) = r_m(2^{-s}X)^{2^s}` is a rational function with real coefficients,
:math:`f(A^H) = f(A)^H` with the same :math:`m, s`, and the recurrences of Al-Mohy & Higham
(2009, "Computing the Fréchet derivative of the matrix exponential, with an application
to condition number estimation", Algorithm 6.4) at :math:`A^H` reuse everything the
forward stored: the powers (:math:`(B^H)^{2k} = (B^{2k})^H`), the pieces of :math:`U, V`,
the LU factors of :math:`V - U` (:math:`V(B^H) - U(B^H) = (V - U)^H`) and the squarings
:math:`R_j`. In reverse-mode order:

.. math::

    G_s = G,\quad G_j = R_j^H G_{j+1} + G_{j+1} R_j^H\ (j = s-1, \dots, 0),\quad
    E = 2^{-s} G_0,\quad \bar A = L_{r_m}(B^H, E),

with :math:`L_{r_m}(X, E) = (V - U)^{-1}(L_U + L_V + (L_U - L_V) r_m(X))` and
:math:`L_U, L_V` from :math:`M_2 = XE + EX`, :math:`M_{2k}` the derivatives of the even
powers. The squaring operators :math:`G \mapsto R_j^H G + G R_j^H` commute (the
:math:`R_j` are powers of one matrix), so this equals the forward-order recurrence of
Al-Mohy & Higham at :math:`A^H` in exact arithmetic. No degree depends on :math:`G`, unlike
the :math:`2n \times 2n` exponential of :math:`[[A^H, G], [0, A^H]]` that
``torch.linalg.matrix_exp`` differentiates through.

Implementation: everything is evaluated in conjugate-transposed form,
:math:`\bar A^H = L_{\exp}(A, G^H)`, so the stored powers, pieces and squarings are used as
they are (no conjugated copies). The forward factors :math:`(V - U)^H` (the transpose of a
row-major matrix is what LAPACK's column-major routines read without a copy) and both the
forward solve with :math:`V - U` and the backward one are ``lu_solve(..., adjoint=True)``
with these factors (measured the fastest of the layouts on CPU).

Double backward (``create_graph=True``) is computed by torch's block formula from
differentiable operations (see :class:`ExpmPade`).

Cost (n x n products; one LU + solve is about 1.3 products in flops):
forward :math:`\pi_m + s` products and one LU with :math:`n` right-hand sides
(:math:`\pi_{3,5,7,9,13} = 2, 3, 4, 5, 6`); backward :math:`2\pi_m + 1` products (13 for
:math:`m = 13`), one pair of triangular solves and :math:`2s` products, about 2x the
forward. Memory: the forward keeps :math:`B`, its even powers, the pieces of :math:`U, V`,
the LU factors and :math:`R_0, \dots, R_{s-1}` (about :math:`9 + s` matrices).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import _lu
from ._common import (
    apply_function,
    backward_without_autocast,
    cached_outside_transforms,
    eager_context,
    forward_ad_active,
    is_functorch_wrapped,
    jvp_differentiated,
    reports_backward,
    transforms_active,
)
from ._layout import COPY_MIN_SIZE, aliases, padded_empty, transposable
from ._scratch import MIN_BYTES as SCRATCH_MIN_BYTES
from ._scratch import Arena

__all__ = ["expm_pade", "expm_frechet_adjoint", "expm_pade_autograd", "choose_degree",
           "ExpmPade"]

# Padé coefficients b_0, ..., b_m of r_m (Higham 2005, eqs. (2.1)-(2.2)).
_COEFFS: dict[int, tuple[float, ...]] = {
    3: (120.0, 60.0, 12.0, 1.0),
    5: (30240.0, 15120.0, 3360.0, 420.0, 30.0, 1.0),
    7: (17297280.0, 8648640.0, 1995840.0, 277200.0, 25200.0, 1512.0, 56.0, 1.0),
    9: (17643225600.0, 8821612800.0, 2075673600.0, 302702400.0, 30270240.0, 2162160.0,
        110880.0, 3960.0, 90.0, 1.0),
    13: (64764752532480000.0, 32382376266240000.0, 7771770303897600.0, 1187353796428800.0,
         129060195264000.0, 10559470521600.0, 670442572800.0, 33522128640.0, 1323241920.0,
         40840800.0, 960960.0, 16380.0, 182.0, 1.0),
}

# theta_m: the largest 1-norm for which r_m has backward error below the unit roundoff.
# Double: Higham 2005, Table 2.3. Single: Higham's single-precision values (m_max = 7).
THETA_DOUBLE: tuple[tuple[int, float], ...] = (
    (3, 1.495585217958292e-2),
    (5, 2.539398330063230e-1),
    (7, 9.504178996162932e-1),
    (9, 2.097847961257068e0),
    (13, 5.371920351148152e0),
)
THETA_SINGLE: tuple[tuple[int, float], ...] = (
    (3, 4.258730016922831e-1),
    (5, 1.880152677804762e0),
    (7, 3.925724783138660e0),
)


def _is_single(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.complex64)


def choose_degree(norm: float, dtype: torch.dtype) -> tuple[int, int]:
    r"""Padé degree ``m`` and number of squarings ``s`` for a 1-norm ``norm`` (finite, >= 0).

    The smallest tabulated degree with :math:`\|A\|_1 \le \theta_m` and ``s = 0``; beyond the
    last threshold the top degree with :math:`s = \lceil\log_2(\|A\|_1/\theta_{m})\rceil`.
    """
    table = THETA_SINGLE if _is_single(dtype) else THETA_DOUBLE
    for m, theta in table[:-1]:
        if norm <= theta:
            return m, 0
    m, theta = table[-1]
    s = max(0, math.ceil(math.log2(norm / theta))) if norm > theta else 0
    return m, s


def _lincomb(terms: list[tuple[float, Tensor]], diag: float = 0.0) -> Tensor:
    """``sum(c * X) + diag * I`` in a fresh tensor."""
    (c0, X0), rest = terms[0], terms[1:]
    out = X0 * c0
    for c, X in rest:
        out.add_(X, alpha=c)
    if diag:
        out.diagonal(dim1=-2, dim2=-1).add_(diag)
    return out


def _sandwich(X: Tensor, E: Tensor, Y: Tensor, F: Tensor) -> Tensor:
    """``X @ E + F @ Y`` (the derivative of a product of two commuting powers)."""
    out = X @ E
    out += F @ Y
    return out


def expm_pade(A: Tensor, m: int, s: int) -> tuple[Tensor, dict[str, object]]:
    r""":math:`r_m(2^{-s}A)^{2^s}` and what its derivative needs.

    Returns ``(Q, saved)`` where ``saved`` holds ``B`` (the scaled input), ``powers``
    (:math:`B^2, B^4, \dots`), the pieces of :math:`U, V` (``W`` with :math:`U = BW`, and for
    :math:`m = 13` ``W1``, ``Z1``), ``LU``/``pivots`` of :math:`V - U`, and ``R`` =
    :math:`[R_0, \dots, R_{s-1}]` (``[R_0]`` when ``s = 0``). Plain tensor operations, meant
    to run inside :class:`ExpmPade` (where no graph is recorded).
    """
    b = _COEFFS[m]
    B = A * (2.0 ** -s) if s else A
    B2 = B @ B
    saved: dict[str, object] = {"m": m, "s": s, "B": B}
    if m == 13:
        B4 = B2 @ B2
        B6 = B4 @ B2
        W1 = _lincomb([(b[13], B6), (b[11], B4), (b[9], B2)])
        W2 = _lincomb([(b[7], B6), (b[5], B4), (b[3], B2)], b[1])
        Z1 = _lincomb([(b[12], B6), (b[10], B4), (b[8], B2)])
        Z2 = _lincomb([(b[6], B6), (b[4], B4), (b[2], B2)], b[0])
        W = B6 @ W1
        W += W2
        V = B6 @ Z1
        V += Z2
        saved.update(powers=[B2, B4, B6], W1=W1, Z1=Z1)
    else:
        powers = [B2]
        for _ in range(2, (m - 1) // 2 + 1):
            powers.append(powers[-1] @ B2)
        W = _lincomb([(b[2 * k + 1], P) for k, P in enumerate(powers, 1)], b[1])
        V = _lincomb([(b[2 * k], P) for k, P in enumerate(powers, 1)], b[0])
        saved.update(powers=powers)
    U = B @ W
    saved["W"] = W
    # Factor (V - U)^H and solve with its adjoint: LAPACK's column-major layout makes both
    # the factorisation of the transpose of a row-major matrix and the adjoint solve faster.
    # (V - U is well conditioned for ||B||_1 <= theta_m, Higham 2005 sec. 2; a singular one
    # only arises from non-finite input, which the caller sends elsewhere.)
    LU, pivots, _ = _lu.lu_factor_ex((V - U).mH)
    V += U
    R = torch.linalg.lu_solve(LU, pivots, V, adjoint=True)
    squares = [R]
    for _ in range(s):
        squares.append(squares[-1] @ squares[-1])
    saved.update(LU=LU, pivots=pivots, R=squares[:-1] if s else squares)
    # The solve returns column-major storage; return a fresh row-major result (also when s = 0,
    # so that the caller may modify it in place without touching the saved R_0).
    Q = squares[-1] if s else R.clone(memory_format=torch.contiguous_format)
    return Q, saved


def expm_frechet_adjoint(saved: dict[str, object], G: Tensor) -> Tensor:
    r""":math:`L_{\exp}(A)^*[G] = L_{\exp}(A^H, G)` from the forward's ``saved`` quantities.

    Exact derivative (to rounding) of the computed :math:`r_m(2^{-s}A)^{2^s}`; see the module
    docstring for the recurrences. Evaluated in conjugate-transposed form,
    :math:`L_{\exp}(A^H, G) = L_{\exp}(A, G^H)^H`, so that the saved powers, the pieces of
    :math:`U, V` and the squarings are used as stored and the solve with :math:`V - U` is the
    adjoint solve with the stored factors of :math:`(V - U)^H`. Cost: about
    :math:`2\pi_m + 1 + 2s` products and one pair of triangular solves.
    """
    m, s = saved["m"], saved["s"]
    b = _COEFFS[m]
    R: list[Tensor] = saved["R"]  # type: ignore[assignment]
    # Squaring phase in reverse order: the adjoint of X -> X^2 at R_j maps G to
    # R_j^H G + G R_j^H; conjugate-transposed, H = G^H goes to R_j H + H R_j.
    E = G.mH
    if s:
        for Rj in reversed(R):
            E = _sandwich(Rj, E, Rj, E)
        E = E * (2.0 ** -s)
    B: Tensor = saved["B"]  # type: ignore[assignment]
    P: list[Tensor] = list(saved["powers"])  # type: ignore[arg-type]
    M2 = _sandwich(B, E, B, E)
    if m == 13:
        B2, B4, B6 = P
        M4 = _sandwich(B2, M2, B2, M2)
        M6 = _sandwich(B4, M2, B2, M4)
        Lw1 = _lincomb([(b[13], M6), (b[11], M4), (b[9], M2)])
        Lw = _lincomb([(b[7], M6), (b[5], M4), (b[3], M2)])
        Lz1 = _lincomb([(b[12], M6), (b[10], M4), (b[8], M2)])
        Lv = _lincomb([(b[6], M6), (b[4], M4), (b[2], M2)])
        Lw += B6 @ Lw1
        Lw += M6 @ saved["W1"]  # type: ignore[operator]
        Lv += B6 @ Lz1
        Lv += M6 @ saved["Z1"]  # type: ignore[operator]
    else:
        Ms = [M2]
        if m >= 5:
            Ms.append(_sandwich(P[0], M2, P[0], M2))  # M4
        if m >= 7:
            Ms.append(_sandwich(P[1], M2, P[0], Ms[1]))  # M6
        if m >= 9:
            Ms.append(_sandwich(P[1], Ms[1], P[1], Ms[1]))  # M8
        Lw = _lincomb([(b[2 * k + 1], M) for k, M in enumerate(Ms, 1)])
        Lv = _lincomb([(b[2 * k], M) for k, M in enumerate(Ms, 1)])
    Lu = B @ Lw
    Lu += E @ saved["W"]  # type: ignore[operator]
    # L_r(B, E) = (V - U)^{-1} (Lu + Lv + (Lu - Lv) r_m(B)), r_m(B) = R_0.
    rhs = (Lu - Lv) @ R[0]
    rhs += Lu
    rhs += Lv
    Y = torch.linalg.lu_solve(saved["LU"], saved["pivots"], rhs, adjoint=True)
    return Y.mH


def _frechet_adjoint_block(A: Tensor, G: Tensor) -> Tensor:
    """``L(A^H, G)`` as the upper-right block of ``expm([[A^H, G], [0, A^H]])`` (torch's own
    formula), built from differentiable operations: used for second derivatives."""
    n = A.shape[-1]
    Ah = A.mH
    top = torch.cat([Ah, G], dim=-1)
    bottom = torch.cat([torch.zeros_like(Ah), Ah], dim=-1)
    return torch.linalg.matrix_exp(torch.cat([top, bottom], dim=-2))[..., :n, n:]


@backward_without_autocast
@reports_backward
class ExpmPade(torch.autograd.Function):
    """Autograd function ``A -> r_m(2^{-s}A)^{2^s}`` with the Al-Mohy--Higham backward.

    ``ExpmPade.apply(A, m, s)`` returns ``(Q, *saved)``: the result, then the non-differentiable
    forward intermediates that the backward reuses (returned as outputs, the pattern that
    ``torch.func`` transforms require of a function with ``setup_context``); use
    :func:`expm_pade_autograd` for ``Q`` alone. First derivatives reuse the forward's factors.
    When the backward itself is differentiated (``create_graph=True``, or under
    ``torch.func.grad``, which records the backward for higher orders) it is computed instead
    by torch's differentiable block formula (a :math:`2n \\times 2n` exponential), so higher
    derivatives are exact but cost as much as ``torch.linalg.matrix_exp``'s. Forward mode
    (``jvp``, ``torch.func.jvp``/``jacfwd``) uses the same recurrences:
    :math:`L_{\\exp}(A, \\dot A) = L_{\\exp}(A^H, \\dot A^H)^H`, first order only.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(A: Tensor, m: int, s: int) -> tuple[Tensor, ...]:  # type: ignore[override]
        Q, saved = expm_pade(A, m, s)
        scaled = [saved["B"]] if s else []  # B is A itself when s = 0: not returned
        extra = [saved["W1"], saved["Z1"]] if m == 13 else []
        return (Q, *scaled, saved["W"], saved["LU"], saved["pivots"],  # type: ignore[misc]
                *saved["powers"], *saved["R"], *extra)  # type: ignore[misc]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        A, m, s = inputs
        ctx.m, ctx.s = m, s
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for the saved intermediates
        ctx.save_for_backward(A, *output[1:])
        ctx.save_for_forward(A, *output[1:])

    @staticmethod
    def _unpack(ctx) -> tuple[Tensor, dict[str, object]]:
        A, *rest = ctx.saved_tensors
        m, s = ctx.m, ctx.s
        if s:
            B, *rest = rest
        else:
            B = A
        W, LU, pivots, *rest = rest
        p = {3: 1, 5: 2, 7: 3, 9: 4, 13: 3}[m]
        r = max(s, 1)
        saved = {"m": m, "s": s, "B": B, "W": W, "LU": LU, "pivots": pivots,
                 "powers": rest[:p], "R": rest[p:p + r]}
        if m == 13:
            saved["W1"], saved["Z1"] = rest[p + r:]
        return A, saved

    @staticmethod
    def backward(ctx, G: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if G is None:
            return None, None, None
        A, saved = ExpmPade._unpack(ctx)
        if torch.is_grad_enabled():
            return _frechet_adjoint_block(A, G), None, None
        return expm_frechet_adjoint(saved, G.to(A.dtype)), None, None

    @staticmethod
    def jvp(ctx, dA: Tensor, *unused):  # type: ignore[override]
        # Forward mode: L(A, dA) = L(A^H, dA^H)^H, the same recurrences.
        A, saved = ExpmPade._unpack(ctx)
        if jvp_differentiated(A):  # reverse over forward: differentiable in A
            dQ = _frechet_adjoint_block(A.mH, dA.to(A.dtype))
        else:
            dQ = expm_frechet_adjoint(saved, dA.to(A.dtype).mH).mH
        n_saved = len(ctx.saved_tensors) - 1
        return (dQ, *([None] * n_saved))


def expm_pade_autograd(A: Tensor, m: int, s: int) -> Tensor:
    """:math:`r_m(2^{-s}A)^{2^s}` through :class:`ExpmPade` (differentiable in ``A``)."""
    return apply_function(ExpmPade, A, m, s)[0]


# ----------------------------------------------------------------------------------------------
# Skew-Hermitian inputs: optimized Taylor polynomials, matrix products only.
# ----------------------------------------------------------------------------------------------
#
# Bader, Blanes & Casas (2019), "Computing the matrix exponential with an optimized Taylor
# polynomial approximation", Mathematics 7(12), 1174: the Taylor polynomials T_m of degree
# m = 2, 4, 8, 12, 18 evaluated with 1, 2, 3, 4, 5 matrix products (Paterson--Stockmeyer needs
# 6 for m = 16). The coefficients of m = 12, 18 are the published ones; those of m = 8 are the
# closed forms of the paper with x_3 = 2/3 (x_7 solved from the degree-8 condition
# x_2^2 x_7 = 1/8!, which gives the factor x_3^2). test_expm_taylor.py expands every scheme
# as a polynomial and checks that it is T_m.
#
# theta_m: the largest ||B|| for which the backward error of T_m(B) is below the unit roundoff
# of the precision (the paper's Table, single and double).

_SQRT177 = math.sqrt(177.0)
_T8_X3 = 2.0 / 3.0
_T8 = {
    "x1": _T8_X3 * (1.0 + _SQRT177) / 88.0,
    "x2": _T8_X3 * (1.0 + _SQRT177) / 352.0,
    "x3": _T8_X3,
    "x4": (-271.0 + 29.0 * _SQRT177) / (315.0 * _T8_X3),
    "x5": (-11.0 + 11.0 * _SQRT177) / (1260.0 * _T8_X3),
    "x6": (-99.0 + 11.0 * _SQRT177) / (5040.0 * _T8_X3),
    "x7": (89.0 - _SQRT177) / (5040.0 * _T8_X3 * _T8_X3),
    "y2": (857.0 - 58.0 * _SQRT177) / 630.0,
}
# rows: B_0..B_3 as combinations of (I, A, A^2, A^3)
_T12 = (
    (9.0198e-16, 0.46932117595418237389, -0.20099424927047284052, -0.04623946134063071740),
    (5.31597895759871264183, 1.19926790417132231573, 0.01179296240992997031,
     0.01108844528519167989),
    (0.18188869982170434744, 0.05502798439925399070, 0.09351590770535414968,
     0.00610700528898058230),
    (-2.0861320e-13, -0.13181061013830184015, -0.02027855540589259079,
     -0.00675951846863086359),
)
# rows: B_0..B_4 as combinations of (I, A, A^2, A^3, A^6)
_T18 = (
    (0.0, -1.00365581030144618291e-01, -8.02924648241156932449e-03,
     -8.92138498045729985177e-04, 0.0),
    (0.0, 3.97849749499645077844e-01, 1.36783778460411720168e+00,
     4.98289622525382669416e-01, -6.37898194594723280150e-04),
    (-1.09676396052962061844e+01, 1.68015813878906206114e+00, 5.71779846478865511061e-02,
     -6.98210122488052056106e-03, 3.34975017086070470649e-05),
    (-9.04316832390810593223e-02, -6.76404519071381882256e-02, 6.75961301770459654925e-02,
     2.95552570429315521194e-02, -1.39180257516060693404e-05),
    (0.0, 0.0, -9.23364619367118555360e-02, -1.69364939002081722752e-02,
     -1.40086798182036094347e-05),
)
# (degree m, products pi_m, theta_m)
TAYLOR_SINGLE: tuple[tuple[int, int, float], ...] = (
    (2, 1, 5.978858893805233e-04),
    (4, 2, 5.116619363445086e-02),
    (8, 3, 5.800524627688768e-01),
    (12, 4, 1.461661507209034e+00),
    (18, 5, 3.010066362817634e+00),
)
TAYLOR_DOUBLE: tuple[tuple[int, int, float], ...] = (
    (2, 1, 2.580956802971767e-08),
    (4, 2, 3.397168839976962e-04),
    (8, 3, 4.991228871115323e-02),
    (12, 4, 2.996158913811580e-01),
    (18, 5, 1.090863719290036e+00),
)


def taylor_plan(bound: float, dtype: torch.dtype,
                degrees: tuple[int, ...] = (2, 4, 8, 12, 18)) -> tuple[int, int]:
    r"""Cheapest ``(m, s)`` among ``degrees`` with :math:`2^{-s}\,\mathrm{bound} \le \theta_m`.

    Cost :math:`\pi_m + s` products (forward; the backward is twice that); ties go to the
    smaller degree (the high-degree schemes have larger coefficients and measurably more
    rounding error in single precision: :math:`T_{18}` about twice that of :math:`T_{12}`
    with one squaring). ``bound`` is an upper bound of :math:`\|A\|_2` (finite, >= 0).
    """
    table = TAYLOR_SINGLE if _is_single(dtype) else TAYLOR_DOUBLE
    best: tuple[int, int, int] | None = None
    for m, pi, theta in table:
        if m not in degrees:
            continue
        s = max(0, math.ceil(math.log2(bound / theta))) if bound > theta else 0
        if best is None or (pi + s, m) < (best[0], best[1]):
            best = (pi + s, m, s)
    assert best is not None
    return best[1], best[2]


_PRODUCTS = {m: pi for m, pi, _ in TAYLOR_SINGLE}


def _cost(m: int, s: int) -> int:
    """Forward products of the plan ``(m, s)``."""
    return _PRODUCTS[m] + s


def _one_norm(X: Tensor, scratch: Tensor | None = None) -> float:
    """Largest 1-norm over the batch, on the host, for the powers of a skew ``A`` (Hermitian or
    skew-Hermitian, so the max column sum is the max row sum: a contiguous reduction).

    ``abs`` then ``sum``: two vectorized passes, about 3x faster on CPU than
    ``vector_norm(ord=1)`` (a scalar reduction) at n = 512. ``scratch``: a real tensor shaped
    like ``X`` that receives ``|X|`` (else a fresh one)."""
    X = X.detach()
    absX = X.abs() if scratch is None else torch.abs(X, out=scratch)
    return float(absX.sum(dim=-1).amax())


def _combine(coeffs: tuple[float, ...], powers: list[Tensor]) -> Tensor:
    r""":math:`c_0 I + \sum_{j \ge 1} c_j P_j` (``powers``: :math:`P_1, P_2, \dots`), fused."""
    out: Tensor | None = None
    for c, P in zip(coeffs[1:], powers):
        if c == 0.0:
            continue
        out = P * c if out is None else torch.add(out, P, alpha=c)
    assert out is not None
    if coeffs[0] != 0.0:
        out = out + coeffs[0] * torch.eye(out.shape[-1], dtype=out.dtype, device=out.device)
    return out


class NonFiniteError(ArithmeticError):
    """The Taylor plan met a non-finite norm (the callers fall back to torch)."""


class TaylorSplit(Exception):
    r"""The matrices of a batch ask for Taylor plans whose squaring counts are two or more
    apart (each from its own bound :math:`\|A_i^2\|_1^{1/2}`): the callers compute them one
    group at a time (``groups``: indices into the flattened batch, by squaring count)."""

    def __init__(self, groups: list[list[int]]) -> None:
        super().__init__("the batch is computed one group of Taylor plans at a time")
        self.groups = groups


def groups_by_squarings(values: list[float], count: Callable[[float], int]
                        ) -> list[list[int]] | None:
    """The indices of a batch grouped by the squaring count ``count`` gives for each of its
    ``values`` (norms or bounds), or ``None`` when the counts differ by at most one (one
    squaring more than needed changes a result at the rounding level, and keeps the batch one
    batched call). ``count`` grows with the value: the extremes tell whether any split is
    needed before every value is counted."""
    if len(values) < 2 or count(max(values)) - count(min(values)) < 2:
        return None
    groups: dict[int, list[int]] = {}
    for i, value in enumerate(values):
        groups.setdefault(count(value), []).append(i)
    return list(groups.values())


def _plan_groups(sq_norms: list[float], dtype: torch.dtype) -> list[list[int]] | None:
    r"""The indices of a batch grouped by the squaring count that each matrix's bound
    :math:`\|A_i^2\|_1^{1/2}` asks for at degree 18 (``sq_norms``: the :math:`\|A_i^2\|_1`),
    or ``None`` when the counts differ by at most one (at the top degree: the cheapest plans
    of nearby bounds trade degree for squarings, (8, 3) against (18, 1)).

    A plan chosen from the batch's largest bound gives a matrix of a much smaller one all its
    squarings, each doubling its rounding (measured, float32, n = 1024: a generator with
    :math:`\|A\|_2 = 1.4` beside block rotations of angle 37, whose 1-norms are within a
    factor 2, so that :func:`dtriv.retractions.lie.expm`'s split by 1-norms keeps them
    together: 2.5e-5 against 1.3e-6 alone)."""
    return groups_by_squarings(sq_norms, lambda q: taylor_plan(q**0.5, dtype, (18,))[1])


def power_stack(A: Tensor) -> Tensor | None:
    """A fresh ``(4, *A.shape)`` buffer for :func:`_taylor_powers` (slot 0 for ``A``), or
    ``None`` outside plain eager code: under ``torch.func`` transforms (``out=`` has no
    batching rule), ``torch.jit`` tracing, ``torch.compile`` and for tensor subclasses (the
    powers are then separate tensors, and the schemes take the tape: :func:`_taylor_tape`)."""
    if not _plain_eager(A) or forward_ad_active():
        return None  # (a dual tensor: the tape classes, whose jvp can be differentiated)
    return A.new_empty((4, *A.shape))


#: from this order on the powers of a skew ``A`` whose value is Hermitian or skew-Hermitian
#: take :func:`_half_product_into` on CPU (measured for the square, float32, against one
#: product: 1.11x the time at 256, 0.89x at 384, 0.84x at 512, 0.80x at 768, 0.82x at 1024;
#: not measured on an accelerator, which keeps one product)
HERMITIAN_SQUARE_MIN_N = 384


def _half_product_into(X: Tensor, Y: Tensor, out: Tensor, sign: float = 1.0) -> Tensor:
    r""":math:`XY` into ``out`` for square ``X, Y`` whose product is Hermitian (``sign = 1``)
    or skew-Hermitian (``sign = -1``), in three quarters of the flops of a product. For a
    skew ``A``: the squares :math:`A^2 = AA` and :math:`A^6 = A^3 A^3` (Hermitian), and
    :math:`A^3 = A^2 A` (skew-Hermitian).

    With :math:`h = \lfloor n/2 \rfloor`, the rows ``[:h]`` by one product (:math:`X_{:h,:}
    Y`), the block ``[h:, h:]`` by another (:math:`X_{h:,:} Y_{:,h:}`), and the block
    ``[h:, :h]`` as ``sign`` times the conjugate transpose of ``[:h, h:]``. The computed
    entries are the full product's dot products (summed in the blocking order of their own
    product) and the mirrored ones equal them to rounding (exactly for exact structure), so
    the result is the product to rounding."""
    h = X.shape[-1] // 2
    torch.mm(X[:h], Y, out=out[:h])
    torch.mm(X[h:], Y[:, h:], out=out[h:, h:])
    mirror = out[:h, h:].mH
    if sign == 1.0:
        out[h:, :h].copy_(mirror)
    else:
        torch.neg(mirror, out=out[h:, :h])
    return out


def _plain_eager(A: Tensor) -> bool:
    """Whether ``A`` is a plain tensor in eager code (no transform, tracing or compiling)."""
    return type(A) is Tensor and eager_context()


def _taylor_powers(A: Tensor, arena: Arena | None = None, stack: Tensor | None = None,
                   split: bool = False) -> tuple[int, int, list[Tensor]]:
    """The plan ``(m, s)`` and the powers ``[A^2, A^3, A^6]`` (as many as it needs) of a
    skew ``A``, computed without recording a graph (``arena``: where the temporary of the
    norms comes from).

    ``stack``: a contiguous ``(4, *A.shape)`` buffer (:func:`power_stack`) whose slots 1, 2, 3
    receive the powers and slot 0 ``A`` (copied unless ``A`` is that slot), so that the
    combinations of the schemes of degree 12 and 18 take one product with the stacked
    ``[A, A^2, A^3, A^6]`` (:func:`_scheme_forward`); ``None``: fresh powers.

    ``split``: for a batch, raise :class:`TaylorSplit` when its matrices' own bounds ask for
    squaring counts two or more apart (:func:`_plan_groups`)."""
    dtype = A.dtype
    scratch = arena.empty() if arena is not None and not A.is_complex() else None

    def mm(i: int, X: Tensor, Y: Tensor) -> Tensor:  # X @ Y, into slot i of the stack
        if stack is None:
            return X @ Y
        if X.dim() == 2 and X.shape[-1] >= HERMITIAN_SQUARE_MIN_N and X.device.type == "cpu":
            # measured on CPU only: A^2, A^6 = (A^3)^2 Hermitian, A^3 = A^2 A skew-Hermitian
            return _half_product_into(X, Y, stack[i], -1.0 if i == 2 else 1.0)
        return torch.matmul(X, Y, out=stack[i])

    if stack is not None and stack[0].data_ptr() != A.data_ptr():
        stack[0].copy_(A)
    A2 = mm(1, A, A)
    if split and A2[..., 0, 0].numel() > 1:
        absA2 = A2.abs() if scratch is None else torch.abs(A2, out=scratch)
        sq_norms = absA2.sum(dim=-1).amax(dim=-1).reshape(-1).tolist()
        if all(map(math.isfinite, sq_norms)):
            groups = _plan_groups(sq_norms, dtype)
            if groups is not None:
                raise TaylorSplit(groups)
        bound = max(sq_norms) ** 0.5
    else:
        bound = _one_norm(A2, scratch) ** 0.5
    if not math.isfinite(bound):  # A has a non-finite entry, or A^2 overflows
        raise NonFiniteError("A: the Taylor plan needs finite ||A^2||_1")
    m, s = taylor_plan(bound, dtype)
    high = taylor_plan(bound, dtype, (12, 18))
    if _cost(*high) <= _cost(m, s):
        # The schemes of degree 12 and 18 need A^3 anyway: refine the bound with it.
        A3 = mm(2, A2, A)
        bound = min(bound, _one_norm(A3, scratch) ** (1.0 / 3.0))
        m, s = taylor_plan(bound, dtype, (12, 18))
        top = taylor_plan(bound, dtype, (18,))
        if m == 18 or (top[0] == 18 and _cost(*top) == _cost(m, s)):
            # Degree 18 needs A^6, whose bound may save a squaring. At equal forward cost it
            # is taken also when none is left to save (top = (18, 0) against (12, 1)): its
            # reverse pass is a product cheaper along skew directions (the square A^6 costs
            # one, a squaring two: 7 products against 8), and no more expensive otherwise.
            # The price is rounding: at the far end of the tie (||A||_2 = 2.9, float32,
            # n = 512) 2.8e-6 against 1.4e-6 on Q and 1.4e-6 against 3.5e-7 (relative) on
            # the gradient; equal at ||A||_2 = 2 (random generators of variance 1/n).
            A6 = mm(3, A3, A3)
            if top[1] == 0:
                return 18, 0, [A2, A3, A6]
            bound = min(bound, _one_norm(A6, scratch) ** (1.0 / 6.0))
            m, s = taylor_plan(bound, dtype, (18,))
            return m, s, [A2, A3, A6]
        return m, s, [A2, A3]
    return m, s, [A2]


def _lin_rows(table: tuple[tuple[float, ...], ...], c: float, exps: tuple[int, ...]
              ) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]:
    """The coefficients of a ``lin`` step of the scheme ``table`` (a module constant) at the
    scaling ``c``: the rows ``b_j c^{e_j}`` of the sources (powers ``exps``) and the
    constants; computed once per scheme and scaling (a plain dict, which ``torch.compile``
    traces, unlike ``functools.lru_cache``)."""
    key = (id(table), c, exps)
    entry = _LIN_ROWS.get(key)
    if entry is None:
        rows = tuple(tuple(b * c ** e for b, e in zip(row[1:], exps)) for row in table)
        entry = _LIN_ROWS[key] = rows, tuple(row[0] for row in table)
    return entry


_LIN_ROWS: dict[tuple[int, float, tuple[int, ...]], tuple] = {}


@cached_outside_transforms(maxsize=64, sized=False)
def _coefficients(rows: tuple[tuple[float, ...], ...], diags: tuple[float, ...],
                  dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The coefficient matrix of the combinations of a written-out scheme
    (``len(rows) x len(sources)``) and its diagonal constants (``None`` when all zero), as
    read-only tensors."""
    C = torch.tensor(rows, dtype=dtype, device=device)
    D = torch.tensor(diags, dtype=dtype, device=device) if any(diags) else None
    return C, D


def _mm_into(out: Tensor | None, X: Tensor, Y: Tensor, inplace: bool = True,
             beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """``beta out + alpha X @ Y``, fused for 2- and 3-dimensional operands: written into
    ``out`` when ``inplace``, else into a fresh tensor (``X @ Y`` when ``out`` is ``None``,
    where ``beta`` and ``alpha`` must be 1)."""
    if out is None:
        return X @ Y
    if out.dim() == 2 and X.dim() == 2 and Y.dim() == 2:
        return (out.addmm_(X, Y, beta=beta, alpha=alpha) if inplace
                else torch.addmm(out, X, Y, beta=beta, alpha=alpha))
    if out.dim() == 3 and X.dim() == 3 and Y.dim() == 3:
        return (out.baddbmm_(X, Y, beta=beta, alpha=alpha) if inplace
                else torch.baddbmm(out, X, Y, beta=beta, alpha=alpha))
    if beta != 1.0:
        out = out.mul_(beta) if inplace else out * beta
        inplace = True
    return out.add_(X @ Y, alpha=alpha) if inplace else torch.add(out, X @ Y, alpha=alpha)


def _taylor_tape(A: Tensor, m: int, s: int, powers: list[Tensor]
                 ) -> tuple[dict[str, Tensor], list[tuple]]:
    r"""Evaluate :math:`T_m(2^{-s}A)^{2^s}` and record the operations for the backward.

    Returns the values by name (the result is ``"Q"``) and the tape: ``("mm", out, x, y,
    add)`` for ``out = add + x @ y`` and ``("comb", out, ((c, src), ...), d)`` for
    ``out = sum c * src + d I``. ``powers`` are
    :math:`A^2` (and :math:`A^3, A^6`), computed by :func:`_taylor_powers`; their products
    are on the tape too. Every added term and the first term of ``X`` are read once, so the
    products accumulate into them and ``X`` is formed in place (fewer fresh matrices: on CPU
    each costs first-touch page faults); the final product is written to a fresh matrix, so
    that the result shares no storage with the saved intermediates.

    This is the general path (``torch.func`` transforms, tracing, compiling, subclasses);
    plain tensors in eager code take the written-out schemes (:func:`_scheme_forward`),
    whose combinations of degree 12 and 18 are one product with the stacked powers.
    """
    v: dict[str, Tensor] = {"A": A, "A2": powers[0]}
    tape: list[tuple] = [("mm", "A2", "A", "A", None)]
    if len(powers) > 1:
        v["A3"] = powers[1]
        tape.append(("mm", "A3", "A2", "A", None))
    if len(powers) > 2:
        v["A6"] = powers[2]
        tape.append(("mm", "A6", "A3", "A3", None))

    def comb(out: str, terms: list[tuple[float, str]], d: float = 0.0,
             inplace: bool = False) -> None:
        # inplace: the first source (coefficient 1) is read by nothing else, reuse it
        terms = [(c, src) for c, src in terms if c != 0.0]
        (c0, s0), rest = terms[0], terms[1:]
        X = v[s0] if inplace and c0 == 1.0 else v[s0] * c0
        for c, src in rest:
            X.add_(v[src], alpha=c)
        if d:
            X.diagonal(dim1=-2, dim2=-1).add_(d)
        v[out] = X
        tape.append(("comb", out, tuple(terms), d))

    def mm(out: str, x: str, y: str, add: str | None = None, fresh: bool = False) -> None:
        # every scheme reads its added term only here: accumulate into it, except for the
        # result (``fresh``), which gets its own storage (the added term is a slot of a stack)
        v[out] = _mm_into(None if add is None else v[add], v[x], v[y], inplace=not fresh)
        tape.append(("mm", out, x, y, add))

    def lin(outs: list[str], srcs: list[str], table: tuple[tuple[float, ...], ...],
            exps: tuple[int, ...]) -> None:
        # row k of ``table``: the constant, then the coefficients of srcs (powers ``exps``);
        # one combination per result
        rows, diags = _lin_rows(table, c, exps)
        for nm, row, d in zip(outs, rows, diags):
            comb(nm, list(zip(row, srcs)), d)

    c = 2.0 ** -s
    if m == 2:
        comb("R", [(c, "A"), (c * c / 2.0, "A2")], 1.0)
    elif m == 4:
        comb("L", [(c * c, "A2")])
        comb("P", [(c / 6.0, "A"), (c * c / 24.0, "A2")], 0.5)
        comb("S", [(c, "A")], 1.0)
        mm("R", "L", "P", "S")
    elif m == 8:
        x = _T8
        comb("X4", [(x["x1"] * c ** 3, "A"), (x["x2"] * c ** 4, "A2")])
        mm("A4", "A2", "X4")
        comb("Lf", [(x["x3"] * c * c, "A2"), (1.0, "A4")])
        comb("Rt", [(x["x5"] * c, "A"), (x["x6"] * c * c, "A2"), (x["x7"], "A4")], x["x4"])
        comb("S", [(c, "A"), (x["y2"] * c * c, "A2")], 1.0)
        mm("R", "Lf", "Rt", "S")
    elif m == 12:
        lin(["B0", "B1", "B2", "B3"], ["A", "A2", "A3"], _T12, (1, 2, 3))
        mm("A6s", "B3", "B3", "B2")
        comb("X", [(1.0, "B1"), (1.0, "A6s")], inplace=True)
        mm("R", "X", "A6s", "B0", fresh=s == 0)
    else:
        lin(["B0", "B1", "B2", "B3", "B4"], ["A", "A2", "A3", "A6"], _T18, (1, 2, 3, 6))
        mm("A9", "B0", "B4", "B3")
        comb("X", [(1.0, "B2"), (1.0, "A9")], inplace=True)
        mm("R", "X", "A9", "B1", fresh=s == 0)
    last = "R"
    for j in range(s):
        mm(f"R{j + 1}", last, last)
        last = f"R{j + 1}"
    v["Q"] = v[last]
    _TAPES.setdefault((m, s, len(powers)), tape)
    return v, tape


# tape structures by (m, s, number of powers): the backward rebuilds its names from these
_TAPES: dict[tuple[int, int, int], list[tuple]] = {}
_POWERS = ("A2", "A3", "A6")


def _kept_powers(ctx, powers: tuple[Tensor, ...]) -> list[Tensor]:
    """The powers the reverse pass reads (factors of products: not :math:`A^6`), their names
    recorded on ``ctx``."""
    needed = _plan_saved_names((ctx.m, ctx.s, len(powers)))
    ctx.power_names = [nm for nm in _POWERS[:len(powers)] if nm in needed]
    return [P for nm, P in zip(_POWERS, powers) if nm in needed]


def _saved_names(tape: list[tuple]) -> list[str]:
    """The values the reverse pass reads: the factors of the products (``A`` aside)."""
    return sorted({name for op in tape if op[0] == "mm" for name in op[2:4]} - {"A"})


def _plan_saved_names(key: tuple[int, int, int]) -> tuple[str, ...]:
    """:func:`_saved_names` of the tape of the plan ``key = (m, s, number of powers)``, which
    :func:`_taylor_tape` has recorded; computed once per plan."""
    names = _PLAN_SAVED_NAMES.get(key)
    if names is None:
        names = _PLAN_SAVED_NAMES[key] = tuple(_saved_names(_TAPES[key]))
    return names


_PLAN_SAVED_NAMES: dict[tuple[int, int, int], tuple[str, ...]] = {}


def _sym2(g: Tensor, new, arena: Arena | None) -> Tensor:
    """:math:`g + g^H` (read from padded rows where the transposed read would alias)."""
    gp = transposable(g, arena)
    return torch.add(gp, gp.mH, out=new())


def _taylor_tape_adjoint(v: dict[str, Tensor], tape: list[tuple], out: str, G: Tensor,
                         skew_only: bool = False, arena: Arena | None = None) -> Tensor:
    r"""Reverse pass over the tape: the gradient of :math:`\mathrm{Re}\langle G, v_{out}\rangle`
    with respect to ``A``. Two products per recorded product, accumulated in place.

    ``skew_only``: only the skew-Hermitian part of the result is wanted (the gradient along
    skew directions :math:`\delta A`). Then the squares of the skew :math:`A` and :math:`A^3`
    cost one product each: along skew directions :math:`\delta(B^2) = \delta B\,B +
    B\,\delta B` is Hermitian, so only :math:`S = (\bar P + \bar P^H)/2` of the adjoint
    :math:`\bar P` of :math:`P = B^2` matters, and :math:`S B^H + B^H S = -(SB + (SB)^H)`
    has the skew-Hermitian part of :math:`-2SB`, which is accumulated instead; and
    :math:`A^2` and :math:`A^3 = A^2 A` together cost two (:func:`_cube_reverse_skew`).

    ``arena``: where the temporaries come from (:class:`~dtriv.retractions._scratch.Arena`,
    shaped like ``A``; the caller gives them back and keeps the result); default: fresh
    tensors.
    """
    grads: dict[str, list] = {out: [G, False]}  # name -> [tensor, owned (writable)]
    # out= a scratch buffer, or None (a fresh result)
    new = arena.empty if arena is not None else (lambda shape=None: None)

    def acc(name: str, t: Tensor, c: float = 1.0, owned: bool = True) -> None:
        cur = grads.get(name)
        if cur is None:
            if c != 1.0:
                t, owned = torch.mul(t, c, out=new()), True
            grads[name] = [t, owned]
        elif cur[1]:
            cur[0].add_(t, alpha=c)
        else:
            grads[name] = [torch.add(cur[0], t, alpha=c, out=new()), True]

    def acc_mm(name: str, X: Tensor, Y: Tensor) -> None:
        cur = grads.get(name)
        if cur is not None and cur[1]:
            _mm_into(cur[0], X, Y)
        else:
            acc(name, torch.matmul(X, Y, out=new()))

    cube: Tensor | None = None  # with skew_only: the adjoint of A^3, taken with that of A^2
    for op in reversed(tape):
        entry = grads.pop(op[1], None)
        if cube is not None and op == ("mm", "A2", "A", "A", None):
            gA2 = torch.zeros_like(cube) if entry is None else (
                entry[0] if entry[1] else entry[0].clone())
            cur = grads.get("A")
            gA = torch.zeros_like(cube) if cur is None else (
                cur[0] if cur[1] else cur[0].clone())
            grads["A"] = [_cube_reverse_skew(v["A"], gA, gA2, cube, new, arena), True]
            cube = None
            continue
        if entry is None:
            continue
        g = entry[0]
        if op[0] == "mm":
            _, _, x, y, add = op
            if skew_only and op[1:] == ("A3", "A2", "A", None):
                cube = g  # nothing else is recorded between A^2 and A^3
                continue
            if skew_only and x == y and x in ("A", "A3") and add is None:
                S = _sym2(g, new, arena)  # 2 sym(g)
                cur = grads.get(x)
                if cur is not None and cur[1] and cur[0].dim() == 2 and S.dim() == 2:
                    cur[0].addmm_(S, v[x], alpha=-1.0)
                elif cur is not None and cur[1] and cur[0].dim() == 3 and S.dim() == 3:
                    cur[0].baddbmm_(S, v[x], alpha=-1.0)
                else:
                    acc(x, torch.matmul(S, v[x], out=new()), -1.0)
                continue
            if add is not None:
                acc(add, g, owned=False)
            acc_mm(x, g, v[y].mH)
            acc_mm(y, v[x].mH, g)
        else:
            *head, (c_last, last) = op[2]
            for c, src in head:
                acc(src, g, c, owned=False)
            # g is ours and dead after this op (no unit-coefficient alias of it stored above)
            if entry[1] and last not in grads and all(c != 1.0 for c, _ in head):
                grads[last] = [g.mul_(c_last) if c_last != 1.0 else g, True]
            else:
                acc(last, g, c_last, owned=False)
    return grads["A"][0]


def _own(t: Tensor) -> Tensor:
    """``t``, or a copy when it is a view into a larger buffer (a slot of the stacked
    gradients of a written-out scheme): a result that leaves the pass holds only its own
    storage."""
    return t if t._base is None else t.clone()


def _tape_outputs(A: Tensor, m: int, s: int, powers: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``(Q, *saved)``: the result and the values the reverse pass reads that are not powers."""
    v, _ = _taylor_tape(A, m, s, list(powers))
    # the result is no factor of any product: never saved, the caller may modify it
    return (v["Q"], *[v[k] for k in _plan_saved_names((m, s, len(powers))) if k not in _POWERS])


def _save_tape(ctx, leading: tuple[Tensor, ...], m: int, s: int, powers: tuple[Tensor, ...],
               output: tuple[Tensor, ...]) -> None:
    """Record the plan on ``ctx`` and save ``leading`` (ending with ``A``), the powers the
    reverse pass reads and the saved outputs (non-differentiable, no zero gradients)."""
    ctx.m, ctx.s, ctx.n_powers = m, s, len(powers)
    ctx.n_extra = len(output) - 1
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    kept = _kept_powers(ctx, powers)
    ctx.save_for_backward(*leading, *kept, *output[1:])
    ctx.save_for_forward(*leading, *kept, *output[1:])


def _restore_tape(ctx, A: Tensor, saved: list[Tensor]) -> tuple[dict[str, Tensor], list[tuple]]:
    """The values by name (``A`` and what :func:`_save_tape` saved after it) and the tape."""
    tape = _TAPES[ctx.m, ctx.s, ctx.n_powers]
    names = list(ctx.power_names)
    names += [k for k in _plan_saved_names((ctx.m, ctx.s, ctx.n_powers)) if k not in _POWERS]
    v = dict(zip(names, saved))
    v["A"] = A
    return v, tape


def _recorded(lower: bool | None) -> Callable[[Tensor], Tensor]:
    """The Taylor nodes' computation recorded by autograd (:func:`expm_skew_taylor_autograd`),
    as a function of ``X``: ``expm(X)`` (``lower=None``) or ``expm(X - X^H)`` (``lower``: of
    ``L - L^H``, ``L = tril(X)``)."""

    def exp_of(X: Tensor) -> Tensor:
        return expm_skew_taylor_autograd(_recorded_argument(X, lower))

    return exp_of


def _recorded_argument(X: Tensor, lower: bool | None) -> Tensor:
    """The argument of the exponential in :func:`_recorded`, by differentiable operations:
    ``X`` (``lower=None``), ``X - X^H``, or ``L - L^H`` for ``L = tril(X)`` (``lower``); it is
    linear in ``X``, so it also maps a tangent ``dX`` to the argument's tangent."""
    if lower is None:
        return X
    L = X.tril() if lower else X
    return L - L.mH


def _recorded_jvp(X: Tensor, dX: Tensor, lower: bool | None = None) -> Tensor:
    r"""The forward-mode derivative of the Taylor nodes when it is differentiated: that of the
    same computation recorded by autograd (:func:`_recorded`), differentiable in ``X``.

    Under a ``torch.func`` transform (``jacrev(jacfwd(f))``) by ``torch.func.jvp``. For a
    plain dual tensor (``torch.autograd.forward_ad``) whose tangent is differentiated by
    ``backward``, which admits no nested forward mode, through the adjoint: with
    :math:`A = X` (``lower=None``) or the skew matrix of ``X``, :math:`E` that of ``dX``, and
    real coefficients, :math:`L(A)[E] = (L^*(A)[E^H])^H`, where :math:`L^*` is a reverse pass
    over the recorded computation kept with its graph (differentiable in ``X``)."""
    if transforms_active():
        return torch.func.jvp(_recorded(lower), (X,), (dX,))[1]
    with torch.enable_grad():
        A, E = _recorded_argument(X, lower), _recorded_argument(dX, lower)
        (adjoint,) = torch.autograd.grad(expm_skew_taylor_autograd(A), A, E.mH,
                                         create_graph=True)
    return adjoint.mH


def _recorded_grad(X: Tensor, G: Tensor, lower: bool | None = None) -> Tensor:
    """The double backward of the Taylor nodes: the gradient in ``X`` of the same computation
    recorded by autograd, with its graph (:func:`_recorded`)."""
    exp_of = _recorded(lower)

    # the saved X is a transform's tensor (also that of a finished transform: the backward
    # of ``torch.func.vjp``'s vjp_fn, called after vjp returned, sees it so) or requires no
    # grad: autograd.grad cannot differentiate through it, ``torch.func.vjp`` can
    if transforms_active() or not X.requires_grad or is_functorch_wrapped(X):
        return torch.func.vjp(exp_of, X)[1](G)[0]
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(exp_of(X), X, G, create_graph=True)
    return grad


@backward_without_autocast
@reports_backward
class ExpmTaylor(torch.autograd.Function):
    """``A -> T_m(2^{-s}A)^{2^s}`` (skew ``A``) with the hand-written reverse pass.

    ``ExpmTaylor.apply(A, m, s, *powers)`` returns ``(Q, *saved)``; ``powers`` are the
    (detached) :math:`A^2, A^3, A^6` of :func:`_taylor_powers`, treated as functions of ``A``
    by the backward (their products are on the tape).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(A: Tensor, m: int, s: int, *powers: Tensor):  # type: ignore[override]
        return _tape_outputs(A, m, s, powers)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        A, m, s, *powers = inputs
        _save_tape(ctx, (A,), m, s, tuple(powers), output)

    @staticmethod
    def _restore(ctx) -> tuple[Tensor, dict[str, Tensor], list[tuple]]:
        A, *saved = ctx.saved_tensors
        return (A, *_restore_tape(ctx, A, saved))

    @staticmethod
    def backward(ctx, G: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if G is None:
            return (None, None, None, *([None] * ctx.n_powers))
        A, v, tape = ExpmTaylor._restore(ctx)
        grad: Tensor
        if torch.is_grad_enabled():  # double backward: differentiate the recorded version
            grad = _recorded_grad(A, G)
        else:
            with Arena(A) as arena:
                grad = _own(_taylor_tape_adjoint(v, tape, _final(tape), G.to(A.dtype),
                                                 arena=arena))
                arena.keep(grad)  # it leaves the pass: its buffer is not handed out again
        return (grad, None, None, *([None] * ctx.n_powers))

    @staticmethod
    def jvp(ctx, dA: Tensor, *unused):  # type: ignore[override]
        A, v, tape = ExpmTaylor._restore(ctx)
        if jvp_differentiated(A):  # jacrev(jacfwd), or a dual tangent that is differentiated
            return (_recorded_jvp(A, dA.to(A.dtype)), *([None] * ctx.n_extra))
        dQ = _own(_taylor_tape_adjoint(v, tape, _final(tape), dA.to(A.dtype).mH)).mH
        return (dQ, *([None] * ctx.n_extra))


#: up to this many entries per matrix, :func:`skew_of` takes torch's ``tril`` (out of place)
SMALL_TRIL_NUMEL = 64 * 64


def skew_of(X: Tensor, lower: bool = False, arena: Arena | None = None,
            out: Tensor | None = None) -> Tensor:
    r""":math:`A = X - X^H`, or with ``lower`` :math:`A = L - L^H` for :math:`L =
    \operatorname{tril}(X)` (torch's ``orthogonal`` reads its parameter so), in one pass
    (``arena``: where the temporary comes from; ``out``: where ``A`` is written).

    When reading ``X`` by columns aliases in the cache (:func:`~._layout.aliases`: rows a
    multiple of 512 bytes long), ``X`` (its lower triangle with ``lower``) is first copied
    into padded rows, and ``A`` is one subtraction from that copy."""
    if lower and X.shape[-1] * X.shape[-2] <= SMALL_TRIL_NUMEL:
        # small: torch's out-of-place tril is not slow yet, and two ops (two nodes when
        # recorded) cost least: 16 x 16 7.2 against 10.0 us for a copy + tril_ route
        L = torch.tril(X)
        return L - L.mH if out is None else torch.sub(L, L.mH, out=out)
    if aliases(X, COPY_MIN_SIZE):
        P = padded_empty(tuple(X.shape), X, arena)
        if lower:  # the diagonal of L - L^H is X_ii - conj(X_ii) = 2i Im(X_ii), as below
            # a copy and the in-place tril_: torch.tril out of place is about 5x slower
            # (116 against 22 us at 512 x 512)
            P.copy_(X).tril_()
        else:
            P.copy_(X)
        return torch.sub(P, P.mH) if out is None else torch.sub(P, P.mH, out=out)
    if not lower:
        return X - X.mH if out is None else torch.sub(X, X.mH, out=out)
    P = arena.empty() if arena is not None else None  # None when recording
    if (P is None and X.numel() * X.element_size() < SCRATCH_MIN_BYTES
            and X.device.type == "cpu" and not (X.requires_grad and torch.is_grad_enabled())):
        P = torch.empty_like(X, memory_format=torch.contiguous_format)  # from glibc's heap
    if P is not None and eager_context():
        # the lower triangle copied into scratch (tril_ in place), then one subtraction,
        # faster than the masked select below: 700 x 700 232 against 367 us, 1000 x 1000
        # 442 against 714 (the arena's scratch), 128 x 128 24 against 29 us (fresh, below
        # the arena's size). The masked select stays for recorded graphs and transforms
        # (tril_ is an in-place node there and has no batching rule) and for large matrices
        # without an arena (fresh mmap pages measured slower).
        P.copy_(X).tril_()
        return torch.sub(P, P.mH) if out is None else torch.sub(P, P.mH, out=out)
    n = X.shape[-1]
    mask = _strict_lower(n, X.device)
    minus_XH = X.mH.neg() if arena is None else torch.neg(X.mH, out=arena.empty())
    A = torch.where(mask, X, minus_XH) if out is None else torch.where(mask, X, minus_XH,
                                                                         out=out)
    # the diagonal of L - L^H: X_ii - conj(X_ii) = 2i Im(X_ii), zero for real X
    diag = A.diagonal(dim1=-2, dim2=-1)
    if X.is_complex():
        diag.copy_(2j * X.diagonal(dim1=-2, dim2=-1).imag)
    else:
        diag.zero_()
    return A


@cached_outside_transforms(maxsize=16)
def _strict_lower(n: int, device: torch.device) -> Tensor:
    """The boolean mask of the entries below the diagonal of an ``n x n`` matrix (read-only)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril_(-1)


def skew_of_adjoint(Abar: Tensor, lower: bool = False, arena: Arena | None = None) -> Tensor:
    r"""The gradient with respect to ``X`` of :func:`skew_of` given :math:`\bar A`:
    :math:`\bar A - \bar A^H`, restricted to the lower triangle with ``lower`` (read from a
    padded copy of :math:`\bar A` when its transposed read aliases; ``arena``: where that
    copy comes from). The restriction clears the upper part in place (under ``torch.func``
    transforms out of place: ``tril_`` has no batching rule)."""
    P = transposable(Abar, arena)
    grad = P - P.mH
    if not lower:
        return grad
    return grad.tril() if transforms_active() else grad.tril_()


@backward_without_autocast
@reports_backward
class ExpmOfSkewTaylor(torch.autograd.Function):
    """``X -> T_m(2^{-s}A)^{2^s}`` with ``A = X - X^H`` (or ``tril(X) - tril(X)^H``) and the
    gradient with respect to ``X``.

    ``ExpmOfSkewTaylor.apply(X, A, lower, m, s, *powers)`` returns ``(Q, *saved)``; ``A`` is
    :func:`skew_of` ``(X, lower)`` (detached) and ``powers`` its :math:`A^2, A^3, A^6`. The
    backward needs only the skew-Hermitian part of the gradient with respect to ``A``
    (:math:`\bar X = \bar A - \bar A^H`, lower triangle with ``lower``), so the square
    :math:`A^6` costs one product there and :math:`A^2, A^3` two together (``skew_only`` of
    :func:`_taylor_tape_adjoint`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(X: Tensor, A: Tensor, lower: bool, m: int, s: int,  # type: ignore[override]
                *powers: Tensor):
        return _tape_outputs(A, m, s, powers)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        X, A, lower, m, s, *powers = inputs
        ctx.lower = lower
        _save_tape(ctx, (X, A), m, s, tuple(powers), output)

    @staticmethod
    def _restore(ctx) -> tuple[Tensor, Tensor, dict[str, Tensor], list[tuple]]:
        X, A, *saved = ctx.saved_tensors
        return (X, A, *_restore_tape(ctx, A, saved))

    @staticmethod
    def backward(ctx, G: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if G is None:
            return (None, None, None, None, None, *([None] * ctx.n_powers))
        X, A, v, tape = ExpmOfSkewTaylor._restore(ctx)
        if torch.is_grad_enabled():  # double backward: differentiate the recorded version
            grad = _recorded_grad(X, G, ctx.lower)
        else:
            with Arena(A) as arena:  # Abar and the other temporaries go back to it
                Abar = _taylor_tape_adjoint(v, tape, _final(tape), G.to(A.dtype),
                                            skew_only=True, arena=arena)
                grad = skew_of_adjoint(Abar, ctx.lower, arena)
        return (grad, None, None, None, None, *([None] * ctx.n_powers))

    @staticmethod
    def jvp(ctx, dX: Tensor, *unused):  # type: ignore[override]
        X, A, v, tape = ExpmOfSkewTaylor._restore(ctx)
        dA = skew_of(dX, ctx.lower).to(A.dtype)
        if jvp_differentiated(X):  # jacrev(jacfwd), or a dual tangent that is differentiated
            return (_recorded_jvp(X, dX.to(A.dtype), ctx.lower), *([None] * ctx.n_extra))
        dQ = _own(_taylor_tape_adjoint(v, tape, _final(tape), dA.mH)).mH
        return (dQ, *([None] * ctx.n_extra))


# ---------------------------------------------------- the schemes written out (eager code)
#: the degrees whose eager evaluation is written out (all of them; the tests empty it to
#: compare with the tape)
_WRITTEN_OUT = (2, 4, 8, 12, 18)


def _low_degree_forward(A: Tensor, A2: Tensor, m: int, c: float
                        ) -> tuple[Tensor, list[Tensor]]:
    """:math:`T_m(cA)` for ``m`` in 2, 4, 8 (:func:`_taylor_tape`'s combinations and
    products), and the factors its reverse pass reads."""
    if m == 2:  # I + cA + (cA)^2/2
        R = A * c
        R.add_(A2, alpha=c * c / 2.0).diagonal(dim1=-2, dim2=-1).add_(1.0)
        return R, []
    if m == 4:  # R = S + L P
        L = A2 * (c * c)
        P = A * (c / 6.0)
        P.add_(A2, alpha=c * c / 24.0).diagonal(dim1=-2, dim2=-1).add_(0.5)
        S = A * c
        S.diagonal(dim1=-2, dim2=-1).add_(1.0)
        return _mm_into(S, L, P), [L, P]
    x = _T8  # m == 8: A4 = A2 X4, R = S + Lf Rt
    X4 = A * (x["x1"] * c ** 3)
    X4.add_(A2, alpha=x["x2"] * c ** 4)
    A4 = A2 @ X4
    Lf = A2 * (x["x3"] * c * c)
    Lf.add_(A4)
    Rt = A * (x["x5"] * c)
    Rt.add_(A2, alpha=x["x6"] * c * c).add_(A4, alpha=x["x7"])
    Rt.diagonal(dim1=-2, dim2=-1).add_(x["x4"])
    S = A * c
    S.add_(A2, alpha=x["y2"] * c * c).diagonal(dim1=-2, dim2=-1).add_(1.0)
    return _mm_into(S, Lf, Rt), [X4, Lf, Rt]


def _low_degree_reverse(A2: Tensor, saved: tuple[Tensor, ...], m: int, c: float, g: Tensor,
                        new) -> tuple[Tensor, Tensor]:
    """The gradients with respect to ``A`` and ``A2`` of :func:`_low_degree_forward`."""
    if m == 2:
        return torch.mul(g, c, out=new()), torch.mul(g, c * c / 2.0, out=new())
    if m == 4:
        L, P = saved[:2]
        gL = torch.matmul(g, P.mH, out=new())
        gP = torch.matmul(L.mH, g, out=new())
        gA = torch.mul(g, c, out=new()).add_(gP, alpha=c / 6.0)
        return gA, gP.mul_(c * c / 24.0).add_(gL, alpha=c * c)
    x = _T8
    X4, Lf, Rt = saved[:3]
    gLf = torch.matmul(g, Rt.mH, out=new())
    gRt = torch.matmul(Lf.mH, g, out=new())
    gA = torch.mul(g, c, out=new()).add_(gRt, alpha=x["x5"] * c)
    gA2 = torch.mul(g, x["y2"] * c * c, out=new()).add_(gRt, alpha=x["x6"] * c * c)
    gA2.add_(gLf, alpha=x["x3"] * c * c)
    gA4 = gRt.mul_(x["x7"]).add_(gLf)
    _mm_into(gA2, gA4, X4.mH)
    gX4 = torch.matmul(A2.mH, gA4, out=gLf)
    gA.add_(gX4, alpha=x["x1"] * c ** 3)
    return gA, gA2.add_(gX4, alpha=x["x2"] * c ** 4)


def _scheme_forward(A: Tensor, m: int, s: int, stack: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    r""":math:`T_m(2^{-s}A)^{2^s}` from the stacked powers ``stack`` (:func:`power_stack`:
    :math:`A, A^2, A^3, A^6`), the same operations as :func:`_taylor_tape` without recording
    a tape. Returns ``(Q, saved)``: what :func:`_scheme_reverse` reads (the scheme's factors,
    for degrees 12 and 18 views of one fresh buffer, then the squarings' factors)."""
    c = 2.0 ** -s
    if m < 12:
        R, saved = _low_degree_forward(A, stack[1], m, c)
        for _ in range(s):
            saved.append(R)
            R = R @ R
        return R, tuple(saved)
    k = 4 if m == 18 else 3
    table, exps = (_T18, (1, 2, 3, 6)) if m == 18 else (_T12, (1, 2, 3))
    rows, diags = _lin_rows(table, c, exps)
    C, D = _coefficients(rows, diags, A.dtype, A.device)
    B = torch.mm(C, stack[:k].reshape(k, -1)).view(len(table), *A.shape)
    if D is not None:
        B.diagonal(dim1=-2, dim2=-1).add_(D.view(-1, *([1] * (A.dim() - 1))))
    if m == 18:  # A9 = B3 + B0 B4, X = B2 + A9, R = B1 + X A9
        B0, B1, B2, B3, B4 = B.unbind(0)
        A9 = _mm_into(B3, B0, B4)
        X = B2.add_(A9)
        R = _mm_into(B1, X, A9, inplace=s > 0)
        saved = [B0, B4, X, A9]
    else:  # A6s = B2 + B3 B3, X = B1 + A6s, R = B0 + X A6s
        B0, B1, B2, B3 = B.unbind(0)
        A6s = _mm_into(B2, B3, B3)
        X = B1.add_(A6s)
        R = _mm_into(B0, X, A6s, inplace=s > 0)
        saved = [B3, X, A6s]
    for _ in range(s):
        saved.append(R)
        R = R @ R
    return R, tuple(saved)


def _scheme_reverse(A: Tensor, stack: Tensor, saved: tuple[Tensor, ...], m: int, s: int,
                    G: Tensor, skew_only: bool, arena: Arena | None) -> Tensor:
    r"""The reverse pass of :func:`_scheme_forward`: the gradient of
    :math:`\mathrm{Re}\langle G, Q\rangle` with respect to ``A`` (with ``skew_only``, correct
    in its skew-Hermitian part only), the products of :func:`_taylor_tape_adjoint` in the
    same order: the squarings :math:`\bar R_{j-1} = \bar R_j R_{j-1}^H + R_{j-1}^H \bar R_j`,
    the scheme, its ``lin`` step (one product with the transposed coefficients), then the
    powers :math:`A^6 = (A^3)^2` (one product with ``skew_only``), :math:`A^3 = A^2 A` and
    :math:`A^2 = A A` (three products; two together with ``skew_only``,
    :func:`_cube_reverse_skew`). Temporaries from ``arena``."""

    def new(shape: tuple[int, ...] | None = None) -> Tensor:
        buf = arena.empty(shape) if arena is not None else None
        if buf is None:
            buf = torch.empty(A.shape if shape is None else shape, dtype=A.dtype,
                              device=A.device)
        return buf

    g = G
    for R in reversed(saved[len(saved) - s:]):
        Rh = R.mH
        g = _mm_into(torch.matmul(g, Rh, out=new()), Rh, g)
    if m < 12:
        gA, gA2 = _low_degree_reverse(stack[1], saved, m, 2.0 ** -s, g, new)
        return _square_reverse(A, gA, gA2, skew_only, new, arena)
    k = 4 if m == 18 else 3
    gB = new((k + 1, *A.shape))
    if m == 18:  # gradients of B0..B4 (B1 = R - X A9, B2 = X - A9, B3 = A9 - B0 B4)
        B0, B4, X, A9 = saved[:4]
        gB0, gB1, gB2, gB3, gB4 = gB.unbind(0)
        gB1.copy_(g)
        torch.matmul(g, A9.mH, out=gB2)
        torch.matmul(X.mH, g, out=gB3).add_(gB2)
        torch.matmul(gB3, B4.mH, out=gB0)
        torch.matmul(B0.mH, gB3, out=gB4)
        table, exps = _T18, (1, 2, 3, 6)
    else:  # gradients of B0..B3 (B0 = R - X A6s, B1 = X - A6s, B2 = A6s - B3 B3)
        B3, X, A6s = saved[:3]
        gB0, gB1, gB2, gB3 = gB.unbind(0)
        gB0.copy_(g)
        torch.matmul(g, A6s.mH, out=gB1)
        torch.matmul(X.mH, g, out=gB2).add_(gB1)
        B3h = B3.mH
        _mm_into(torch.matmul(gB2, B3h, out=gB3), B3h, gB2)
        table, exps = _T12, (1, 2, 3)
    C, _ = _coefficients(*_lin_rows(table, 2.0 ** -s, exps), A.dtype, A.device)
    gP = new((k, *A.shape))
    torch.mm(C.mT, gB.view(k + 1, -1), out=gP.view(k, -1))
    grads = gP.unbind(0)
    gA, gA2, gA3 = grads[:3]
    if m == 18:  # A6 = A3 A3
        A3, gA6 = stack[2], grads[3]
        if skew_only:
            _mm_into(gA3, _sym2(gA6, new, arena), A3, alpha=-1.0)
        else:
            _mm_into(_mm_into(gA3, gA6, A3.mH), A3.mH, gA6)
    if skew_only:
        return _cube_reverse_skew(A, gA, gA2, gA3, new, arena)
    _mm_into(gA2, gA3, A.mH)  # A3 = A2 A
    _mm_into(gA, stack[1].mH, gA3)
    return _square_reverse(A, gA, gA2, skew_only, new, arena)


def _cube_reverse_skew(A: Tensor, gA: Tensor, gA2: Tensor, gA3: Tensor, new,
                       arena: Arena | None) -> Tensor:
    r"""``gA`` plus the gradients through :math:`A^2 = AA` and :math:`A^3 = A^2 A` of ``gA2``
    and ``gA3``, correct in its skew-Hermitian part: two products, where the two steps one
    after the other take three. ``gA2`` is overwritten.

    Along skew directions :math:`\delta A`, :math:`\delta(A^3) = \delta A\,A^2 + A\,\delta A\,A
    + A^2\,\delta A` is skew and :math:`\delta(A^2)` Hermitian, so only :math:`K =
    \operatorname{skew}(\bar P_3)` and :math:`S = \operatorname{herm}(\bar P_2)` matter, and
    the adjoint is :math:`T = K A^2 + A^2 K + A K A - S A - A S` (skew). With :math:`U = KA`,
    so that :math:`AK = U^H`, and :math:`\operatorname{skew}(A W) = \operatorname{skew}(W^H
    A)` for any :math:`W` (:math:`A^H = -A`), every term becomes a product with ``A`` on the
    right: :math:`\operatorname{skew}(T) = \operatorname{skew}(M A)`, :math:`M = 2U + U^H -
    2S`.
    """
    gp = transposable(gA3, arena)
    U2 = torch.matmul(torch.sub(gp, gp.mH, out=new()), A, out=new())  # 2U = (2K) A
    # M = U2 + U2^H / 2 - (P + P^H) for P = gA2; with D = P - U2 / 2, M = U2 / 2 - (D + D^H)
    D = gA2.sub_(U2, alpha=0.5)
    minus_M = _sym2(D, new, arena).sub_(U2, alpha=0.5)
    return _mm_into(gA, minus_M, A, alpha=-1.0)


def _square_reverse(A: Tensor, gA: Tensor, gA2: Tensor, skew_only: bool, new,
                    arena: Arena | None) -> Tensor:
    """``gA`` plus the gradient through :math:`A^2 = A A` of ``gA2`` (one product with
    ``skew_only``, see :func:`_taylor_tape_adjoint`)."""
    if skew_only:
        return _mm_into(gA, _sym2(gA2, new, arena), A, alpha=-1.0)
    return _mm_into(_mm_into(gA, gA2, A.mH), A.mH, gA2)


@backward_without_autocast
@reports_backward
class ExpmOfSkewWrittenOut(torch.autograd.Function):
    """:class:`ExpmOfSkewTaylor` for plain tensors in eager code: the forward and its reverse
    pass written out per scheme (:func:`_scheme_forward`, :func:`_scheme_reverse`) instead of
    recording and interpreting a tape, whose bookkeeping cost 9% of a forward and backward at
    n = 16, 7% at 64 and 3% at 256. The same operations, so the same values and gradients.

    ``apply(X, A, lower, m, s, stack)`` returns ``(Q, *saved)``; ``stack`` holds
    :math:`A, A^2, A^3, A^6` (:func:`power_stack`)."""

    @staticmethod
    def forward(X: Tensor, A: Tensor, lower: bool, m: int, s: int,  # type: ignore[override]
                stack: Tensor):
        Q, saved = _scheme_forward(A, m, s, stack)
        return (Q, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        X, A, lower, m, s, stack = inputs
        ctx.lower, ctx.m, ctx.s = lower, m, s
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(X, A, stack, *output[1:])
        ctx.save_for_forward(A, stack, *output[1:])

    @staticmethod
    def backward(ctx, G: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if G is None:
            return None, None, None, None, None, None
        X, A, stack, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiate the recorded version
            grad = _recorded_grad(X, G, ctx.lower)
        else:
            with Arena(A) as arena:
                Abar = _scheme_reverse(A, stack, tuple(saved), ctx.m, ctx.s, G.to(A.dtype),
                                       True, arena)
                grad = skew_of_adjoint(Abar, ctx.lower, arena)
        return grad, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dX: Tensor, *unused):  # type: ignore[override]
        A, stack, *saved = ctx.saved_tensors
        dA = skew_of(dX, ctx.lower).to(A.dtype)
        # L(A)[E] = (L*(A)[E^H])^H: the coefficients are real
        dQ = _scheme_reverse(A, stack, tuple(saved), ctx.m, ctx.s, dA.mH, False, None).mH
        return (dQ, *([None] * len(saved)))


@backward_without_autocast
@reports_backward
class ExpmWrittenOut(torch.autograd.Function):
    """:class:`ExpmTaylor` for plain tensors in eager code, written out per scheme (see
    :class:`ExpmOfSkewWrittenOut`). ``apply(A, m, s, stack)`` returns
    ``(Q, *saved)``; ``stack`` holds a copy of ``A`` and :math:`A^2, A^3, A^6`."""

    @staticmethod
    def forward(A: Tensor, m: int, s: int, stack: Tensor):  # type: ignore[override]
        Q, saved = _scheme_forward(stack[0], m, s, stack)
        return (Q, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        A, m, s, stack = inputs
        ctx.m, ctx.s = m, s
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(A, stack, *output[1:])
        ctx.save_for_forward(stack, *output[1:])

    @staticmethod
    def backward(ctx, G: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if G is None:
            return None, None, None, None
        A, stack, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiate the recorded version
            grad = _recorded_grad(A, G)
        else:
            with Arena(stack[0]) as arena:
                grad = _own(_scheme_reverse(stack[0], stack, tuple(saved), ctx.m, ctx.s,
                                            G.to(A.dtype), False, arena))
                arena.keep(grad)  # it leaves the pass: its buffer is not handed out again
        return grad, None, None, None

    @staticmethod
    def jvp(ctx, dA: Tensor, *unused):  # type: ignore[override]
        stack, *saved = ctx.saved_tensors
        dQ = _scheme_reverse(stack[0], stack, tuple(saved), ctx.m, ctx.s,
                             dA.to(stack.dtype).mH, False, None).mH
        return (dQ, *([None] * len(saved)))


def expm_of_skew_taylor(X: Tensor, lower: bool = False) -> Tensor:
    r""":func:`expm_skew_taylor` of ``A = X - X^H`` (same plan and forward), differentiated
    with respect to ``X`` by :class:`ExpmOfSkewTaylor` (:class:`ExpmOfSkewWrittenOut` for
    plain tensors in eager code); with ``lower``, of ``A = L - L^H``
    for ``L = X.tril()`` (no separate ``tril`` node: the forward forms ``A`` in one pass and
    the backward returns the lower triangle). Backward cost: two products per forward product
    except one for the square :math:`A^6` and two for the powers :math:`A^2, A^3` together
    (:func:`_cube_reverse_skew`; one for :math:`A^2` where the plan has no :math:`A^3`); in
    the plan of degree 18 without squarings, 7 products against the forward's 5 (4.25 from
    :data:`HERMITIAN_SQUARE_MIN_N` on, where the powers :math:`A^2, A^3, A^6`, Hermitian or
    skew-Hermitian, take three quarters of a product each: :func:`_half_product_into`).

    Raises :class:`NonFiniteError` when :math:`\|A^2\|_1` is not finite."""
    Xd = X.detach()
    with Arena(Xd) as arena:  # the plan's temporaries: until the forward ends
        with torch.no_grad():
            stack = power_stack(Xd)  # A and its powers, stacked for the combinations
            A = skew_of(Xd, lower, arena, out=None if stack is None else stack[0])
            m, s, powers = _taylor_powers(A, arena, stack, split=True)
        if stack is not None and m in _WRITTEN_OUT:
            return apply_function(ExpmOfSkewWrittenOut, X, A, lower, m, s, stack)[0]
        return apply_function(ExpmOfSkewTaylor, X, A, lower, m, s, *powers)[0]


def _final(tape: list[tuple]) -> str:
    return tape[-1][1]


def expm_skew_taylor(A: Tensor) -> Tensor:
    r""":math:`e^A` for a skew-Hermitian ``A``: :math:`T_m(2^{-s}A)^{2^s}`, products only.

    :math:`T_m` is the Taylor polynomial of degree :math:`m \in \{2, 4, 8, 12, 18\}` in the
    evaluation schemes of Bader, Blanes & Casas (2019), which need
    :math:`\pi_m = 1, 2, 3, 4, 5` products. The degree and scaling are chosen from an upper
    bound of :math:`\|A\|_2`: for a normal ``A``, :math:`\|A\|_2 = \rho(A)` and
    :math:`\rho(A)^k = \rho(A^k) \le \|A^k\|_1` for every :math:`k`, so
    :math:`\|A\|_2 \le \min_k \|A^k\|_1^{1/k}` over the powers the scheme computes anyway
    (:math:`A^2`, then :math:`A^3, A^6` for the higher degrees). For skew matrices this is
    far tighter than :math:`\|A\|_1` (for random generators with entries of variance
    :math:`1/n`, :math:`\|A\|_1 \approx 0.8\sqrt{n}` while :math:`\|A\|_2 \approx 2`), which
    saves squarings. With :math:`\|2^{-s}A\|_2 \le \theta_m` the backward error is below the
    unit roundoff in the 2-norm (the thresholds of the paper hold in any consistent norm
    with :math:`\|B^k\| \le \|B\|^k`, which the 2-norm of a normal matrix satisfies with
    equality). The scaling :math:`2^{-s}` is folded into the coefficients.

    Backward: the exact derivative of the computed polynomial, two products per forward
    product (no solve), evaluated by :class:`ExpmTaylor` from the saved intermediates with
    fused accumulations (fewer passes over memory and autograd nodes than recording every
    product and sum); in eager code by
    :class:`ExpmWrittenOut`, the same operations without a tape. Second derivatives
    differentiate :func:`expm_skew_taylor_autograd` (the same computation recorded by
    autograd); forward mode uses
    :math:`L_f(A)[E] = (L_f(A)^*[E^H])^H` (real coefficients).

    Cost: forward :math:`\pi_m + s` products (plus at most one product more when the refined
    bound makes the scheme switch), backward :math:`2(\pi_m + s)`; elementwise work
    :math:`O(n^2)` per term. Memory: the intermediate powers and combinations (about
    :math:`2\pi_m + s` matrices).
    """
    with Arena(A.detach()) as arena:  # the plan's temporaries: until the forward ends
        with torch.no_grad():
            stack = power_stack(A.detach())
            m, s, powers = _taylor_powers(A.detach(), arena, stack, split=True)
        if stack is not None and m in _WRITTEN_OUT:
            return apply_function(ExpmWrittenOut, A, m, s, stack)[0]
        return apply_function(ExpmTaylor, A, m, s, *powers)[0]


def expm_skew_taylor_autograd(A: Tensor) -> Tensor:
    """:func:`expm_skew_taylor` recorded op by op by autograd (any order of derivatives)."""
    m, s, pw = _taylor_powers(A.detach())
    A2 = A @ A
    if m >= 12:
        A3 = A2 @ A
    if m == 18:
        A6 = A3 @ A3
    c = 2.0 ** -s
    if m == 2:
        R = _combine((1.0, c, c * c / 2.0), [A, A2])
    elif m == 4:
        R = _combine((1.0, c), [A]) + (A2 * (c * c)) @ _combine(
            (0.5, c / 6.0, c * c / 24.0), [A, A2])
    elif m == 8:
        x = _T8
        A4 = A2 @ _combine((0.0, x["x1"] * c ** 3, x["x2"] * c ** 4), [A, A2])
        left = _combine((0.0, x["x3"] * c * c, 1.0), [A2, A4])
        right = _combine((x["x4"], x["x5"] * c, x["x6"] * c * c, x["x7"]), [A, A2, A4])
        R = _combine((1.0, c, x["y2"] * c * c), [A, A2]) + left @ right
    elif m == 12:
        P = [A, A2, A3]
        B = [_combine(tuple(b * c ** j for j, b in enumerate(row)), P) for row in _T12]
        A6 = B[2] + B[3] @ B[3]
        R = B[0] + (B[1] + A6) @ A6
    else:
        P, exps = [A, A2, A3, A6], (0, 1, 2, 3, 6)
        B = [_combine(tuple(b * c ** e for b, e in zip(row, exps)), P) for row in _T18]
        A9 = B[0] @ B[4] + B[3]
        R = B[1] + (B[2] + A9) @ A9
    for _ in range(s):
        R = R @ R
    return R
