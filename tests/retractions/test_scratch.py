"""The scratch arena of the reverse passes: reuse across calls, and nothing that leaves a call
is ever handed out again."""

from __future__ import annotations

import threading

import pytest
import torch

from dtriv.retractions import _scratch
from dtriv.retractions._scratch import Arena
from dtriv.retractions.lie import cayley_of_skew, expm, expm_of_skew

pytestmark = pytest.mark.usefixtures("fresh_scratch")


@pytest.fixture
def any_size(monkeypatch):
    """Arenas for the small tensors of the mechanics tests."""
    monkeypatch.setattr(_scratch, "MIN_BYTES", 0)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@torch.no_grad()  # out= buffers are lent outside grad mode only
def test_buffers_are_reused_by_the_next_call_and_kept_ones_are_not(any_size):
    like = torch.zeros(4, 4)
    with Arena(like) as arena:
        a, b, c = arena.empty(), arena.empty(), arena.empty()
        assert a.shape == like.shape and a.dtype == like.dtype and a.is_contiguous()
        arena.keep(c.mT)  # a view of c leaves the call: c is not reused
    with Arena(like) as arena:
        got = {_ptr(arena.empty()), _ptr(arena.empty()), _ptr(arena.empty())}
    assert {_ptr(a), _ptr(b)} <= got and _ptr(c) not in got
    with Arena(torch.zeros(4, 5)) as arena:  # another shape: its own buffers
        assert _ptr(arena.empty()) not in {_ptr(a), _ptr(b)}


def test_inactive_for_small_tensors_subclasses_and_transforms(monkeypatch):
    small = torch.zeros(8, 8)
    monkeypatch.setattr(_scratch, "MIN_BYTES", 8 * 8 * 4 + 1)
    with Arena(small) as arena:
        assert not arena.active and arena.empty() is None
    monkeypatch.setattr(_scratch, "MIN_BYTES", 0)
    with Arena(small) as arena:
        assert arena.active
        assert arena.empty() is None  # grad mode: out= would record no graph
        with torch.no_grad():
            assert arena.empty() is not None
    with Arena(torch.nn.Parameter(torch.zeros(3, 3))) as arena:
        assert not arena.active and arena.empty() is None

    def f(x):
        with Arena(x) as arena:
            assert not arena.active and arena.empty() is None
        return x.sum()

    torch.func.grad(f)(torch.zeros(3, 3))
    torch.vmap(f)(torch.zeros(2, 3, 3))


@torch.no_grad()  # out= buffers are lent outside grad mode only
def test_nested_arenas_share_the_pool_and_lose_no_buffer(any_size):
    """An arena opened inside another (a QR inside an optimizer step, both with temporaries of
    one shape) draws from the same pool: two nested calls take two buffers, both come back, and
    the next two nested calls get those two and allocate nothing. (Each arena used to take the
    thread's whole list at its first use and put its own list back at exit, so the outer one,
    closing last, dropped the inner one's buffers: fresh pages at every optimizer step.)"""
    like = torch.zeros(4, 4)

    def nested_call():
        with Arena(like) as outer:
            a = outer.empty()
            with Arena(like) as inner:
                b = inner.empty()
                assert _ptr(b) != _ptr(a)  # a buffer in use is never handed out again
        return {_ptr(a), _ptr(b)}

    first = nested_call()
    assert sum(len(bufs) for bufs in _scratch._pools().values()) == 2
    for _ in range(3):
        assert nested_call() == first


@torch.no_grad()  # out= buffers are lent outside grad mode only
def test_an_error_inside_the_call_returns_nothing(any_size):
    like = torch.zeros(3, 3)
    with pytest.raises(RuntimeError), Arena(like) as arena:
        lost = arena.empty()
        raise RuntimeError("inside")
    with Arena(like) as arena:
        assert _ptr(arena.empty()) != _ptr(lost)


@torch.no_grad()  # out= buffers are lent outside grad mode only
def test_the_pool_is_bounded_and_per_thread(monkeypatch, any_size):
    monkeypatch.setattr(_scratch, "MAX_BYTES", 3 * 16 * 16 * 4)  # three 16 x 16 floats
    with Arena(torch.zeros(16, 16)) as arena:
        for _ in range(5):
            arena.empty()
    pools = _scratch._pools()
    assert sum(len(bufs) for bufs in pools.values()) == 3
    with Arena(torch.zeros(8, 8)) as arena:  # a newer shape evicts from the oldest first
        for _ in range(2):
            arena.empty()
    sizes = {key[0]: len(bufs) for key, bufs in _scratch._pools().items()}
    assert sizes == {(16, 16): 2, (8, 8): 2}
    seen = []
    worker = threading.Thread(target=lambda: seen.append(len(_scratch._pools())))
    worker.start()
    worker.join()
    assert seen == [0]


def _cayley_ref(X):
    A = X - X.mT
    Id = torch.eye(X.shape[-1], dtype=X.dtype)
    return torch.linalg.solve(Id - A / 2, Id + A / 2)


@pytest.mark.parametrize("fn, ref_fn", [
    (expm_of_skew, lambda X: torch.linalg.matrix_exp(X - X.mT)),
    (lambda X: expm_of_skew(X, lower=True),
     lambda X: torch.linalg.matrix_exp(X.tril() - X.tril().mT)),
    (lambda X: expm(X - X.mT), lambda X: torch.linalg.matrix_exp(X - X.mT)),
    (cayley_of_skew, _cayley_ref),
])
def test_gradients_of_repeated_calls_do_not_share_memory(fn, ref_fn):
    # backward after backward with the pool warm: each gradient equals torch's and the earlier
    # gradients are not overwritten by the later calls
    g = torch.Generator().manual_seed(5)
    n = 128  # above the sizes that go to torch (expm: 1, cayley: 95)
    X = (torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5).requires_grad_()
    Gs = [torch.randn(n, n, generator=g, dtype=torch.float64) for _ in range(3)]
    grads = [torch.autograd.grad(fn(X), X, G)[0] for G in Gs]
    assert _scratch._pools()  # the passes did use the pool
    copies = [t.clone() for t in grads]
    for _ in range(2):  # more calls reuse the pool
        torch.autograd.grad(fn(X), X, Gs[0])
    for G, grad, copy in zip(Gs, grads, copies):
        (ref,) = torch.autograd.grad(ref_fn(X), X, G)
        assert torch.equal(grad, copy)
        assert torch.allclose(grad, ref, rtol=0, atol=1e-10)
    assert len({_ptr(t) for t in grads}) == len(grads)


def test_expm_gradient_wrt_a_skew_leaf_is_not_recycled():
    # expm's reverse pass returns its gradient buffer itself (no op after it): it must leave
    # the pool
    g = torch.Generator().manual_seed(6)
    n = 128
    L = torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    A = (L - L.mT).requires_grad_()
    Gs = [torch.randn(n, n, generator=g, dtype=torch.float64) for _ in range(3)]
    grads = [torch.autograd.grad(expm(A), A, G)[0] for G in Gs]
    copies = [t.clone() for t in grads]
    torch.autograd.grad(expm(A), A, Gs[0])
    for G, grad, copy in zip(Gs, grads, copies):
        (ref,) = torch.autograd.grad(torch.linalg.matrix_exp(A), A, G)
        assert torch.equal(grad, copy)
        assert torch.allclose(grad, ref, rtol=0, atol=1e-10)
