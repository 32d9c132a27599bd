"""Lie-algebra maps: expm, logm, cayley, cayley_inverse against scipy and their identities."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.autograd import gradcheck
from torch.nn.utils import parametrizations

from dtriv.retractions import cayley, cayley_inverse, expm, logm

REAL_COMPLEX = [torch.float64, torch.complex128]


def unitary_error(Q):
    Id = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mH @ Q - Id).abs().max().item()


def with_eigenangle(theta, n=4, dtype=torch.float64, generator=None):
    """A real orthogonal n x n (n even) with eigenvalues e^{+-i theta} and e^{+-i 0.3}, rotated."""
    blocks = [theta] + [0.3] * (n // 2 - 1)
    A = torch.zeros(n, n, dtype=dtype)
    for i, t in enumerate(blocks):
        A[2 * i, 2 * i + 1], A[2 * i + 1, 2 * i] = -t, t
    P = torch.linalg.qr(torch.randn(n, n, dtype=dtype, generator=generator))[0]
    return P @ torch.linalg.matrix_exp(A) @ P.mT, P @ A @ P.mT


# --------------------------------------------------------------------------- expm


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
@pytest.mark.parametrize("n", [1, 4, 9])
def test_expm_matches_scipy(random_skew, dtype, n):
    A = random_skew(3, n, dtype=dtype, radius=5.0)
    Q = expm(A)
    for a, q in zip(A, Q):
        ref = torch.from_numpy(scipy.linalg.expm(a.numpy()))
        assert (q - ref).abs().max().item() < 1e-10
    assert unitary_error(Q) < 1e-13


def test_expm_float32_matches_scipy(random_skew):
    A = random_skew(5, dtype=torch.float32, radius=3.0)
    ref = torch.from_numpy(scipy.linalg.expm(A.double().numpy()))
    assert (expm(A).double() - ref).abs().max().item() < 1e-5


def test_expm_real_skew_has_det_one(random_skew):
    Q = expm(random_skew(4, 5, radius=3.0))
    assert torch.allclose(torch.linalg.det(Q), torch.ones(4, dtype=torch.float64), atol=1e-12)


def test_expm_complex_skew_hermitian_is_unitary(random_skew):
    A = random_skew(2, 6, dtype=torch.complex128, radius=10.0)
    assert unitary_error(expm(A)) < 1e-12


# --------------------------------------------------------------------------- cayley


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
def test_cayley_matches_dense_formula_and_is_unitary(random_skew, dtype):
    A = random_skew(3, 5, dtype=dtype, radius=4.0)
    Id = torch.eye(5, dtype=dtype)
    ref = torch.linalg.inv(Id - A / 2) @ (Id + A / 2)
    Q = cayley(A)
    assert (Q - ref).abs().max().item() < 1e-12
    assert unitary_error(Q) < 1e-13


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
def test_cayley_matches_torch_orthogonal(randn, dtype):
    """torch's "cayley" map on a square weight is cayley(X.tril() - X.tril()^H)."""
    layer = torch.nn.Linear(4, 4, bias=False, dtype=dtype)
    parametrizations.orthogonal(layer, orthogonal_map="cayley", use_trivialization=False)
    X = randn(4, 4, dtype=dtype)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(X)
    Y = X.tril()
    assert torch.allclose(layer.weight, cayley(Y - Y.mH), rtol=0, atol=1e-15)


def test_cayley_agrees_with_expm_to_second_order(random_skew):
    A = random_skew(6, radius=1.0)
    errors = [(cayley(t * A) - expm(t * A)).abs().max().item() for t in (1e-2, 1e-3)]
    # the error is t^3 |A|^3 / 12 + O(t^5): divided by 1000 when t is divided by 10
    assert 800 < errors[0] / errors[1] < 1200


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
def test_cayley_inverse_round_trips(random_skew, random_orthogonal, dtype):
    A = random_skew(3, 6, dtype=dtype, radius=20.0)
    assert (cayley_inverse(cayley(A)) - A).abs().max().item() < 1e-12
    Q = random_orthogonal(3, 6, dtype=dtype)
    assert (cayley(cayley_inverse(Q)) - Q).abs().max().item() < 1e-12
    C = cayley_inverse(Q)
    assert (C + C.mH).abs().max().item() < 1e-12  # skew-Hermitian


# --------------------------------------------------------------------------- logm


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_logm_inverts_expm(random_skew, dtype, n):
    if n == 1 and not dtype.is_complex:
        A = torch.zeros(3, 1, 1, dtype=dtype)  # so(1) = {0}
    else:
        A = random_skew(3, n, dtype=dtype, radius=0.99 * math.pi)
    L = logm(expm(A))
    assert L.dtype == dtype
    assert (L - A).abs().max().item() < 1e-11
    assert (L + L.mH).abs().max().item() < 1e-12


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
def test_logm_matches_scipy(random_orthogonal, dtype):
    Q = random_orthogonal(4, 7, dtype=dtype)
    L = logm(Q)
    for q, l in zip(Q, L):
        ref = scipy.linalg.logm(q.numpy())
        assert np.abs(l.numpy() - ref).max() < 1e-11


