"""expm of skew-Hermitian matrices: optimized Taylor schemes, against the Padé path and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from numpy.polynomial import polynomial as P
from torch.autograd import gradcheck, gradgradcheck

from dtriv.retractions import _expm, expm
from dtriv.retractions._expm import (
    TAYLOR_DOUBLE,
    TAYLOR_SINGLE,
    expm_pade_autograd,
    expm_skew_taylor,
    taylor_plan,
)

# torch.func's forward mode scripts a helper on first use (a torch-internal deprecation notice).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")

ALL_PLANS = [(m, s) for m in (2, 4, 8, 12, 18) for s in (0, 2)]


def _mono(k):
    c = np.zeros(k + 1)
    c[k] = 1.0
    return c


def _comb(coeffs, powers):
    out = coeffs[0] * _mono(0)
    for c, p in zip(coeffs[1:], powers):
        out = P.polyadd(out, c * p)
    return out


def _scheme_polynomials():
    """Each scheme evaluated on the scalar polynomial x (coefficients of its expansion)."""
    x, x2, x3, x6 = _mono(1), _mono(2), _mono(3), _mono(6)
    c = _expm._T8
    a4 = P.polymul(x2, _comb((0.0, c["x1"], c["x2"]), [x, x2]))
    t8 = P.polyadd(_comb((1.0, 1.0, c["y2"]), [x, x2]),
                   P.polymul(_comb((0.0, c["x3"], 1.0), [x2, a4]),
                             _comb((c["x4"], c["x5"], c["x6"], c["x7"]), [x, x2, a4])))
    b = [_comb(row, [x, x2, x3]) for row in _expm._T12]
    a6 = P.polyadd(b[2], P.polymul(b[3], b[3]))
    t12 = P.polyadd(b[0], P.polymul(P.polyadd(b[1], a6), a6))
    b = [_comb(row, [x, x2, x3, x6]) for row in _expm._T18]
    a9 = P.polyadd(P.polymul(b[0], b[4]), b[3])
    t18 = P.polyadd(b[1], P.polymul(P.polyadd(b[2], a9), a9))
    return {8: t8, 12: t12, 18: t18}


@pytest.mark.parametrize("m", [8, 12, 18])
def test_schemes_are_the_taylor_polynomials(m):
    coeffs = _scheme_polynomials()[m]
    assert len(coeffs) == m + 1
    exact = np.array([1.0 / math.factorial(k) for k in range(m + 1)])
    np.testing.assert_allclose(coeffs, exact, rtol=1e-12, atol=1e-15)


def test_plan_is_the_cheapest_with_the_bound_below_theta():
    for table, dtype in [(TAYLOR_SINGLE, torch.float32), (TAYLOR_DOUBLE, torch.float64)]:
        for bound in [0.0, 1e-9, 1e-3, 0.04, 0.3, 1.0, 2.5, 4.6, 30.0, 1e4]:
            m, s = taylor_plan(bound, dtype)
            theta = {mm: th for mm, _, th in table}
            products = {mm: pi for mm, pi, _ in table}
            assert bound * 2.0 ** -s <= theta[m]
            best = min(pi + max(0, math.ceil(math.log2(bound / th))) if bound > th else pi
                       for _, pi, th in table)
            assert products[m] + s == best


def test_a_tie_in_forward_products_takes_degree_18_without_squarings(gen):
    """Where T_12 with one squaring and T_18 without cost the same 5 forward products, the
    plan is T_18: its reverse pass along skew directions takes 7 products, T_12's 8. The
    result stays within float32 rounding of scipy's exponential."""
    A = _skew(gen, 8, radius=2.0).float()
    m, s, powers = _expm._taylor_powers(A)
    bound = min(float(A2.abs().sum(-1).amax()) ** (1 / k)
                for A2, k in ((powers[0], 2), (powers[1], 3)))
    assert taylor_plan(bound, torch.float32, (12, 18)) == (12, 1)  # the tie
    assert (m, s, len(powers)) == (18, 0, 3)
    Q = _expm.expm_skew_taylor(A)
    assert (Q.double() - _scipy(A.double())).abs().max() < 1e-5


def _forced(monkeypatch, plan):
    """Run expm_skew_taylor with the plan (m, s) whatever the norm."""
    monkeypatch.setattr(_expm, "taylor_plan", lambda bound, dtype, degrees=None: plan)


