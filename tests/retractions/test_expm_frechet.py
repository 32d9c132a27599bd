"""expm by Padé scaling and squaring and its Al-Mohy--Higham backward, against scipy and torch."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from dtriv.retractions import expm
from dtriv.retractions import lie as lie_module
from dtriv.retractions._expm import THETA_DOUBLE, THETA_SINGLE, choose_degree

# torch.func's forward mode scripts a helper on first use (a torch-internal deprecation notice).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")

# 1-norms that select every degree of the double table (3, 5, 7, 9, 13) and 0, 2, 4 squarings.
NORMS = [1e-3, 0.1, 0.5, 1.5, 4.0, 20.0, 50.0]
DEGREES = {1e-3: (3, 0), 0.1: (5, 0), 0.5: (7, 0), 1.5: (9, 0), 4.0: (13, 0), 20.0: (13, 2),
           50.0: (13, 4)}
REAL_COMPLEX = [torch.float64, torch.complex128]
N = 6  # above lie.TORCH_MAX_N: every call below takes the Padé path


def with_norm(X, norm):
    """``X`` scaled so that its largest 1-norm (max column sum) over the batch is ``norm``."""
    return X * (norm / X.abs().sum(dim=-2).amax())


def rel(X, Y):
    return ((X - Y).norm() / Y.norm()).item()


def scipy_expm(A):
    return torch.from_numpy(scipy.linalg.expm(A.detach().resolve_conj().numpy()))


def scipy_frechet(A, E):
    """L(A, E), the Fréchet derivative of expm at A in the direction E (scipy)."""
    return torch.from_numpy(
        scipy.linalg.expm_frechet(A.detach().resolve_conj().numpy(), E.resolve_conj().numpy(),
                                   compute_expm=False))


def vjp(fn, A, G):
    A = A.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(A), A, G)
    return g


def inner(X, Y):
    """Real inner product Re <X, Y> = Re tr(X^H Y)."""
    return (X.conj() * Y).sum().real.item()


def test_lie_module_uses_the_pade_path_above_the_fallback_size():
    assert lie_module.TORCH_MAX_N < N


def test_degree_table():
    assert [choose_degree(norm, torch.float64) for norm in NORMS] == [DEGREES[n] for n in NORMS]
    assert choose_degree(0.0, torch.float64) == (3, 0)
    for m, theta in THETA_DOUBLE[:-1]:
        assert choose_degree(theta, torch.float64) == (m, 0)
    theta13 = THETA_DOUBLE[-1][1]
    assert choose_degree(theta13, torch.complex128) == (13, 0)
    assert choose_degree(theta13 * 1.01, torch.float64) == (13, 1)
    assert choose_degree(theta13 * 2 ** 10, torch.float64) == (13, 10)
    # single precision: Higham's single table, top degree 7
    assert choose_degree(0.1, torch.float32) == (3, 0)
    assert choose_degree(1.0, torch.complex64) == (5, 0)
    assert choose_degree(3.0, torch.float32) == (7, 0)
    assert choose_degree(THETA_SINGLE[-1][1] * 3, torch.float32) == (7, 2)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
@pytest.mark.parametrize("skew", [True, False], ids=["skew", "general"])
def test_forward_matches_scipy_at_every_degree(randn, dtype, skew):
    for norm in NORMS:
        X = randn(2, N, N, dtype=dtype)
        A = with_norm(X - X.mH if skew else X, norm)
        Q = expm(A)
        for a, q in zip(A, Q):
            assert rel(q, scipy_expm(a)) < 1e-12, norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_forward_single_precision_matches_double_reference(randn, dtype):
    for norm in [1e-3, 0.3, 1.0, 3.0, 10.0, 50.0]:  # single table: m = 3, 5, 7 and squarings
        X = randn(2, N, N, dtype=dtype)
        A = with_norm(X - X.mH, norm)
        Q = expm(A)
        assert Q.dtype == dtype
        ref = expm(A.to(torch.complex128 if dtype.is_complex else torch.float64))
        assert rel(Q.to(ref.dtype), ref) < 1e-5, norm


def half_ulp(X, dtype):
    """The spacing of ``dtype`` (a half precision) at each entry of ``X`` (subnormals too)."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(X.abs().clamp_min(info.smallest_normal)))) * info.eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_half_precision_is_computed_in_single(random_skew, dtype):
    """A half input is computed in float32 and rounded once: the result is exactly the float32
    result cast down, hence within half an ulp of the double oracle (a computation in half
    precision is off by tens of ulps, which an absolute 4e-3 did not see)."""
    A = random_skew(2, N, radius=2.0).to(dtype)
    Q = expm(A)
    assert Q.dtype == dtype
    assert torch.equal(Q, expm(A.float()).to(dtype))
    ref = torch.linalg.matrix_exp(A.double())  # of the same (rounded) input
    assert ((Q.double() - ref).abs() <= 0.5 * half_ulp(ref, dtype) + 1e-5).all()


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
def test_gradient_is_the_adjoint_of_scipys_frechet_derivative(randn, dtype):
    """<G, L(A, E)> = <grad, E> with grad our gradient of <G, expm(A)> and L from scipy."""
    for norm in NORMS:
        A = with_norm(randn(N, N, dtype=dtype), norm)
        G, E = randn(N, N, dtype=dtype), randn(N, N, dtype=dtype)
        grad = vjp(expm, A, G)
        L = scipy_frechet(A, E)
        lhs, rhs = inner(G, L), inner(grad, E)
        assert abs(lhs - rhs) <= 1e-10 * (G.norm() * L.norm()).item(), norm
        # the whole gradient: L(A^H, G)
        assert rel(grad, scipy_frechet(A.mH, G)) < 1e-10, norm


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
@pytest.mark.parametrize("skew", [True, False], ids=["skew", "general"])
def test_gradient_equals_torch_matrix_exp_gradient(randn, dtype, skew):
    for norm in NORMS:
        X = randn(2, N, N, dtype=dtype)
        A = with_norm(X - X.mH if skew else X, norm)
        G = randn(2, N, N, dtype=dtype)
        assert rel(vjp(expm, A, G), vjp(torch.linalg.matrix_exp, A, G)) < 1e-10, norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_gradient_single_precision(randn, dtype):
    double = torch.complex128 if dtype.is_complex else torch.float64
    for norm in [0.3, 3.0, 20.0]:
        X = randn(N, N, dtype=double)
        A = with_norm(X - X.mH, norm)
        G = randn(N, N, dtype=double)
        grad = vjp(expm, A.to(dtype), G.to(dtype))
        assert grad.dtype == dtype
        assert rel(grad.to(double), vjp(expm, A, G)) < 1e-5, norm


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
@pytest.mark.parametrize("norm", [0.01, 1.0, 10.0], ids=["m3", "m9", "m13s1"])
def test_gradcheck_general_matrices(randn, dtype, norm):
    A = with_norm(randn(2, 3, 3, dtype=dtype), norm).requires_grad_()
    assert gradcheck(expm, (A,))