def test_logm_of_a_complex_unitary_matches_scipy(randn):
    """A Haar-like unitary from a complex QR (not built with expm)."""
    Q = torch.linalg.qr(randn(6, 6, dtype=torch.complex128))[0]
    L = logm(Q)
    assert L.dtype == torch.complex128
    ref = scipy.linalg.logm(Q.numpy())
    assert np.abs(L.numpy() - ref).max() < 1e-10
    assert (expm(L) - Q).abs().max().item() < 1e-12


def test_logm_of_a_real_orthogonal_with_complex_dtype_is_real(random_orthogonal):
    Q = random_orthogonal(5)
    L = logm(Q.to(torch.complex128))
    assert L.imag.abs().max().item() < 1e-13
    assert (L.real - logm(Q)).abs().max().item() < 1e-13


def test_logm_with_repeated_eigenvalues(gen):
    """Identity, and a rotation by the same angle in two planes (double eigenvalues)."""
    Id = torch.eye(5, dtype=torch.float64)
    assert logm(Id).abs().max().item() == 0
    Q, A = with_eigenangle(1.0, n=4, generator=gen)
    Q2, A2 = with_eigenangle(0.3, n=4, generator=gen)
    assert (logm(Q) - A).abs().max().item() < 1e-13
    assert (logm(Q2) - A2).abs().max().item() < 1e-13


def test_logm_corrects_rounding_drift_to_first_order(random_orthogonal, randn):
    """For Q unitary up to delta, logm(Q) is scipy's log of Q itself up to O(delta^2)."""
    Q = random_orthogonal(6)
    E = 1e-6 * randn(6, 6)
    ref = torch.from_numpy(scipy.linalg.logm((Q + E).numpy()).real)
    assert (logm(Q + E) - ref).abs().max().item() < 1e-10


def test_logm_close_to_but_not_at_minus_one(gen):
    """Within the admitted range, a small distance to -1 is handled accurately."""
    delta = 1e-5
    Q, A = with_eigenangle(math.pi - delta, generator=gen)
    assert (logm(Q) - A).abs().max().item() < 1e-9
    ref = scipy.linalg.logm(Q.numpy())
    assert np.abs(logm(Q).numpy() - ref).max() < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [4, 5, 8, 16])
@pytest.mark.parametrize("factor", [1.05, 2.0, 5.0])
def test_logm_admits_rounded_orthogonal_matrices_just_outside_tol(gen, dtype, n, factor):
    """An orthogonal matrix rounded to ``dtype`` whose spectrum lies a few times the default
    tolerance sqrt(eps) away from -1 is admitted (the documented limit is ``tol``; the rounding
    error of the eigenvectors, about eps / distance, is not a departure from orthogonality)
    and its logarithm is accurate to the conditioning of log there, about eps / distance."""
    eps = torch.finfo(dtype).eps
    dist = factor * math.sqrt(eps)
    Q, _ = with_eigenangle(math.pi - 2 * math.asin(dist / 2), n=n - n % 2, generator=gen)
    Q = torch.block_diag(Q, torch.eye(n % 2, dtype=Q.dtype)).to(dtype)  # odd n: a fixed axis
    ref = scipy.linalg.logm(Q.double().numpy()).real
    L = logm(Q)
    assert L.dtype == dtype
    assert np.abs(L.double().numpy() - ref).max() < 20 * eps / dist


@pytest.mark.parametrize("delta", [0.0, 1e-10])
def test_logm_raises_near_eigenvalue_minus_one(gen, delta):
    Q, _ = with_eigenangle(math.pi - delta, generator=gen)
    with pytest.raises(ValueError, match=r"^Q: .*eigenvalue -1.*got distance") as info:
        logm(Q)
    measured = float(re.search(r"got distance ([0-9.e+-]+)", str(info.value)).group(1))
    assert measured < 1e-8


def test_logm_raises_for_det_minus_one(random_orthogonal):
    Q = random_orthogonal(5, radius=1.0)
    Q = Q * torch.tensor([1.0, 1, 1, 1, -1], dtype=Q.dtype)  # det -1
    with pytest.raises(ValueError, match=r"Q: .*eigenvalue -1.*det\(Q\) = -1"):
        logm(Q)


def test_logm_raises_for_real_eigenvalues_near_minus_one(gen):
    """det +1 but a pair of real eigenvalues -1 +- 1e-6 (not quite orthogonal): no real log."""
    P = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=gen))[0]
    D = torch.diag(torch.tensor([-1 + 1e-6, -1 - 1e-6, 1.0, 1.0], dtype=torch.float64))
    Q = P @ D @ P.mT
    assert torch.linalg.det(Q) > 0
    with pytest.raises(ValueError, match=r"^Q: .*eigenvalue -1.*got distance 1\.0"):
        logm(Q)


def test_logm_error_names_the_batch_index(random_orthogonal, gen):
    Q = random_orthogonal(3, 4, radius=1.0)
    Q[1] = with_eigenangle(math.pi, generator=gen)[0]
    with pytest.raises(ValueError, match=r"batch index \(1,\)"):
        logm(Q)


def test_logm_raises_for_a_non_orthogonal_matrix(randn):
    with pytest.raises(ValueError, match=r"^Q: expected an orthogonal/unitary matrix"):
        logm(torch.eye(4, dtype=torch.float64) + 0.1 * randn(4, 4))