def _skew(gen, *shape, dtype=torch.float64, radius=1.0):
    n = shape[-1]
    if dtype.is_complex:
        real = torch.randn(*shape, n, 2, dtype=torch.float64, generator=gen)
        X = torch.view_as_complex(real).to(dtype)
    else:
        X = torch.randn(*shape, n, dtype=torch.float64, generator=gen).to(dtype)
    A = X - X.mH
    return A * (radius / torch.linalg.matrix_norm(A, 2).amax())


def _scipy(A):
    return torch.from_numpy(scipy.linalg.expm(A.detach().resolve_conj().numpy()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("plan", ALL_PLANS, ids=str)
def test_every_scheme_matches_scipy(monkeypatch, gen, dtype, plan):
    A = _skew(gen, 2, 7, dtype=dtype, radius=0.05)
    _forced(monkeypatch, plan)
    Q = expm_skew_taylor(A)
    m, s = plan
    # truncation error of T_m at 2^-s * 0.05 (tiny for the high degrees)
    r = 0.05 * 2.0 ** -s
    bound = 2.0 ** s * r ** (m + 1) / math.factorial(m + 1) * 2 + 1e-14
    for a, q in zip(A, Q):
        assert (q - _scipy(a)).abs().max() < bound


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("radius", [1e-6, 1e-2, 0.3, 1.0, 3.0, 10.0, 80.0])
def test_expm_of_skew_matches_scipy_and_the_pade_path(gen, dtype, radius):
    A = _skew(gen, 3, 24, dtype=dtype, radius=radius)
    Q = expm(A)
    for a, q in zip(A, Q):
        ref = _scipy(a)
        assert ((q - ref).norm() / ref.norm()) < 1e-12 * max(1.0, radius)
    from dtriv.retractions._expm import choose_degree

    m, s = choose_degree(float(A.abs().sum(-2).amax()), dtype)
    assert (Q - expm_pade_autograd(A, m, s)).abs().max() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("radius", [1e-3, 0.5, 2.0, 6.0])
def test_single_precision_matches_the_reference_within_1e_5(gen, dtype, radius):
    A = _skew(gen, 2, 96, dtype=dtype, radius=radius)
    Q = expm(A)
    ref = torch.linalg.matrix_exp(A.to(torch.complex128 if dtype.is_complex else torch.float64))
    assert (Q.to(ref.dtype) - ref).abs().max() < 1e-5
    Id = torch.eye(96, dtype=dtype)
    assert (Q.mH @ Q - Id).abs().max() < 1e-5


def test_single_precision_gradient_matches_double(gen):
    L = torch.randn(128, 128, dtype=torch.float64, generator=gen).tril() / 128 ** 0.5
    G = torch.randn(128, 128, dtype=torch.float64, generator=gen)

    def grad(dtype):
        X = L.to(dtype).detach().requires_grad_()
        (expm(X - X.mH) * G.to(dtype)).sum().backward()
        return X.grad.double()

    ref = grad(torch.float64)
    assert (grad(torch.float32) - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("plan", [(2, 1), (4, 0), (8, 1), (12, 0), (18, 1)], ids=str)
def test_gradcheck_every_scheme(monkeypatch, gen, dtype, plan):
    """The gradient with respect to a skew input through X - X^H (the twin's use)."""
    X = torch.randn(4, 4, dtype=torch.float64, generator=gen).to(dtype) * 0.3
    _forced(monkeypatch, plan)
    assert gradcheck(lambda X: expm_skew_taylor(X - X.mH), (X.requires_grad_(),))


def test_gradient_equals_the_pade_and_torch_gradients(gen):
    for radius in [0.01, 1.0, 5.0]:
        A = _skew(gen, 2, 20, radius=radius)
        G = torch.randn(2, 20, 20, dtype=torch.float64, generator=gen)

        def vjp(fn, A=A, G=G):
            a = A.clone().requires_grad_()
            (g,) = torch.autograd.grad(fn(a), a, G)
            return g

        ref = vjp(torch.linalg.matrix_exp)
        assert (vjp(expm) - ref).abs().max() < 1e-10 * ref.abs().max()


def test_second_derivatives_and_forward_mode(gen):
    X = (torch.randn(4, 4, dtype=torch.float64, generator=gen) * 0.4).requires_grad_()
    assert gradgradcheck(lambda X: expm(X - X.mT), (X,))
    A, E = _skew(gen, 6, radius=1.5), torch.randn(6, 6, dtype=torch.float64, generator=gen)
    _, dQ = torch.func.jvp(expm, (A,), (E,))
    ref = torch.from_numpy(scipy.linalg.expm_frechet(A.numpy(), E.numpy(), compute_expm=False))
    assert (dQ - ref).abs().max() < 1e-12


def test_only_exactly_skew_inputs_take_the_taylor_path(gen, monkeypatch):
    calls = []
    real = _expm.expm_skew_taylor

    def spy(A):
        calls.append(A.shape)
        return real(A)

    from dtriv.retractions import lie

    monkeypatch.setattr(lie, "expm_skew_taylor", spy)
    A = _skew(gen, 6)
    expm(A)
    assert len(calls) == 1
    B = A.clone()
    B[0, 1] += 1e-3
    expm(B)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("plan", ALL_PLANS, ids=str)
def test_hand_written_reverse_pass_equals_autograd(monkeypatch, gen, dtype, plan):
    """ExpmTaylor's tape adjoint against the same computation recorded by autograd."""
    A = _skew(gen, 2, 9, dtype=dtype, radius=0.7)
    G = _skew(gen, 2, 9, dtype=dtype) + torch.randn(2, 9, 9, generator=gen).to(dtype)
    _forced(monkeypatch, plan)

    def value_and_grad(fn):
        a = A.clone().requires_grad_()
        Q = fn(a)
        (g,) = torch.autograd.grad(Q, a, G)
        return Q, g

    Q, g = value_and_grad(expm_skew_taylor)
    Q_ref, g_ref = value_and_grad(_expm.expm_skew_taylor_autograd)
    assert (Q - Q_ref).abs().max() < 1e-14
    assert (g - g_ref).abs().max() < 1e-12 * g_ref.abs().max()
    Q.mul_(2)  # the result is never saved: modifying it leaves the gradient intact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64,
                                   torch.complex128])
@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 4.0])
def test_expm_of_skew_equals_the_exponential_of_the_skew_part_with_its_gradient(dtype, scale):
    """expm_of_skew(X) = e^{X - X^H} (scipy) and its gradient wrt X (torch's matrix_exp)."""
    from dtriv.retractions.lie import expm_of_skew

    g = torch.Generator().manual_seed(7)
    real = torch.complex128 if dtype.is_complex else torch.float64
    n = 48
    X = torch.randn(2, n, n, dtype=real, generator=g) * scale / n ** 0.5
    G = torch.randn(2, n, n, dtype=real, generator=g)
    tol = 1e-5 if dtype in (torch.float32, torch.complex64) else 1e-10
    x = X.to(dtype).clone().requires_grad_()
    Q = expm_of_skew(x)
    (gx,) = torch.autograd.grad(Q, x, G.to(dtype))
    xr = X.clone().requires_grad_()
    Qr = torch.linalg.matrix_exp(xr - xr.mH)
    (gr,) = torch.autograd.grad(Qr, xr, G)
    A = (X - X.mH).numpy()
    Qs = torch.from_numpy(np.stack([scipy.linalg.expm(a) for a in A]))
    assert (Q.to(real) - Qs).abs().max() < tol
    assert (gx.to(real) - gr).abs().max() < tol * max(1.0, gr.abs().max())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("scale", [0.1, 2.0])
