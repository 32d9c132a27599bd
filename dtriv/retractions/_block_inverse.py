r"""The inverse of a matrix with positive definite Hermitian part, by block elimination.

A square :math:`M` whose Hermitian part :math:`\operatorname{He}(M) = (M + M^H)/2` is positive
definite, :math:`\operatorname{He}(M) \succeq \lambda I` with :math:`\lambda > 0`, is inverted
by 2 x 2 block elimination without pivoting:

.. math::

    M = \begin{pmatrix} M_{11} & M_{12} \\ M_{21} & M_{22} \end{pmatrix},\quad
    M^{-1} = \begin{pmatrix} X + T_1 Y T_2 & -T_1 Y \\ -Y T_2 & Y \end{pmatrix},

with :math:`X = M_{11}^{-1}`, :math:`T_1 = X M_{12}`, :math:`T_2 = M_{21} X`, the Schur
complement :math:`S = M_{22} - M_{21} T_1` and :math:`Y = S^{-1}`, both inverses taken the same
way down to blocks of at most :data:`LEAF` rows, which are inverted through an LU
factorization.

No pivot block is singular: :math:`\operatorname{He}(M_{11})` is a principal block of
:math:`\operatorname{He}(M)`, and for :math:`z = (-T_1 x, x)`, :math:`Mz = (0, Sx)`, so
:math:`\operatorname{Re}\, x^H S x = z^H \operatorname{He}(M) z \ge \lambda \|z\|^2 \ge
\lambda \|x\|^2`. Hence every block inverted on the way has a Hermitian part
:math:`\succeq \lambda I` and an inverse of 2-norm at most :math:`1/\lambda`; for
:math:`M = I - A/2` with a skew-Hermitian :math:`A` (the Cayley transform) :math:`\lambda = 1`.

Cost: six products of half size per level (:math:`1.5 n^3` flops at the top level, about
:math:`2 n^3` in all: measured :math:`1.9 n^3` at :math:`n = 512`), and the leaves' LU
factorizations. On CPU at :math:`n = 512` this measured half the time of one LU
factorization and solve with :math:`n` right-hand sides (the LAPACK routines run far below
the matrix product's rate there), and a third of it at :math:`n = 1024`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._lu import lu_factor_ex

__all__ = ["LEAF", "block_inverse"]

# Blocks of at most this many rows are inverted by LU; larger ones are split in halves
# (measured on CPU: 192-row leaves beat 96-row ones at n = 768, 128-row leaves beat 256-row
# ones at n = 512; below about 256 rows one LU is as fast).
LEAF = 192


def _lu_inverse(M: Tensor) -> Tensor:
    """``M^{-1}`` by LU: the factors of ``M^H`` (the column-major matrix LAPACK reads without a
    copy when ``M`` is row-major) and the adjoint solve with the identity."""
    n = M.shape[-1]
    LU, pivots, _ = lu_factor_ex(M.mH)
    eye = torch.eye(n, dtype=M.dtype, device=M.device)
    return torch.linalg.lu_solve(LU, pivots, eye.expand_as(M).contiguous(), adjoint=True)


def block_inverse(M: Tensor, leaf: int = LEAF) -> Tensor:
    r""":math:`M^{-1}` for ``M`` of shape ``(..., n, n)`` with a positive definite Hermitian
    part (see the module docstring); blocks of at most ``leaf`` rows by LU.

    The result is not checked: a ``M`` without a positive definite Hermitian part may meet a
    singular pivot block (non-finite entries), and non-finite input gives non-finite output.
    Made of differentiable torch operations (no ``out=``), so it also runs under
    ``torch.func`` transforms."""
    n = M.shape[-1]
    if n <= leaf:
        return _lu_inverse(M)
    h = n // 2
    M11, M12 = M[..., :h, :h], M[..., :h, h:]
    M21, M22 = M[..., h:, :h], M[..., h:, h:]
    X = block_inverse(M11, leaf)
    T1 = X @ M12
    Y = block_inverse(M22 - M21 @ T1, leaf)
    T2 = M21 @ X
    T1Y = T1 @ Y
    top = torch.cat([torch.addmm(X, T1Y, T2) if X.dim() == 2 else X + T1Y @ T2, -T1Y], dim=-1)
    bottom = torch.cat([-(Y @ T2), Y], dim=-1)
    return torch.cat([top, bottom], dim=-2)