def test_logm_complex_unitary_with_eigenvalue_minus_one_raises():
    Q = torch.diag(torch.tensor([1j, -1, 1], dtype=torch.complex128))
    with pytest.raises(ValueError, match="eigenvalue -1"):
        logm(Q)


def test_inverses_name_non_finite_input():
    Q = torch.eye(3, dtype=torch.float64)
    Q[0, 0] = float("nan")  # not "a distance 0 from eigenvalue -1"
    with pytest.raises(ValueError, match=r"^Q: expected finite entries, got NaN or infinity"):
        cayley_inverse(Q)
    batch = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    batch[1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"infinity at batch index \(1,\)"):
        cayley_inverse(batch)


def test_cayley_inverse_raises_near_eigenvalue_minus_one(gen):
    with pytest.raises(ValueError, match=r"^Q: .*eigenvalue -1.*got distance 0"):
        cayley_inverse(-torch.eye(3, dtype=torch.float64))
    Q, _ = with_eigenangle(math.pi - 1e-10, generator=gen)
    with pytest.raises(ValueError, match=r"smallest singular value of Q \+ I"):
        cayley_inverse(Q)
    Q, _ = with_eigenangle(math.pi - 1e-4, generator=gen)
    C = cayley_inverse(Q)  # far enough: the exact value 2 tan(theta / 2) ~ 4e4
    assert (cayley(C) - Q).abs().max().item() < 1e-10


def test_cayley_inverse_tol_zero_skips_the_distance_check(gen):
    Q, _ = with_eigenangle(math.pi - 1e-10, generator=gen)
    C = cayley_inverse(Q, tol=0)
    assert torch.isfinite(C).all()
    with pytest.raises(ValueError, match="eigenvalue -1"):
        cayley_inverse(-torch.eye(2, dtype=torch.float64), tol=0)