def test_expm_of_skew_gradcheck_second_derivatives_forward_mode(dtype, scale):
    from dtriv.retractions.lie import expm_of_skew

    g = torch.Generator().manual_seed(3)
    X = (torch.randn(2, 5, 5, dtype=dtype, generator=g) * scale).requires_grad_()
    assert gradcheck(expm_of_skew, (X,))
    assert gradgradcheck(expm_of_skew, (X,))
    E = torch.randn(2, 5, 5, dtype=dtype, generator=g)
    _, dQ = torch.func.jvp(expm_of_skew, (X.detach(),), (E,))
    _, dQ_ref = torch.func.jvp(lambda x: torch.linalg.matrix_exp(x - x.mH), (X.detach(),), (E,))
    assert (dQ - dQ_ref).abs().max() < 1e-10
    Qv = torch.vmap(expm_of_skew)(X.detach())  # the torch fallback under vmap
    assert (Qv - expm_of_skew(X.detach())).abs().max() < 1e-10


def test_expm_of_skew_fallbacks_and_bad_input():
    from dtriv.retractions.lie import expm_of_skew

    with pytest.raises(ValueError, match="square"):
        expm_of_skew(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="floating"):
        expm_of_skew(torch.zeros(3, 3, dtype=torch.int64))
    x = torch.tensor([[0.5]], dtype=torch.float64)
    assert expm_of_skew(x).item() == 1.0
    assert expm_of_skew(torch.zeros(0, 3, 3)).shape == (0, 3, 3)
    assert torch.isnan(expm_of_skew(torch.full((3, 3), float("nan")))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128])