def test_batched_equals_loop(randn):
    """The degree and scaling come from the largest norm of the batch: same values to rounding."""
    X = randn(2, 3, N, N)
    A = X * torch.tensor([1e-3, 0.2, 1.0, 3.0, 10.0, 40.0], dtype=X.dtype).reshape(2, 3, 1, 1)
    G = randn(2, 3, N, N)
    Q, grad = expm(A), vjp(expm, A, G)
    for i in range(2):
        for j in range(3):
            assert rel(Q[i, j], expm(A[i, j])) < 1e-12
            assert rel(grad[i, j], vjp(expm, A[i, j], G[i, j])) < 1e-10


class _CountProducts(TorchDispatchMode):
    """Counts the matrix products (aten mm / bmm) run under it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("norm", NORMS)
def test_cost_in_products_and_independent_of_the_cotangent(randn, norm):
    """Forward pi_m + s products, backward 2 pi_m + 1 + 2s, whatever the size of G."""
    m, s = DEGREES[norm]
    pi = {3: 2, 5: 3, 7: 4, 9: 5, 13: 6}[m]
    A = with_norm(randn(N, N), norm).requires_grad_()
    for scale in (1.0, 1e8):
        with _CountProducts() as fwd:
            Q = expm(A)
        with _CountProducts() as bwd:
            Q.backward(scale * randn(N, N))
        assert (fwd.count, bwd.count) == (pi + s, 2 * pi + 1 + 2 * s)


def test_double_backward_matches_torch(randn):
    A = with_norm(randn(3, 3), 2.0).requires_grad_()
    assert gradgradcheck(expm, (A,))
    G, H = randn(3, 3), randn(3, 3)

    def second(fn):
        (g,) = torch.autograd.grad(fn(A), A, G, create_graph=True)
        (h,) = torch.autograd.grad((g * H).sum(), A)
        return h

    assert rel(second(expm), second(torch.linalg.matrix_exp)) < 1e-10


# --------------------------------------------------------------------------- fallbacks


def test_tiny_matrices_use_torch(randn):
    for n in range(1, lie_module.TORCH_MAX_N + 1):
        A, G = randn(4, n, n), randn(4, n, n)
        assert torch.equal(expm(A), torch.linalg.matrix_exp(A))
        assert torch.equal(vjp(expm, A, G), vjp(torch.linalg.matrix_exp, A, G))


def test_non_finite_input_propagates(randn):
    A = randn(2, N, N)
    A[1, 0, 0] = float("nan")
    Q = expm(A)
    assert torch.isnan(Q[1]).any()
    assert torch.equal(Q.isnan(), torch.linalg.matrix_exp(A).isnan())


@pytest.mark.parametrize("norm", [0.5, 20.0], ids=["s0", "s2"])
def test_result_is_contiguous_and_may_be_modified_in_place(randn, norm):
    A = with_norm(randn(2, N, N), norm).requires_grad_()
    Q = expm(A)
    assert Q.is_contiguous()
    G = randn(2, N, N)
    expected = vjp(expm, A, 2 * G)
    Q.mul_(2)
    Q.backward(G)
    assert rel(A.grad, expected) < 1e-14


# ------------------------------------------------------------------------- forward mode, torch.func


@pytest.mark.parametrize("dtype", REAL_COMPLEX)
def test_forward_mode_is_scipys_frechet_derivative(randn, dtype):
    for norm in NORMS:
        A = with_norm(randn(N, N, dtype=dtype), norm)
        E = randn(N, N, dtype=dtype)
        Q, dQ = torch.func.jvp(expm, (A,), (E,))
        assert rel(Q, scipy_expm(A)) < 1e-12, norm
        assert rel(dQ, scipy_frechet(A, E)) < 1e-10, norm


def test_torch_func_transforms_match_matrix_exp(randn):
    A = with_norm(randn(2, N, N), 3.0)
    assert rel(torch.func.vmap(expm)(A), torch.linalg.matrix_exp(A)) < 1e-12
    J = torch.func.jacrev(expm)(A[0])
    assert rel(J, torch.func.jacrev(torch.linalg.matrix_exp)(A[0])) < 1e-10
    assert rel(torch.func.jacfwd(expm)(A[0]), J) < 1e-10
    grad = torch.func.grad(lambda a: (expm(a) * A[1]).sum())(A[0])
    assert rel(grad, vjp(torch.linalg.matrix_exp, A[0], A[1])) < 1e-10


@pytest.mark.parametrize("angle", [0.3, 0.57, 1.0, 2.5])
def test_expm_float32_is_orthogonal_for_2x2_rotations(angle):
    # torch.linalg.matrix_exp misses orthogonality by 3.2e-5 at angle 0.57 in float32
    A = torch.tensor([[0.0, angle], [-angle, 0.0]])
    W = expm(A)
    assert (W.mT @ W - torch.eye(2)).abs().max() < 1e-6
    exact = torch.tensor([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    torch.testing.assert_close(W, exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, a, b, tol", [
    (torch.float64, 0.1, 1e6, 1e-10), (torch.float64, 5.0, 1e8, 1e-7),
    (torch.float64, 1.0, 1e10, 1e-5), (torch.float32, 1.0, 1e4, 1e-3)])
def test_triangular_non_normal_matrices_keep_their_zeros(dtype, a, b, tol):
    """exp([[a, b], [0, -a]]) = [[e^a, b sinh(a) / a], [0, e^-a]]: a triangular matrix whose
    1-norm asks for 8 squarings or more goes to torch's products, which keep the zero (the
    Padé solve left rounding there that the squarings doubled: 4.8e-6, 3e-2, 1e13 and 0.43
    relative)."""
    from dtriv.retractions import expm

    A = torch.tensor([[a, b], [0.0, -a]], dtype=dtype)
    exact = torch.tensor([[math.exp(a), b * math.sinh(a) / a], [0.0, math.exp(-a)]],
                         dtype=torch.float64)
    Q = expm(A).double()
    assert Q[1, 0] == 0
    assert (Q - exact).abs().max() <= tol * exact.abs().max()