@pytest.mark.parametrize("fn", [expm, logm, cayley, cayley_inverse])
def test_argument_checks(fn):
    with pytest.raises(ValueError, match=r"expected square"):
        fn(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"floating point"):
        fn(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ndim >= 2"):
        fn(torch.zeros(3))


@pytest.mark.parametrize("fn", [expm, logm, cayley, cayley_inverse])
def test_empty_batch(fn):
    out = fn(torch.zeros(0, 3, 3, dtype=torch.float64))
    assert out.shape == (0, 3, 3)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
@pytest.mark.parametrize("fn", [expm, cayley], ids=["expm", "cayley"])
def test_forward_maps_gradcheck(random_skew, fn, dtype):
    A = random_skew(2, 3, dtype=dtype, radius=2.0).requires_grad_()
    assert gradcheck(fn, (A,))


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
def test_logm_gradcheck(random_orthogonal, dtype):
    Q = random_orthogonal(2, 4, dtype=dtype).requires_grad_()
    assert gradcheck(logm, (Q,))


def test_logm_gradcheck_at_repeated_eigenvalues(gen):
    Id = torch.eye(4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(logm, (Id,))
    Q, _ = with_eigenangle(1.0, n=4, generator=gen)
    assert gradcheck(logm, (Q.requires_grad_(),))


def test_logm_gradient_inverts_the_expm_derivative(random_skew):
    """d log(e^A)[d e^A] = dA: the Jacobians of logm at e^A and expm at A are inverse."""
    A = random_skew(4, radius=2.5)
    J_exp = torch.autograd.functional.jacobian(expm, A).reshape(16, 16)
    J_log = torch.autograd.functional.jacobian(logm, expm(A)).reshape(16, 16)
    assert (J_log @ J_exp - torch.eye(16, dtype=torch.float64)).abs().max().item() < 1e-10


def test_logm_third_derivatives_are_refused(random_orthogonal):
    """Second derivatives are supported (tests/retractions/test_func_transforms.py); a third
    raises instead of returning zeros."""
    Q = random_orthogonal(3).requires_grad_()
    (g,) = torch.autograd.grad(logm(Q).pow(2).sum(), Q, create_graph=True)
    (h,) = torch.autograd.grad(g.pow(2).sum(), Q, create_graph=True)
    with pytest.raises(RuntimeError):
        h.sum().backward()


def test_logm_second_derivative_at_the_identity(randn):
    """At Q = I (one eigenvalue of multiplicity n) log(I + E) = E - E^2/2 + ...: the Hessian
    of <C, log Q> applied to T is -(C T^T + T^T C)/2, finite and exact."""
    n = 4
    Q = torch.eye(n, dtype=torch.float64, requires_grad=True)
    C, T = randn(n, n), randn(n, n)
    (g,) = torch.autograd.grad((logm(Q) * C).sum(), Q, create_graph=True)
    (hv,) = torch.autograd.grad((g * T).sum(), Q)
    torch.testing.assert_close(hv, -(C @ T.mT + T.mT @ C) / 2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
def test_cayley_inverse_gradcheck(random_orthogonal, dtype):
    Q = random_orthogonal(2, 3, dtype=dtype).requires_grad_()
    assert gradcheck(cayley_inverse, (Q,))


# --------------------------------------------------------------------------- cayley, fast path


def _cayley_by_solve(A):
    """torch's solve, one matrix at a time: torch 2.13's batched one is wrong above 128 rows
    once the thread count was set (another test's fixture may have set it; see _lu)."""
    Id = torch.eye(A.shape[-1], dtype=A.dtype)
    if A.dim() > 2:
        return torch.stack([_cayley_by_solve(a) for a in A])
    return torch.linalg.solve(Id - A / 2, Id + A / 2)


@pytest.fixture
def block_calls(monkeypatch):
    """The shapes that lie.block_inverse was called with during the test (a spy)."""
    from dtriv.retractions import lie

    calls = []
    real = lie.block_inverse

    def spy(M, leaf):
        calls.append(M.shape)
        return real(M, leaf)

    monkeypatch.setattr(lie, "block_inverse", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64,
                                   torch.complex128])
@pytest.mark.parametrize("skew", [True, False], ids=["skew", "general"])
@pytest.mark.parametrize("n", [40, 100, 401], ids=["solve_path", "inverse_path", "blocks"])
def test_cayley_equals_the_solve_formula_with_its_gradient(randn, dtype, skew, n,
                                                           block_calls):
    """2 (I - A/2)^{-1} - I and the backward M^{-H} G M^{-H} against torch's solve; above
    BLOCK_LEAF rows an exactly skew A takes the block inverse, any other A the LU route."""
    from dtriv.retractions import lie

    X = randn(2, n, n, dtype=torch.complex128 if dtype.is_complex else torch.float64)
    # (blocks: ||A||_1 within BLOCK_MAX_NORM for complex entries too)
    A = (X - X.mH if skew else X) / n ** 0.5 / (2.0 if n > lie.BLOCK_LEAF else 1.0)
    G = randn(*A.shape, dtype=A.dtype)
    tol = 1e-5 if dtype in (torch.float32, torch.complex64) else 1e-10

    def value_and_grad(fn, dt):
        a = A.to(dt).requires_grad_()
        Q = fn(a)
        (g,) = torch.autograd.grad(Q, a, G.to(dt))
        return Q.to(A.dtype), g.to(A.dtype)

    Q, g = value_and_grad(cayley, dtype)
    assert bool(block_calls) == (skew and n > lie.BLOCK_LEAF)
    Q_ref, g_ref = value_and_grad(_cayley_by_solve, A.dtype)
    assert (Q - Q_ref).abs().max() < tol * max(1.0, Q_ref.abs().max())
    assert (g - g_ref).abs().max() < tol * max(1.0, g_ref.abs().max())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_cayley_second_derivatives_and_forward_mode(randn, monkeypatch):
    from dtriv.retractions import lie

    monkeypatch.setattr(lie, "CAYLEY_SOLVE_MAX_N", 0)  # the inverse path at small n
    X = (randn(4, 4) * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda X: cayley(X - X.mT), (X,))
    assert torch.autograd.gradgradcheck(lambda X: cayley(X - X.mT), (X,))
    A, E = randn(5, 5) * 0.3, randn(5, 5)
    _, dQ = torch.func.jvp(cayley, (A,), (E,))
    _, dQ_ref = torch.func.jvp(_cayley_by_solve, (A,), (E,))
    assert (dQ - dQ_ref).abs().max() < 1e-12


def test_cayley_of_a_singular_shift_raises(monkeypatch):
    from dtriv.retractions import lie

    monkeypatch.setattr(lie, "CAYLEY_SOLVE_MAX_N", 0)
    with pytest.raises(ValueError, match=r"A: expected .* I - A/2 invertible"):
        cayley(2 * torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("n", [95, 96], ids=["solve_path", "inverse_path"])
def test_cayley_under_vmap_equals_the_batched_call(randn, n):
    """torch.func.vmap of cayley and of grad through it, on both sides of CAYLEY_SOLVE_MAX_N."""
    from dtriv.retractions import lie

    assert lie.CAYLEY_SOLVE_MAX_N == 95
    X = randn(3, n, n) / n ** 0.5
    A, G = X - X.mT, randn(n, n)
    assert (torch.vmap(cayley)(A) - cayley(A)).abs().max() < 1e-12

    def loss(a):
        return (cayley(a) * G).sum() ** 2

    looped = []
    for a in A:
        a = a.clone().requires_grad_()
        looped.append(torch.autograd.grad(loss(a), a)[0])
    grads = torch.func.vmap(torch.func.grad(loss))(A)
    assert (grads - torch.stack(looped)).abs().max() < 1e-10


def test_cayley_of_a_singular_shift_under_vmap_is_not_finite(monkeypatch):
    """Under torch.func transforms the inverse path cannot raise (docstring of cayley)."""
    from dtriv.retractions import lie

    monkeypatch.setattr(lie, "CAYLEY_SOLVE_MAX_N", 0)
    A = torch.stack([torch.zeros(3, 3), 2 * torch.eye(3)]).double()
    Q = torch.vmap(cayley)(A)
    assert (Q[0] == torch.eye(3, dtype=torch.float64)).all()
    assert not torch.isfinite(Q[1]).all()


@pytest.fixture(params=["lu", "block"])
def inverse_path(request, monkeypatch, block_calls):
    """Both inverses of M = I - A/2 in cayley_of_skew: LU, and block elimination (here with
    leaves of 2 rows, so that every size above 2 takes it). Checks at the end that the block
    path ran when asked for (and not otherwise): the tests cannot pass on the other one."""
    from dtriv.retractions import lie

    if request.param == "block":
        monkeypatch.setattr(lie, "BLOCK_LEAF", 2)
        # (leaves of 2 rows make every size a deep recursion: the norm bound of two levels)
        monkeypatch.setattr(lie, "BLOCK_MAX_NORM_DEEP", lie.BLOCK_MAX_NORM)
    yield request.param
    assert bool(block_calls) == (request.param == "block")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64,
                                   torch.complex128])
@pytest.mark.parametrize("n", [5, 64, 130])
@pytest.mark.parametrize("lower", [False, True])
def test_cayley_of_skew_equals_cayley_of_the_skew_part_with_its_gradient(randn, dtype, n,
                                                                          lower, inverse_path):
    """cayley_of_skew(X) = cayley(X - X^H) with the exact gradient wrt X (torch's solve);
    with ``lower``, cayley(L - L^H) for L = tril(X) (torch's orthogonal), gradient included."""
    from dtriv.retractions.lie import cayley_of_skew

    X = randn(3, n, n, dtype=torch.complex128 if dtype.is_complex else torch.float64)
    X = X / n ** 0.5
    G = randn(*X.shape, dtype=X.dtype)
    tol = 1e-5 if dtype in (torch.float32, torch.complex64) else 1e-10

    def value_and_grad(fn, dt):
        x = X.to(dt).requires_grad_()
        Q = fn(x)
        (g,) = torch.autograd.grad(Q, x, G.to(dt))
        return Q.to(X.dtype), g.to(X.dtype)

    def reference(x):
        L = x.tril() if lower else x
        return _cayley_by_solve(L - L.mH)

    Q, g = value_and_grad(lambda x: cayley_of_skew(x, lower=lower), dtype)
    Q_ref, g_ref = value_and_grad(reference, X.dtype)
    assert (Q - Q_ref).abs().max() < tol * max(1.0, Q_ref.abs().max())
    assert (g - g_ref).abs().max() < tol * max(1.0, g_ref.abs().max())
    assert unitary_error(Q) < 10 * tol
    if lower:
        assert (g.triu(1) == 0).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype", REAL_COMPLEX)
@pytest.mark.parametrize("lower", [False, True])
def test_cayley_of_skew_gradcheck_second_derivatives_forward_mode_vmap(randn, dtype, lower,
                                                                       inverse_path):
    from dtriv.retractions.lie import cayley_of_skew

    def f(x):
        return cayley_of_skew(x, lower=lower)

    def reference(x):
        L = x.tril() if lower else x
        return _cayley_by_solve(L - L.mH)

    X = (randn(2, 4, 4, dtype=dtype) * 0.5).requires_grad_()
    assert gradcheck(f, (X,))
    assert torch.autograd.gradgradcheck(f, (X,))
    E = randn(2, 4, 4, dtype=dtype)
    _, dQ = torch.func.jvp(f, (X.detach(),), (E,))
    _, dQ_ref = torch.func.jvp(reference, (X.detach(),), (E,))
    assert (dQ - dQ_ref).abs().max() < 1e-12
    Qv = torch.vmap(f)(X.detach())
    assert (Qv - f(X.detach())).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128])