def test_expm_of_skew_lower_reads_the_lower_triangle(dtype):
    """expm_of_skew(X, lower=True) = e^{L - L^H}, L = tril(X) (torch's orthogonal), with the
    gradient of that composition; derivatives of every order and forward mode."""
    from dtriv.retractions.lie import expm_of_skew

    g = torch.Generator().manual_seed(11)
    real = torch.complex128 if dtype.is_complex else torch.float64
    X = torch.randn(2, 40, 40, dtype=real, generator=g) * 0.3
    G = torch.randn(2, 40, 40, dtype=real, generator=g)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    x = X.to(dtype).requires_grad_()
    Q = expm_of_skew(x, lower=True)
    (gx,) = torch.autograd.grad(Q, x, G.to(dtype))
    xr = X.clone().requires_grad_()
    L = xr.tril()
    Qr = torch.linalg.matrix_exp(L - L.mH)
    (gr,) = torch.autograd.grad(Qr, xr, G)
    assert (Q.to(real) - Qr).abs().max() < tol
    assert (gx.to(real) - gr).abs().max() < tol * max(1.0, gr.abs().max())
    assert (gx.triu(1) == 0).all()
    if dtype != torch.float32:
        Y = (torch.randn(5, 5, dtype=dtype, generator=g)).requires_grad_()

        def f(y):
            return expm_of_skew(y, lower=True)

        assert gradcheck(f, (Y,))
        assert gradgradcheck(f, (Y,))
        E = torch.randn(5, 5, dtype=dtype, generator=g)
        _, dQ = torch.func.jvp(f, (Y.detach(),), (E,))
        _, dQ_ref = torch.func.jvp(
            lambda y: torch.linalg.matrix_exp(y.tril() - y.tril().mH), (Y.detach(),), (E,))
        assert (dQ - dQ_ref).abs().max() < 1e-10
    with pytest.raises(ValueError, match="lower"):
        expm_of_skew(x, lower=1)


@pytest.mark.parametrize("n", [9, 130], ids=["heap", "arena"])
@pytest.mark.parametrize("plan", [(12, 0), (18, 0), (12, 1), (18, 2)], ids=str)
def test_written_out_schemes_equal_the_tape_of_separate_powers(monkeypatch, gen, plan, n):
    """With the powers in one stacked buffer (plain tensors in eager code) both entry points
    take the written-out schemes, whose combinations are one product with the stack; without
    the stack (the path of transforms and subclasses) they record and interpret the tape. The
    two agree, values and gradients, and results and gradients own their storage (no view of
    a stack leaks out)."""
    _forced(monkeypatch, plan)
    X = 0.3 * torch.randn(2, n, n, dtype=torch.float64, generator=gen)
    G = torch.randn(2, n, n, dtype=torch.float64, generator=gen)

    def run():
        x = X.clone().requires_grad_()
        Q = _expm.expm_of_skew_taylor(x)
        (gx,) = torch.autograd.grad(Q, x, G)
        a = (X - X.mT).requires_grad_()
        R = expm_skew_taylor(a)
        (ga,) = torch.autograd.grad(R, a, G)
        return (Q, gx, R, ga), (type(Q.grad_fn).__name__, type(R.grad_fn).__name__)

    written, nodes = run()
    assert nodes == ("ExpmOfSkewWrittenOutBackward", "ExpmWrittenOutBackward")
    monkeypatch.setattr(_expm, "power_stack", lambda A: None)
    taped, nodes = run()
    assert nodes == ("ExpmOfSkewTaylorBackward", "ExpmTaylorBackward")
    for s, t in zip(written, taped):
        assert (s - t).abs().max() <= 1e-13 * t.abs().max()
    for t in written:
        assert t._base is None
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("plan", ALL_PLANS, ids=str)
@pytest.mark.parametrize("fn", ["expm_skew_taylor", "expm_of_skew_taylor"])
def test_a_gradient_outlives_the_next_reverse_pass(monkeypatch, gen, fresh_scratch, fn, plan):
    """Matrices large enough for the scratch pool (n = 256, float32): the gradient a reverse
    pass returns owns its storage, so the next pass (which reuses the pool) leaves it as is."""
    _forced(monkeypatch, plan)
    f = getattr(_expm, fn)

    def grad(seed):
        g = torch.Generator().manual_seed(seed)
        A = _skew(g, 256, dtype=torch.float32, radius=0.5).requires_grad_()
        (gA,) = torch.autograd.grad(f(A), A, torch.randn(256, 256, generator=g))
        return gA

    first = grad(1)
    kept = first.clone()
    second = grad(2)
    assert torch.equal(first, kept)
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()


