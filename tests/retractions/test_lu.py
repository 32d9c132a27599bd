"""The LU-based functions of _lu on CPU batches after torch.set_num_threads, against the same
functions one matrix at a time (right in torch 2.13, where the batched factorization of
matrices above 128 rows is not once the thread count was set), and the maps built on them."""

from __future__ import annotations

import pytest
import torch

from dtriv.manifolds import SpecialOrthogonal
from dtriv.retractions import _lu, cayley, cayley_inverse, expm, logm

N = _lu.BATCHED_LU_MAX_N + 32


@pytest.fixture(autouse=True)
def threads_set():
    """The state that breaks torch's batched LU: a thread count set explicitly (>= 2). The
    teardown's own set_num_threads keeps that state for the rest of the session, as the
    fixtures of tests/optim and tests/experiments do: a reference computed in a test must not
    rely on a batched LU above 128 rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def _batch(randn, *shape, n=N):
    return randn(*shape, n, n) + n ** 0.5 * torch.eye(n, dtype=torch.float64)


def test_lu_factor_ex_reconstructs_every_matrix(randn):
    A = _batch(randn, 2, 3)
    LU, pivots, info = _lu.lu_factor_ex(A)
    assert LU.shape == A.shape and pivots.shape == (2, 3, N) and info.shape == (2, 3)
    assert ((pivots >= 1) & (pivots <= N)).all() and (info == 0).all()
    P, L, U = torch.lu_unpack(LU, pivots)
    assert (P @ L @ U - A).abs().max() < 1e-10


def test_det_inv_and_solve_equal_one_matrix_at_a_time(randn):
    A = _batch(randn, 3)
    B = randn(3, N, 5)
    eye = torch.eye(N, dtype=torch.float64)
    want_det = torch.stack([torch.linalg.det(a) for a in A])
    assert torch.allclose(_lu.det(A), want_det, rtol=1e-10)
    assert (A @ _lu.inv(A) - eye).abs().max() < 1e-10
    inv, info = _lu.inv_ex(A)
    assert (A @ inv - eye).abs().max() < 1e-10 and (info == 0).all()
    assert (A @ _lu.solve(A, B) - B).abs().max() < 1e-10
    X, info = _lu.solve_ex(A, B.mT, left=False)
    assert (X @ A - B.mT).abs().max() < 1e-10 and (info == 0).all()
    # one matrix against a batch of right-hand sides (torch factors it once), vectors, none
    assert (A[0] @ _lu.solve(A[0], B) - B).abs().max() < 1e-10
    b = B[..., 0]
    assert _lu.solve(A, b).shape == b.shape
    assert ((A @ _lu.solve(A, b).unsqueeze(-1)).squeeze(-1) - b).abs().max() < 1e-10
    assert (A[0] @ _lu.solve(A[0], b[0]) - b[0]).abs().max() < 1e-10
    assert _lu.solve(A, B[..., :0]).shape == (3, N, 0)


def test_gradients_through_the_loop(randn):
    A = _batch(randn, 2).requires_grad_()
    G = randn(2, N, N)
    (g,) = torch.autograd.grad(_lu.inv(A), A, G)
    (g_ref,) = torch.autograd.grad(torch.stack([torch.linalg.inv(a) for a in A]), A, G)
    assert (g - g_ref).abs().max() < 1e-10


def test_the_loop_under_torch_func_transforms(randn):
    """grad, jvp and jacrev see the batch: the loop runs there too (a batched jvp of
    cayley_inverse raised, det's gradient was wrong)."""
    A = _batch(randn, 3)
    (g,) = (torch.func.grad(lambda a: _lu.det(a).sum())(A),)
    g_ref = torch.stack([torch.func.grad(torch.linalg.det)(a) for a in A])
    assert (g - g_ref).abs().max() < 1e-8 * g_ref.abs().max()
    X = randn(3, N, N)
    Q = torch.linalg.matrix_exp((X - X.mT) / N ** 0.5 / 2)
    E = randn(3, N, N)
    _, dA = torch.func.jvp(cayley_inverse, (Q,), (E,))
    _, dA_ref = torch.func.jvp(cayley_inverse, (Q[1],), (E[1],))
    assert (dA[1] - dA_ref).abs().max() < 1e-8


def test_the_maps_on_batches(randn):
    """The maps that factor: the nearest rotation keeps det = +1 for every point (the batched
    det gave -1 for some), and the inverses and the general exponential run and are right
    (the batched solve raised)."""
    X = randn(3, N, N)
    P = SpecialOrthogonal(N).project(X)
    assert torch.allclose(torch.stack([torch.linalg.det(p) for p in P]),
                          torch.ones(3, dtype=torch.float64))
    A = (X - X.mT) / N ** 0.5 / 2
    Q = torch.linalg.matrix_exp(A)
    assert (cayley(cayley_inverse(Q)) - Q).abs().max() < 1e-10
    assert (expm(logm(Q)) - Q).abs().max() < 1e-10
    Y = X / N ** 0.5
    assert (expm(Y) - torch.linalg.matrix_exp(Y)).abs().max() < 1e-10