@pytest.mark.parametrize("shape,m", [((), 5), ((), 8), ((2,), 5), ((2, 3), 7)])
@pytest.mark.parametrize("lower", [False, True])
def test_cayley_of_skew_with_a_left_factor_is_the_product(randn, dtype, shape, m, lower,
                                                          inverse_path):
    """cayley_of_skew(X, left=B) = B @ cayley_of_skew(X), with the gradients in X and B."""
    from dtriv.retractions.lie import cayley_of_skew

    n = 5
    wide = torch.complex128 if dtype.is_complex else torch.float64
    X = randn(*shape, n, n, dtype=wide) / n ** 0.5
    B = randn(*shape, m, n, dtype=wide)
    G = randn(*shape, m, n, dtype=wide)
    tol = 1e-5 if dtype == torch.float32 else 1e-12

    def value_and_grads(fn, dt):
        x, b = X.to(dt).requires_grad_(), B.to(dt).requires_grad_()
        out = fn(x, b)
        gx, gb = torch.autograd.grad(out, (x, b), G.to(dt))
        return out.to(wide), gx.to(wide), gb.to(wide)

    got = value_and_grads(lambda x, b: cayley_of_skew(x, lower=lower, left=b), dtype)
    want = value_and_grads(lambda x, b: b @ cayley_of_skew(x, lower=lower), wide)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < tol * max(1.0, b.abs().max())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype", REAL_COMPLEX)