WRITTEN_OUT_PLANS = ALL_PLANS + [(18, 1), (18, 3)]


def _tape_path(monkeypatch):
    """Make expm_of_skew_taylor take the tape (ExpmOfSkewTaylor) for every plan."""
    monkeypatch.setattr(_expm, "_WRITTEN_OUT", ())


@pytest.mark.parametrize("plan", WRITTEN_OUT_PLANS, ids=str)
@pytest.mark.parametrize("lower", [False, True])
@pytest.mark.parametrize("dtype,shape,tol", [
    (torch.float64, (11,), 1e-14), (torch.complex128, (2, 11), 1e-14),
    (torch.float32, (2, 3, 11), 1e-6), (torch.float64, (140,), 1e-13)],  # the last: pooled
    ids=["real", "complex-batch", "float32-4d", "pooled"])
def test_written_out_schemes_equal_the_tape(monkeypatch, gen, plan, lower, dtype, shape, tol):
    """ExpmOfSkewWrittenOut (each scheme without a tape) against ExpmOfSkewTaylor: the same
    values and gradients with respect to X."""
    _forced(monkeypatch, plan)
    n = shape[-1]
    X = (0.3 * torch.randn(*shape, n, dtype=torch.float64, generator=gen)).to(dtype)
    G = torch.randn(*shape, n, dtype=torch.float64, generator=gen).to(dtype)

    def value_and_grad():
        x = X.clone().requires_grad_()
        Q = _expm.expm_of_skew_taylor(x, lower=lower)
        return Q, torch.autograd.grad(Q, x, G)[0], type(Q.grad_fn).__name__

    Q, g, node = value_and_grad()
    assert node == "ExpmOfSkewWrittenOutBackward"
    _tape_path(monkeypatch)
    Q_ref, g_ref, node_ref = value_and_grad()
    assert node_ref == "ExpmOfSkewTaylorBackward"
    assert (Q - Q_ref).abs().max() <= tol
    assert (g - g_ref).abs().max() <= tol * g_ref.abs().max()


def _written_out_expm_of_skew(monkeypatch, gen, plan, dtype, shape):
    _forced(monkeypatch, plan)
    X = (0.3 * torch.randn(*shape, dtype=torch.float64, generator=gen)).to(dtype)
    X.requires_grad_()

    def f(x):
        return _expm.expm_of_skew_taylor(x, lower=True)

    assert type(f(X).grad_fn).__name__ == "ExpmOfSkewWrittenOutBackward"
    return f, X


