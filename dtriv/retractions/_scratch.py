"""Scratch matrices that the reverse passes of the matrix functions reuse from call to call.

A reverse pass such as that of :class:`~dtriv.retractions._expm.ExpmTaylor` creates about ten
temporary ``n x n`` matrices per call and frees them all before it returns. On CPU, glibc
serves allocations of a megabyte or more with fresh ``mmap`` pages (its threshold adapts, so
this happens in some processes and not in others), and the first write to each page faults:
about a quarter of an ``n x n`` product per matrix at ``n = 512``, a sizeable share of the
whole pass. An :class:`Arena` hands out such temporaries and, when the pass ends, keeps them
for the next call of the same thread with the same shape, dtype and device.

Rules that keep this safe:

* a buffer from :meth:`Arena.empty` is written before it is read (``out=`` of an op);
* everything taken is given back when the ``with`` block ends, except what shares storage
  with the tensors passed to :meth:`Arena.keep` (the results that leave the pass);
* the pool is per thread (``threading.local``) and bounded: at most :data:`MAX_BYTES` per
  thread, the least recently used shapes dropped first. It is used for CPU tensors only (the
  CUDA caching allocator already reuses memory) and never under ``torch.func`` transforms.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from types import TracebackType

import torch
from torch import Tensor

from ._common import is_functorch_wrapped, transforms_active

__all__ = ["Arena", "MAX_BYTES", "MIN_BYTES", "clear"]

#: the most bytes of scratch buffers one thread keeps between calls
MAX_BYTES = 64 << 20
#: an arena whose ``like`` is smaller is inactive: glibc serves such blocks from its heap
#: (below its default mmap threshold, 128 KiB), where freed memory is reused without faults,
#: and the bookkeeping would cost more than it saves
MIN_BYTES = 128 << 10

_LOCAL = threading.local()


def _pools() -> OrderedDict:
    pools = getattr(_LOCAL, "pools", None)
    if pools is None:
        pools = _LOCAL.pools = OrderedDict()
    return pools


def clear() -> None:
    """Free the scratch buffers this thread keeps."""
    _pools().clear()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Arena:
    """Temporaries for one call, reused by the calls that follow.

    ``with Arena(A) as arena: Y = torch.mul(X, 2, out=arena.empty()); ...``: :meth:`empty`
    gives a tensor shaped like ``A`` (or of another ``shape``, same dtype and device).
    Arenas may nest (a QR inside an optimizer step): each takes buffers from the thread's pool
    one at a time and gives them back at its exit, so the inner one's come back too. (When each
    took a shape's whole list at once, the outer arena's exit replaced the list the inner one
    had given back: a 20 x (256, 256) RiemannianAdam step wrote 10 MB of fresh pages, 2,100
    page faults and about 3 ms of its 27.)
    Inactive (:meth:`empty` returns ``None``: the op allocates; nothing kept) for ``like``
    below :data:`MIN_BYTES`, off CPU, for tensor subclasses and under ``torch.func``
    transforms.
    """

    __slots__ = ("_like", "_taken", "_keep", "active")

    def __init__(self, like: Tensor) -> None:
        self._like = like
        self.active = (like.numel() * like.element_size() >= MIN_BYTES
                       and like.device.type == "cpu" and not transforms_active()
                       and type(like) is Tensor and not is_functorch_wrapped(like))
        self._taken: list[tuple[tuple, Tensor]] = []
        self._keep: set[int] = set()

    def __enter__(self) -> Arena:
        return self

    def empty(self, shape: tuple[int, ...] | None = None) -> Tensor | None:
        """An uninitialized contiguous tensor shaped like ``like`` (or ``shape``) to pass as
        ``out=``; ``None`` when inactive or in grad mode, so that the op allocates its result
        itself (``out=`` has no batching rule under ``vmap`` and records no graph)."""
        if not self.active or torch.is_grad_enabled():
            return None
        like = self._like
        key = (tuple(like.shape) if shape is None else tuple(shape), like.dtype, like.device)
        # one buffer from the thread's pool: an arena opened inside this one (a QR inside an
        # optimizer step) draws from the same pool, buffer by buffer
        free = _pools().get(key)
        buf = free.pop() if free else torch.empty(key[0], dtype=key[1], device=key[2])
        self._taken.append((key, buf))
        return buf

    def keep(self, *results: Tensor) -> None:
        """Mark ``results`` (and every buffer sharing their storage) as leaving the call."""
        for t in results:
            if t is None:
                continue
            if type(t) is not Tensor or is_functorch_wrapped(t):  # no storage to compare: keep all
                self._taken.clear()
                continue
            self._keep.add(t.untyped_storage().data_ptr())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.active:
            return
        taken, self._taken = self._taken, []
        # after an error the temporaries may still be referenced (by the traceback): not reused
        if exc_type is not None:
            return
        pools = _pools()
        for key, buf in taken:
            if buf.untyped_storage().data_ptr() in self._keep:
                continue
            bufs = pools.pop(key, None)
            if bufs is None:
                bufs = []
            bufs.append(buf)
            pools[key] = bufs  # most recently used last
        total = sum(_nbytes(b) for bufs in pools.values() for b in bufs)
        while total > MAX_BYTES and pools:
            key, bufs = next(iter(pools.items()))
            if bufs:
                total -= _nbytes(bufs.pop(0))
            if not bufs:
                del pools[key]