def test_cayley_of_skew_with_a_left_factor_derivatives(randn, dtype, inverse_path):
    """Second derivatives, forward mode (tangents in X, in B and in both) and vmap of the fused
    left product, against the two-node composition."""
    from dtriv.retractions.lie import cayley_of_skew

    def f(x, b):
        return cayley_of_skew(x, lower=True, left=b)

    def reference(x, b):
        return b @ cayley_of_skew(x, lower=True)

    X = (randn(2, 4, 4, dtype=dtype) * 0.5).requires_grad_()
    B = randn(2, 3, 4, dtype=dtype).requires_grad_()
    assert gradcheck(f, (X, B))
    assert torch.autograd.gradgradcheck(f, (X, B))
    x, b = X.detach(), B.detach()
    E, F = randn(*X.shape, dtype=dtype), randn(*B.shape, dtype=dtype)
    for tangents in ((E, F), (E, torch.zeros_like(F)), (torch.zeros_like(E), F)):
        _, d = torch.func.jvp(f, (x, b), tangents)
        _, d_ref = torch.func.jvp(reference, (x, b), tangents)
        assert (d - d_ref).abs().max() < 1e-12
    _, d = torch.func.jvp(lambda x: f(x, b), (x,), (E,))
    _, d_ref = torch.func.jvp(lambda x: reference(x, b), (x,), (E,))
    assert (d - d_ref).abs().max() < 1e-12
    assert (torch.vmap(f)(x, b) - f(x, b)).abs().max() < 1e-12
    # a left factor that does not require grad gets no gradient computed
    (gx,) = torch.autograd.grad(f(X, b).abs().sum(), X)
    (gx_ref,) = torch.autograd.grad(reference(X, b).abs().sum(), X)
    assert (gx - gx_ref).abs().max() < 1e-12


@pytest.mark.parametrize("lower", [False, True])
@pytest.mark.parametrize("left", [False, True])
def test_cayley_of_skew_block_inverse_at_its_sizes_in_single_precision(randn, lower, left,
                                                                      block_calls):
    """Above BLOCK_LEAF rows (two levels of uneven splits here), float32: value and gradients
    within 1e-5 of the float64 solve formula, for a random generator with ||A||_2 about 1;
    the block route ran."""
    from dtriv.retractions import lie

    n = 2 * lie.BLOCK_LEAF + 17
    X = randn(n, n) / n ** 0.5 / 2
    B = torch.linalg.qr(randn(n, n))[0]
    G = randn(n, n)

    def value_and_grads(fn, dt):
        x, b = X.to(dt).requires_grad_(), B.to(dt).requires_grad_()
        out = fn(x, b)
        gx, gb = torch.autograd.grad(out, (x, b), G.to(dt))
        return out.double(), gx.double(), gb.double()

    def reference(x, b):
        L = x.tril() if lower else x
        return b @ _cayley_by_solve(L - L.mT)

    def f(x, b):
        if left:
            return lie.cayley_of_skew(x, lower=lower, left=b)
        return b @ lie.cayley_of_skew(x, lower=lower)

    got = value_and_grads(f, torch.float32)
    assert block_calls
    want = value_and_grads(reference, torch.float64)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max())


def test_cayley_of_skew_block_inverse_on_its_worst_generators_in_single_precision():
    """The generators that make elimination without pivoting least accurate couple the two
    halves of the indices by sums of signed permutations. Just inside BLOCK_MAX_NORM, in
    float32 at n = 400, over 12 of them: the block route runs and Q stays within half the
    float32 tolerance of 1e-5 (at ||A||_1 = 32 it reached 1.1e-5)."""
    from dtriv.retractions import lie

    n, h = 400, 200
    eye = torch.eye(n, dtype=torch.float64)
    worst = 0.0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        C = sum(s * torch.eye(h, dtype=torch.float64)[torch.randperm(h, generator=g)]
                for s in (1, -1, 1))
        X = torch.zeros(n, n, dtype=torch.float64)
        X[:h, h:] = C
        X *= 0.999 * lie.BLOCK_MAX_NORM / (X - X.mT).abs().sum(-1).amax()
        assert lie._block_inverse_applies((X - X.mT).float(), None)
        exact = 2 * torch.linalg.inv(eye - (X - X.mT) / 2) - eye
        Q = lie.cayley_of_skew(X.float()).double()
        worst = max(worst, (Q - exact).abs().max().item())
    assert worst < 5e-6


def _coupled_halves(n: int, levels: int, g: torch.Generator) -> torch.Tensor:
    """A skew generator whose halves are coupled by a rotated signed permutation, recursively
    inside each half (``levels`` deep), then signed permutations: the kind that makes the
    block elimination of deep recursions least accurate."""

    def signed_permutation(m):
        P = torch.zeros(m, m, dtype=torch.float64)
        signs = torch.randint(0, 2, (m,), generator=g).double() * 2 - 1
        P[torch.arange(m), torch.randperm(m, generator=g)] = signs
        return P

    if levels == 0:
        S = signed_permutation(n)
        return (S - S.T) / 2
    h = n // 2
    A = torch.zeros(n, n, dtype=torch.float64)
    A[:h, :h] = _coupled_halves(h, levels - 1, g)
    A[h:, h:] = _coupled_halves(h, levels - 1, g)
    theta = torch.rand(h // 2, generator=g, dtype=torch.float64) * math.pi
    R = torch.block_diag(*[torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]],
                                        dtype=torch.float64) for t in theta.tolist()])
    W = R @ signed_permutation(h)
    A[:h, h:] = 0.05 * W / W.abs().sum(0).max()
    A[h:, :h] = -A[:h, h:].T
    return A