@pytest.mark.parametrize("plan", WRITTEN_OUT_PLANS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_written_out_schemes_gradcheck_and_forward_mode(monkeypatch, gen, plan, dtype):
    f, X = _written_out_expm_of_skew(monkeypatch, gen, plan, dtype, (5, 5))
    assert gradcheck(f, (X,), check_forward_ad=True)


@pytest.mark.parametrize("plan", [(4, 1), (18, 2)], ids=str)
def test_written_out_schemes_second_derivatives(monkeypatch, gen, plan):
    f, X = _written_out_expm_of_skew(monkeypatch, gen, plan, torch.complex128, (2, 5, 5))
    assert gradgradcheck(f, (X,))


@pytest.mark.parametrize("path", ["written out", "tape"])
@pytest.mark.parametrize("plan,backward", [
    ((18, 0), 7), ((18, 2), 11), ((12, 0), 6), ((12, 1), 8), ((8, 0), 5), ((4, 1), 5)],
    ids=str)
def test_backward_product_count(monkeypatch, gen, count_products, plan, backward, path):
    """The backward of expm(X - X^H) takes two products per product of the scheme and of
    the squarings, one for the square A^6, and two for A^2 and A^3 together (one for A^2
    alone), in eager code and on the tape: the cost that the docstrings state, and what the
    benchmarks' units rest on."""
    _forced(monkeypatch, plan)
    if path == "tape":
        _tape_path(monkeypatch)
    n = 7
    X = (0.3 * torch.randn(n, n, dtype=torch.float64, generator=gen)).requires_grad_()
    Q = _expm.expm_of_skew_taylor(X, lower=True)
    node = "ExpmOfSkewTaylorBackward" if path == "tape" else "ExpmOfSkewWrittenOutBackward"
    assert type(Q.grad_fn).__name__ == node
    with count_products(n) as bwd:
        Q.backward(torch.randn(n, n, dtype=torch.float64, generator=gen))
    assert bwd.count == backward


@pytest.mark.parametrize("n", [384, 401])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128])
@pytest.mark.parametrize("power", ["A A", "A^3 A^3", "A^2 A"])
def test_half_product_equals_the_product(n, dtype, power):
    # the computed blocks (rows [:h], block [h:, h:]) are the full product's dot products
    # (summed in the blocking order of their own product), the block [h:, :h] their mirror
    # (conjugate transpose, negated for the skew-Hermitian A^3 = A^2 A): equal to the
    # product to rounding, also for the computed A^3 (skew only up to rounding)
    g = torch.Generator().manual_seed(n)
    L = torch.randn(n, n, generator=g, dtype=dtype)
    A = L - L.mH
    X, Y, sign = {"A A": (A, A, 1.0), "A^3 A^3": (A @ A @ A,) * 2 + (1.0,),
                  "A^2 A": (A @ A, A, -1.0)}[power]
    eps = torch.finfo(A.real.dtype).eps
    out = _expm._half_product_into(X, Y, torch.empty_like(X), sign)
    scale = X.abs().sum(dim=-1).amax() * Y.abs().sum(dim=-1).amax()  # bounds each entry's terms
    assert (out - X @ Y).abs().max() <= 4 * n * eps * scale
    h = n // 2
    assert torch.equal(out[h:, :h], sign * out[:h, h:].mH)
    assert torch.equal(out[:h], X[:h] @ Y)


def test_expm_of_skew_above_the_hermitian_square_order_against_scipy():
    # the written-out scheme of degree 18 at n >= HERMITIAN_SQUARE_MIN_N squares A and A^3 by
    # _half_product_into: values and gradients against scipy's expm and Frechet derivative
    from dtriv.retractions.lie import expm_of_skew

    n = _expm.HERMITIAN_SQUARE_MIN_N + 1
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5).requires_grad_()
    G = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q = expm_of_skew(X)
    A = (X - X.mT).detach().numpy()
    np.testing.assert_allclose(Q.detach().numpy(), scipy.linalg.expm(A), rtol=0, atol=1e-12)
    (Q * G).sum().backward()
    Abar = scipy.linalg.expm_frechet(A.T, G.numpy(), compute_expm=False)
    np.testing.assert_allclose(X.grad.numpy(), Abar - Abar.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("fn", ["expm", "expm_of_skew"])
def test_a_batch_of_equal_one_norms_and_different_spectra_splits_by_plan(fn):
    """A dense generator with ||A||_2 = 1 beside block rotations whose ||A||_1 = ||A||_2 is
    twice its 1-norm: the 1-norms do not split the batch, the Taylor bounds do, and each
    matrix gets its own plan (float32, n = 512: the dense one erred by 2.0e-5 in the batch,
    1.4e-6 alone and now in the batch)."""
    from dtriv.retractions import lie

    n = 512
    X = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A1 = (X - X.T) / math.sqrt(n) / 2
    angle = 1.9 * A1.abs().sum(0).max().item()
    A2 = torch.zeros(n, n, dtype=torch.float64)
    i = torch.arange(0, n, 2)
    A2[i, i + 1], A2[i + 1, i] = angle, -angle
    batch = torch.stack([A1, A2]).float()
    assert lie._scale_groups(lie._one_norms(batch), torch.float32) is None
    Q = expm(batch) if fn == "expm" else lie.expm_of_skew(batch / 2)
    for q, a in zip(Q, (A1, A2)):
        exact = torch.from_numpy(scipy.linalg.expm(a.float().double().numpy()))
        assert (q.double() - exact).abs().max() < 5e-6
