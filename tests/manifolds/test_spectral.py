"""Matrices with singular values in [lower, upper]."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from dtriv.manifolds import SpectrallyBounded

F64 = torch.float64
CASES = {
    "ball": (SpectrallyBounded(6, 4, upper=2.0), F64),
    "band_wide": (SpectrallyBounded(3, 5, upper=1.5, lower=0.5), F64),
    "complex": (SpectrallyBounded(4, 4, upper=1.0, lower=0.2), torch.complex128),
}


def svals(X: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(X.numpy(), compute_uv=False)


# ---------------------------------------------------------------------------- 1. tangent
@pytest.mark.parametrize("case", list(CASES))
def test_proj_tangent_is_identity(case, gen):
    M, dtype = CASES[case]
    B = M.sample(2, generator=gen, dtype=dtype)
    V = torch.randn(B.shape, generator=gen, dtype=dtype)
    torch.testing.assert_close(M.proj_tangent(B, V), V, atol=0, rtol=0)
    assert M.dim == M.n * M.k


# ---------------------------------------------------------------------------- 2. project
@pytest.mark.parametrize("case", list(CASES))
def test_project_clips_singular_values(case, gen):
    M, dtype = CASES[case]
    B = M.sample(3, generator=gen, dtype=dtype)
    torch.testing.assert_close(M.project(B), B, atol=1e-12, rtol=0)
    X = 2 * torch.randn(M.n, M.k, generator=gen, dtype=dtype)
    P = M.project(X)
    u, s, vh = np.linalg.svd(X.numpy(), full_matrices=False)
    expected = (u * np.clip(s, M.lower, M.upper)) @ vh
    np.testing.assert_allclose(P.numpy(), expected, atol=1e-12)
    assert M.check(P)
    dist = torch.linalg.matrix_norm(X - P)
    others = M.sample(500, generator=gen, dtype=dtype)
    assert dist <= torch.linalg.matrix_norm(X - others).min()
    # no better point nearby: project small moves of P
    E = torch.randn(200, M.n, M.k, generator=gen, dtype=dtype)
    near = M.project(P + 1e-2 * E / torch.linalg.matrix_norm(E)[..., None, None])
    assert dist <= torch.linalg.matrix_norm(X - near).min() + 1e-13


# ---------------------------------------------------------------------------- 3. check
@pytest.mark.parametrize("M", [SpectrallyBounded(5, 3), SpectrallyBounded(3, 5, 2.0, 1.0),
                               SpectrallyBounded(300, 40, 3.0, 3.0)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.complex64])
def test_check_sample(M, dtype, gen):
    batch = () if M.n > 100 else (2, 3)
    X = M.sample(*batch, generator=gen, dtype=dtype)
    assert X.shape == (*batch, M.n, M.k) and X.dtype == dtype
    ok, reason = M.check(X, explain=True)
    assert ok, reason


def test_check_perturbed_explains(gen):
    M = SpectrallyBounded(4, 3, upper=2.0, lower=0.5)
    X = M.sample(3, generator=gen, dtype=F64)
    U, S, Vh = torch.linalg.svd(X[1], full_matrices=False)
    S[0] = 2.1
    X[1] = (U * S) @ Vh
    ok, reason = M.check(X, explain=True)
    assert not ok and "sigma_max" in reason and "X[1]" in reason and "5.000e-02" in reason
    S[0], S[-1] = 1.0, 0.3
    X[1] = (U * S) @ Vh
    ok, reason = M.check(X, explain=True)
    assert not ok and "sigma_min" in reason and "1.000e-01" in reason
    torch.testing.assert_close(M.distance(X)[1], torch.tensor(0.1, dtype=F64))


def test_tolerance():
    M = SpectrallyBounded(8, 3)
    assert M.tolerance(F64) == pytest.approx(800 * torch.finfo(F64).eps)
    assert M.tolerance(torch.float32) == pytest.approx(800 * torch.finfo(torch.float32).eps)


# ---------------------------------------------------------------------------- 4. laws
def test_sample_law(gen):
    """Singular values i.i.d. uniform on [lower, upper]; the first singular vector of a
    tall sample is uniform on the sphere (Haar factors)."""
    M = SpectrallyBounded(5, 3, upper=2.0, lower=0.5)
    X = M.sample(1000, generator=gen, dtype=F64)
    s = torch.linalg.svdvals(X).reshape(-1).numpy()
    assert scipy.stats.kstest(s, "uniform", args=(0.5, 1.5)).pvalue > 1e-3
    U = torch.linalg.svd(X, full_matrices=False)[0][:, :, 0]
    U = U * torch.sign(U[:, 1:2])  # remove the sign ambiguity of the singular vector
    u = ((U[:, 0] + 1) / 2).numpy()
    assert scipy.stats.kstest(u, "beta", args=(2, 2)).pvalue > 1e-3


# ---------------------------------------------------------------------------- 5. retract
@pytest.mark.parametrize("case", list(CASES))
def test_clip_retraction(case, gen):
    M, dtype = CASES[case]
    assert M.retractions == ("clip",) and M.default_retraction == "clip"
    B = M.sample(3, generator=gen, dtype=dtype)
    V = torch.randn(B.shape, generator=gen, dtype=dtype)
    X = M.retract(B, 3 * V)
    assert M.check(X)
    torch.testing.assert_close(X, M.project(B + 3 * V))
    # at interior points (the sample's singular values are inside a.s.) it is B + tV
    t = 1e-6
    torch.testing.assert_close(M.retract(B, t * V), B + t * V, atol=1e-13, rtol=0)
    torch.testing.assert_close(M.retract(B, M.retract_inverse(B, X)), X, atol=1e-12, rtol=0)
    torch.testing.assert_close(M.transport(B, X, V), V, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"method: expected one of clip.*'nope'"):
        M.retract(B, V, "nope")


def test_tangent_projection_checks_and_broadcasts_as_stiefels(gen):
    """The identity on tangents, with Stiefel's checks: ``V`` of another dtype or of a batch
    shape that does not broadcast is refused, naming it; a single ``V`` at a batch of points
    gets the batch shape (a fresh tensor), and ``transport`` likewise."""
    M = SpectrallyBounded(3, 2)
    B = M.sample(4, generator=gen, dtype=torch.float64)
    V = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    out = M.proj_tangent(B, V)
    assert out.shape == (4, 3, 2) and torch.equal(out, V.expand(4, 3, 2))
    assert out.data_ptr() != V.data_ptr()
    assert M.transport(B[0], B, V).shape == (4, 3, 2)
    same = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)
    assert M.proj_tangent(B, same) is same
    with pytest.raises(ValueError, match=r"^V: expected the dtype of B, torch.float64, got "
                                         r"torch.float32"):
        M.proj_tangent(B, V.float())
    with pytest.raises(ValueError, match=r"^V: expected a shape that broadcasts with that of "
                                         r"B, \(4, 3, 2\), got \(5, 3, 2\)"):
        M.proj_tangent(B, torch.zeros(5, 3, 2, dtype=torch.float64))


# ---------------------------------------------------------------------------- 6. errors
@pytest.mark.parametrize(
    "args, match",
    [((0, 3), r"n: expected a positive integer, got 0"),
     ((3, 0), r"k: expected a positive integer, got 0"),
     ((3, 3, 1.0, 2.0), r"lower: expected lower <= upper = 1.0, got lower = 2.0"),
     ((3, 3, 1.0, -0.5), r"lower: expected a finite non-negative number, got -0.5"),
     ((3, 3, 0.0), r"upper: expected a finite positive number, got 0.0"),
     ((3, 3, -1.0, -2.0), r"upper: expected a finite positive number, got -1.0")],
)
def test_constructor_errors(args, match):
    with pytest.raises(ValueError, match=match):
        SpectrallyBounded(*args)


def test_validate():
    M = SpectrallyBounded(4, 3)
    with pytest.raises(ValueError, match=r"X: expected .*\(\.\.\., 4, 3\).*got shape \(3, 4\)"):
        M.project(torch.zeros(3, 4))
    assert repr(M) == "SpectrallyBounded(n=4, k=3, upper=1, lower=0)"


# ---------------------------------------------------------------------------- 7. chart
def test_chart_and_tangent(gen):
    M = SpectrallyBounded(4, 3, upper=2.0)
    B = M.sample(generator=gen, dtype=F64)
    X = torch.randn(4, 3, generator=gen, dtype=F64)
    assert M.chart(X) is X
    torch.testing.assert_close(M.tangent(B, X), X, atol=0, rtol=0)