@pytest.mark.parametrize("norm", ["BLOCK_MAX_NORM", "BLOCK_MAX_NORM_DEEP"])
def test_cayley_of_skew_on_deep_recursions_in_single_precision(norm):
    """Above 4 * BLOCK_LEAF rows (three levels of block elimination) the block route is taken up
    to BLOCK_MAX_NORM_DEEP only: at n = 800 such generators at ||A||_1 = 24 erred by 1.25e-5
    (LU: 7e-7); at the deep bound the block route runs within the float32 tolerance."""
    from dtriv.retractions import lie

    n = 800
    eye = torch.eye(n, dtype=torch.float64)
    bound = getattr(lie, norm)
    for seed in range(2):
        A = _coupled_halves(n, 1, torch.Generator().manual_seed(1000 + seed))
        A = (0.999 * bound / A.abs().sum(-1).amax() * A).float()
        assert lie._block_inverse_applies(A, None) == (norm == "BLOCK_MAX_NORM_DEEP")
        exact = torch.linalg.solve(eye - A.double() / 2, eye + A.double() / 2)
        assert (lie.cayley_of_skew(A / 2).double() - exact).abs().max() < 1e-5


def test_cayley_of_skew_takes_lu_for_large_or_non_finite_generators(randn, monkeypatch,
                                                                    block_calls):
    """||A||_1 above BLOCK_MAX_NORM, or a non-finite entry, takes the LU path (pivoting keeps
    the error linear in ||A||): same results as the small-size path, NaN propagated."""
    from dtriv.retractions import lie

    monkeypatch.setattr(lie, "BLOCK_LEAF", 2)
    n = 6
    X = randn(n, n)
    A = X - X.mT
    X = X * (1.01 * lie.BLOCK_MAX_NORM / A.abs().sum(-1).amax())
    Q = lie.cayley_of_skew(X)
    assert not block_calls
    assert (Q - _cayley_by_solve(X - X.mT)).abs().max() < 1e-12
    lie.cayley_of_skew(X * 0.98)
    assert block_calls
    block_calls.clear()
    X[1, 2] = float("nan")
    assert lie.cayley_of_skew(X).isnan().all() and not block_calls


@pytest.mark.parametrize("left_grad,backward", [(False, 2), (True, 3)])
def test_cayley_of_skew_with_a_left_factor_backward_product_count(randn, count_products,
                                                                   left_grad, backward):
    """With a left factor B that needs no gradient (a trivialization's base) the backward
    takes two n x n products, as without one: (B M^{-1})^H G M^{-H} reuses the forward's
    B M^{-1}; one more for the gradient in B."""
    from dtriv.retractions.lie import cayley_of_skew

    n = 6
    X = (randn(n, n, dtype=torch.float64) / n ** 0.5).requires_grad_()
    B = randn(n, n, dtype=torch.float64).requires_grad_(left_grad)
    with count_products(n) as fwd:
        out = cayley_of_skew(X, lower=True, left=B)
    with count_products(n) as bwd:
        out.backward(randn(n, n, dtype=torch.float64))
    assert (fwd.count, bwd.count) == (1, backward)


def test_cayley_of_skew_rejects_a_bad_left_factor():
    from dtriv.retractions.lie import cayley_of_skew

    X = torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match=r"left: expected shape \(\.\.\., m, 3\)"):
        cayley_of_skew(X, left=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="left: expected shape"):
        cayley_of_skew(X, left=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="left: expected the dtype of X"):
        cayley_of_skew(X, left=torch.zeros(2, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="left: expected a matrix"):
        cayley_of_skew(X, left=torch.zeros(3))
    assert cayley_of_skew(torch.zeros(0, 3, 3), left=torch.zeros(0, 4, 3)).shape == (0, 4, 3)
    half = cayley_of_skew(X.half(), left=torch.ones(2, 3, 3, dtype=torch.float16))
    assert half.dtype == torch.float16 and torch.equal(half.float(), torch.ones(2, 3, 3))


def test_cayley_of_skew_rejects_bad_input():
    from dtriv.retractions.lie import cayley_of_skew

    with pytest.raises(ValueError, match="square"):
        cayley_of_skew(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="floating"):
        cayley_of_skew(torch.zeros(3, 3, dtype=torch.int64))
    assert cayley_of_skew(torch.zeros(0, 3, 3)).shape == (0, 3, 3)
    with pytest.raises(ValueError, match="lower"):
        cayley_of_skew(torch.zeros(3, 3), lower=1)


def _spy_backward(monkeypatch, cls) -> list:
    """Record, at each backward of ``cls``, the gradients of its auxiliary outputs."""
    seen: list = []
    original = cls.backward

    def spy(ctx, G, *aux):
        seen.append(aux)
        return original(ctx, G, *aux)

    monkeypatch.setattr(cls, "backward", staticmethod(spy))
    return seen


@pytest.mark.parametrize("case", ["cayley", "cayley_of_skew", "left", "logm", "expm_pade"])
def test_no_zero_gradients_are_made_for_the_saved_outputs(monkeypatch, case):
    """The outputs that only carry intermediates to the backward (M^{-1}, B M^{-1}, the
    eigenvectors of logm, the Pade factors) are non-differentiable: their gradients reach the
    backward as None, not as zero matrices allocated and filled at every backward (1 MB each
    at n = 512), and the gradient is unchanged."""
    from dtriv.retractions import _expm, lie

    cayley_of_skew = lie.cayley_of_skew
    monkeypatch.setattr(lie, "CAYLEY_SOLVE_MAX_N", 0)  # cayley's node, not the plain solve
    g = torch.Generator().manual_seed(11)
    X = torch.randn(6, 6, generator=g, dtype=torch.float64) / 3
    A = X - X.mT
    fn, cls, arg = {
        "cayley": (cayley, lie._Cayley, A),
        "cayley_of_skew": (cayley_of_skew, lie._CayleyOfSkew, X),
        "left": (lambda Y: cayley_of_skew(Y, left=torch.eye(6, dtype=Y.dtype)[:4] + 0.1),
                 lie._CayleyOfSkew, X),
        "logm": (logm, lie._Logm, torch.linalg.matrix_exp(A)),
        "expm_pade": (lambda Y: _expm.expm_pade_autograd(Y, 7, 1), _expm.ExpmPade, X),
    }[case]
    arg = arg.clone().requires_grad_()
    want = torch.autograd.grad((fn(arg) ** 2).sum(), arg)[0]
    seen = _spy_backward(monkeypatch, cls)
    got = torch.autograd.grad((fn(arg) ** 2).sum(), arg)[0]
    assert seen and all(g is None for aux in seen for g in aux), seen
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype, big, skew", [
    (torch.float32, 1e2, True), (torch.float32, 1e3, True), (torch.float64, 1e4, True),
    (torch.float32, 1e3, False), (torch.float64, 1e4, False)])
