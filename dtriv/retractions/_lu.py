r"""LU-based linear algebra on batches that stays right after ``torch.set_num_threads``.

In torch 2.13 on CPU (MKL), once ``torch.set_num_threads(k)`` has been called with
``k >= 2`` (the default count, never set, does not trigger it), the LU factorization of a
batch of two or more matrices from about 150 rows is wrong (measured with 2 threads: 149
rows right, 152 and more wrong): ``torch.linalg.lu_factor`` returns other factors and
pivots (some out of range) with ``info`` 0, ``torch.linalg.det`` wrong values (signs
included), and ``solve``, ``inv`` and ``lu`` raise "Pivots given to lu_solve must all be
greater or equal to 1". One matrix at a time is right, and so is
``lu_solve`` given right factors. The training scripts of ``experiments`` and many user
scripts set the thread count. The cause (pytorch/pytorch issue 142815, open; pull request
181570): torch's batched CPU factorization splits the batch over threads with a grain size
that rounds to 0 for large matrices, so several threads call MKL's ``getrf`` at once, whose
row swaps (``LASWP``) are not safe to run so ("Parameter 6 was incorrect on entry to
DLASWP" is printed).

The batched call can also hang (a batch of two at n = 150, twice, in a review).

The functions here are torch's, except that on CPU such batches (more than
:data:`BATCHED_LU_MAX_N` rows, more than one matrix) are factored one matrix at a time: a
Python loop, a few microseconds per matrix against its :math:`O(n^3)` factorization. That
holds under ``torch.func.grad``, ``jvp``, ``jacrev`` and ``jacfwd`` too, whose batches are
visible; a batch made by ``torch.vmap`` is hidden from them (vmap's batching rules call the
batched kernels), so it stays exposed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["BATCHED_LU_MAX_N", "lu_factor_ex", "det", "inv", "inv_ex", "solve", "solve_ex"]

#: the largest matrices that a batched CPU LU factorization takes as one batch (measured
#: after ``torch.set_num_threads(2)``: 149 rows right, 152 and more wrong; 128 keeps a margin
#: below that bound, which was measured on one machine and MKL build)
BATCHED_LU_MAX_N = 128


def _one_by_one(A: Tensor, batch: tuple[int, ...] | None = None) -> bool:
    """Whether ``A`` (``(..., n, n)``, broadcast to the batch shape ``batch`` when given) is a
    CPU batch that is factored one matrix at a time."""
    batch = tuple(A.shape[:-2]) if batch is None else batch
    return A.shape[-1] > BATCHED_LU_MAX_N and math.prod(batch) > 1 and A.device.type == "cpu"


def _looped(fn: Callable[..., Any], batch: tuple[int, ...], *args: Tensor) -> Any:
    """``fn`` on each matrix of ``args`` (each broadcast to ``(*batch, ., .)``), its results
    stacked back to ``batch`` (field by field when ``fn`` returns a tuple)."""
    size = math.prod(batch)
    flat = [a.expand(*batch, *a.shape[-2:]).reshape(size, *a.shape[-2:]) for a in args]
    parts = [fn(*matrices) for matrices in zip(*(f.unbind(0) for f in flat))]

    def stack(ts: Sequence[Tensor]) -> Tensor:
        out = torch.stack(list(ts))
        return out.reshape(*batch, *out.shape[1:])

    if isinstance(parts[0], Tensor):
        return stack(parts)
    return tuple(stack(field) for field in zip(*parts))


def _of_matrices(fn: Callable[[Tensor], Any], A: Tensor) -> Any:
    """``fn(A)``, or ``fn`` one matrix at a time where :func:`_one_by_one`."""
    return _looped(fn, tuple(A.shape[:-2]), A) if _one_by_one(A) else fn(A)


def lu_factor_ex(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.lu_factor_ex(A)``."""
    return _of_matrices(torch.linalg.lu_factor_ex, A)


def det(A: Tensor) -> Tensor:
    """``torch.linalg.det(A)``."""
    return _of_matrices(torch.linalg.det, A)


def inv(A: Tensor) -> Tensor:
    """``torch.linalg.inv(A)``."""
    return _of_matrices(torch.linalg.inv, A)


def inv_ex(A: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.inv_ex(A)``."""
    return _of_matrices(torch.linalg.inv_ex, A)


def _vector_rhs(A: Tensor, B: Tensor) -> bool:
    """Whether torch reads ``B`` as (a batch of) vectors: 1-D, or ``A``'s shape less a dim."""
    return B.dim() == 1 or (B.dim() == A.dim() - 1 and B.shape == A.shape[:-1])


def _by_matrix(A: Tensor, B: Tensor, left: bool) -> tuple[int, ...] | None:
    """The broadcast batch shape when ``solve(A, B)`` must loop, else ``None``: a single
    ``A`` against a batch of right-hand sides (``left``) is factored once by torch."""
    if A.shape[-1] <= BATCHED_LU_MAX_N or (A.dim() == 2 and left):
        return None
    batch = tuple(torch.broadcast_shapes(A.shape[:-2], B.shape[:-2]))
    return batch if _one_by_one(A, batch) else None


def _solve(fn: Callable[..., Any], A: Tensor, B: Tensor, left: bool) -> Any:
    """``fn(A, B, left=left)`` for ``fn`` torch's ``solve`` or ``solve_ex`` (whose solution
    is the first field), one matrix at a time where :func:`_by_matrix` says so."""
    if _vector_rhs(A, B):
        out = _solve(fn, A, B.unsqueeze(-1), left)
        return out.squeeze(-1) if isinstance(out, Tensor) else (out[0].squeeze(-1), *out[1:])
    batch = _by_matrix(A, B, left)
    if batch is None:
        return fn(A, B, left=left)
    return _looped(lambda a, b: fn(a, b, left=left), batch, A, B)


def solve(A: Tensor, B: Tensor, *, left: bool = True) -> Tensor:
    """``torch.linalg.solve(A, B, left=left)``."""
    return _solve(torch.linalg.solve, A, B, left)


def solve_ex(A: Tensor, B: Tensor, *, left: bool = True) -> tuple[Tensor, Tensor]:
    """``torch.linalg.solve_ex(A, B, left=left)``."""
    return _solve(torch.linalg.solve_ex, A, B, left)
