r"""Padded rows, which keep the transposed reads of a matrix fast on CPU.

An elementwise op that reads a row-major matrix through its transpose (``X - X^H``,
``G + G^H``) walks down the columns, one row stride per element. When that stride is a
multiple of 512 bytes (``n`` = 128, 256, 384, 512, ..., 1024 float32 columns) the lines of a
column fall into a few cache sets and evict one another before their neighbouring entries are
read. Measured on CPU (float32, 2 threads), ``torch.sub(X, X.mT)``:

======  ============  ====================================
n       contiguous X  copy into padded rows, then the op
======  ============  ====================================
256     49 us         31 us
384     105 us        71 us
500     78 us         116 us (no aliasing: left alone)
512     282 us        134 us
1024    3.0 ms        0.63 ms
======  ============  ====================================

:func:`transposable` returns such a matrix copied into rows :data:`PAD_BYTES` longer (the
same values, a view of a larger buffer); matrices that do not alias are returned as they are.
The copy is a pass of its own, which pays from :data:`COPY_MIN_SIZE` on (measured in place on
the forward and backward of the matrix exponential and the Cayley map: 4-5% at n = 1024, 1-2%
at n = 512, none at n = 256). :func:`padded_empty` and :func:`transposable_empty` give such
rows to write a result into, at no extra cost (``out=`` of a product runs at the same speed
with padded rows): the Riemannian optimizers write :math:`X^T G` so before its symmetric part
is taken (2x faster at ``512 x 512``, 4x at 1024).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import eager_context
from ._scratch import Arena

__all__ = ["ALIASING_BYTES", "COPY_MIN_SIZE", "MIN_SIZE", "PAD_BYTES", "aliases",
           "aliasing_rows", "padded_empty", "transposable", "transposable_empty"]

#: a row stride that is a multiple of this many bytes makes a transposed read alias
ALIASING_BYTES = 512
#: the padding added to each row (one cache line)
PAD_BYTES = 64
#: matrices with fewer rows or columns than this fit in the first-level cache: left alone
MIN_SIZE = 128
#: :func:`transposable` copies only matrices with at least this many rows and columns
COPY_MIN_SIZE = 512


def aliasing_rows(rows: int, row_bytes: int) -> bool:
    """Whether a column walk over ``rows`` rows ``row_bytes`` apart aliases in the cache."""
    return rows >= MIN_SIZE and row_bytes > 0 and row_bytes % ALIASING_BYTES == 0


_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(X: Tensor) -> bool:
    """A plain CPU tensor (or parameter) in eager code, with no graph recorded through it."""
    return (type(X) in _PLAIN and X.device.type == "cpu" and eager_context()
            and not (X.requires_grad and torch.is_grad_enabled()))


def aliases(X: Tensor, min_size: int = MIN_SIZE) -> bool:
    """Whether reading ``X`` (a CPU matrix or batch with unit column stride) by columns
    aliases, for ``X`` with at least ``min_size`` rows and columns.

    ``False`` for tensors under ``torch.func`` transforms, tracing or compiling, and for
    tensors whose graph is being recorded (the padded copy would be one more node).
    """
    if (X.dim() < 2 or X.shape[-1] < min_size or X.shape[-2] < min_size
            or not _eager(X) or X.stride(-1) != 1):
        return False
    return aliasing_rows(X.shape[-2], X.stride(-2) * X.element_size())


def padded_empty(shape: tuple[int, ...], like: Tensor, arena: Arena | None = None) -> Tensor:
    """An uninitialized tensor of ``shape`` (dtype and device of ``like``) whose rows are
    :data:`PAD_BYTES` longer than its last dimension: a view ``[..., :shape[-1]]`` of a
    contiguous buffer (from ``arena`` when it is active)."""
    pad = max(1, PAD_BYTES // like.element_size())
    full = (*shape[:-1], shape[-1] + pad)
    buf = arena.empty(full) if arena is not None else None
    if buf is None:
        buf = torch.empty(full, dtype=like.dtype, device=like.device)
    return buf[..., : shape[-1]]


def transposable_empty(shape: tuple[int, ...], like: Tensor,
                       arena: Arena | None = None) -> Tensor | None:
    """Where to write (``out=``) a result of ``shape`` that will be read by columns: padded
    rows (:func:`padded_empty`) when such rows would alias, else ``arena.empty(shape)``
    (``None`` without an active arena: the op then allocates)."""
    if (len(shape) >= 2 and shape[-1] >= MIN_SIZE and _eager(like)
            and aliasing_rows(shape[-2], shape[-1] * like.element_size())):
        return padded_empty(shape, like, arena)
    return arena.empty(shape) if arena is not None else None


def transposable(X: Tensor, arena: Arena | None = None) -> Tensor:
    """``X``, or when reading it by columns aliases (:func:`aliases`, from
    :data:`COPY_MIN_SIZE` rows and columns on) a copy of it with padded rows: the same values,
    whose ``.mH`` is read at the speed of a contiguous matrix."""
    if not aliases(X, COPY_MIN_SIZE):
        return X
    return padded_empty(tuple(X.shape), X, arena).copy_(X)