def test_a_small_matrix_batched_with_a_large_one_keeps_its_accuracy(dtype, big, skew):
    """The degree and the squarings are chosen per batch from its largest norm; a matrix of
    norm 1 beside one of norm ``big`` took all of its squarings (float32, big = 1e3: a
    relative error of 2.6e-5 against 6e-8 alone). Matrices that ask for different squaring
    counts are computed group by group: the small one's value and gradient are as accurate
    in the batch as alone, against scipy (the Padé path: a general matrix in the batch)."""
    gen = torch.Generator().manual_seed(0)
    n = 160  # above TORCH_MAX_N: dtriv's own maps
    X = torch.randn(3, n, n, generator=gen, dtype=torch.float64)
    A = X - X.mT
    A = A / torch.linalg.matrix_norm(A, 2, keepdim=True)
    A[1] *= big
    if not skew:
        A[0] += 1e-3 * torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = A.to(dtype).requires_grad_()
    G = torch.randn(n, n, generator=gen, dtype=dtype)
    Q = expm(A)
    (g,) = torch.autograd.grad((Q[0] * G).sum(), A)
    A0 = A[0].detach().double().numpy()
    want = scipy.linalg.expm(A0)
    want_grad = scipy.linalg.expm_frechet(A0.T, G.double().numpy(), compute_expm=False)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    rel = np.linalg.norm(Q[0].detach().double().numpy() - want) / np.linalg.norm(want)
    rel_grad = np.linalg.norm(g[0].double().numpy() - want_grad) / np.linalg.norm(want_grad)
    assert rel <= tol and rel_grad <= tol, (rel, rel_grad)
    assert g[2].abs().max() == 0  # the third matrix is not in the loss
    torch.testing.assert_close(Q[2], expm(A[2].detach()), rtol=tol, atol=tol)


def test_expm_of_skew_groups_a_batch_of_mixed_norms():
    """expm_of_skew likewise (the orthogonal twin's map on a batched weight)."""
    from dtriv.retractions.lie import expm_of_skew

    gen = torch.Generator().manual_seed(1)
    n = 160
    X = torch.randn(2, n, n, generator=gen)
    X[0] /= 4 * torch.linalg.matrix_norm(X[0] - X[0].mT, 2)
    X[1] *= 100.0
    for lower in (False, True):
        L = X.tril() if lower else X
        want = scipy.linalg.expm((L[0] - L[0].mT).double().numpy())
        Q = expm_of_skew(X, lower=lower)
        rel = np.linalg.norm(Q[0].double().numpy() - want) / np.linalg.norm(want)
        assert rel <= 1e-6, rel


def test_expm_of_skew_groups_by_the_generators_it_exponentiates(monkeypatch):
    """With ``lower=True`` only the lower triangle counts: a batch whose lower triangles are
    equal is one call, whatever its upper triangles hold (they split it before: four calls,
    about 4x slower at (4, 64, 64))."""
    from dtriv.retractions import lie

    calls = []
    real = lie._per_group
    monkeypatch.setattr(lie, "_per_group", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(2)
    n = 160
    L = torch.randn(n, n, generator=gen).tril() / n
    X = L.expand(4, n, n).clone()
    for i, scale in enumerate((0.0, 1.0, 1e2, 1e4)):
        X[i] += scale * torch.randn(n, n, generator=gen).triu(1)
    Q = lie.expm_of_skew(X, lower=True)
    assert not calls
    torch.testing.assert_close(Q, lie.expm_of_skew(L, lower=True).expand(4, n, n))
