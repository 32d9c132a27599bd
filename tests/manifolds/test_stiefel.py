"""Stiefel manifold, orthogonal/unitary group, SO(n) and the RNN initialisations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from scipy.spatial.transform import Rotation
from torch.autograd import gradcheck

from dtriv.manifolds import Orthogonal, SpecialOrthogonal, Stiefel, generator_init
from dtriv.retractions.lie import cayley

F64, C128 = torch.float64, torch.complex128

CASES = {
    "tall": (Stiefel(7, 3), F64),
    "wide": (Stiefel(3, 7), F64),
    "square": (Stiefel(5), F64),
    "so": (SpecialOrthogonal(5), F64),
    "tall_c": (Stiefel(7, 3), C128),
    "wide_c": (Stiefel(3, 7), C128),
    "unitary": (Orthogonal(4), C128),
}
RETRACTION_CASES = [(c, m) for c, (M, _) in CASES.items() for m in M.retractions]


def tangent_residual(M: Stiefel, B: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """max|B^H V + V^H B| (tall) or max|V B^H + B V^H| (wide): zero iff V is tangent."""
    R = B.mH @ V + V.mH @ B if M.n >= M.k else V @ B.mH + B @ V.mH
    return R.abs().max()


def tangent_vector(M: Stiefel, B: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A tangent vector built from the parametrisation B A + (I - B B^H) Z, A skew."""
    T = B if M.n >= M.k else B.mT
    p, q = T.shape[-2:]
    A = torch.randn(*T.shape[:-2], q, q, generator=gen, dtype=B.dtype)
    Z = torch.randn(T.shape, generator=gen, dtype=B.dtype)
    W = T @ (A - A.mH) + Z - T @ (T.mH @ Z)
    return W if M.n >= M.k else W.mT


def frob(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(X)


# ---------------------------------------------------------------------------- 1. tangent
@pytest.mark.parametrize("case", list(CASES))
def test_proj_tangent_is_orthogonal_projection(case, gen):
    M, dtype = CASES[case]
    B = M.sample(3, generator=gen, dtype=dtype)
    Z = torch.randn(B.shape, generator=gen, dtype=dtype)
    P = M.proj_tangent(B, Z)
    assert tangent_residual(M, B, P) < 1e-12
    torch.testing.assert_close(M.proj_tangent(B, P), P, atol=1e-12, rtol=0)
    # residual orthogonal to every tangent vector, in the embedded metric
    for _ in range(3):
        W = tangent_vector(M, B, gen)
        assert tangent_residual(M, B, W) < 1e-12
        assert M.inner(B, Z - P, W).abs().max() < 1e-12
    # tangent vectors are fixed
    torch.testing.assert_close(M.proj_tangent(B, W), W, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "M, expected", [(Stiefel(7, 3), 15), (Stiefel(3, 7), 15), (Stiefel(5), 10),
                    (SpecialOrthogonal(4), 6), (Stiefel(4, 1), 3)]
)
def test_dim_is_rank_of_tangent_projection(M, expected, gen):
    B = M.sample(generator=gen, dtype=F64)
    basis = torch.eye(M.n * M.k, dtype=F64).reshape(-1, M.n, M.k)
    P = M.proj_tangent(B.expand_as(basis), basis).reshape(M.n * M.k, -1)
    assert M.dim == expected == torch.linalg.matrix_rank(P)


# ---------------------------------------------------------------------------- 2. project
@pytest.mark.parametrize("case", list(CASES))
def test_project_matches_scipy_polar_and_fixes_points(case, gen):
    M, dtype = CASES[case]
    B = M.sample(generator=gen, dtype=dtype)
    torch.testing.assert_close(M.project(B), B, atol=1e-12, rtol=0)
    X = torch.randn(4, M.n, M.k, generator=gen, dtype=dtype)
    P = M.project(X)
    assert M.check(P)
    if not M.special:
        for x, p in zip(X, P):
            u, _ = scipy.linalg.polar(x.numpy())
            np.testing.assert_allclose(p.numpy(), u, atol=1e-12)


@pytest.mark.parametrize("case", ["tall", "wide", "square", "so", "unitary"])
def test_project_is_nearest_point(case, gen):
    M, dtype = CASES[case]
    X = torch.randn(M.n, M.k, generator=gen, dtype=dtype)
    P = M.project(X)
    best = frob(X - P)
    others = M.sample(500, generator=gen, dtype=dtype)
    assert best <= frob(X - others).min()
    # and no better point nearby: retract along random tangents
    V = M.random_tangent(P.expand(200, M.n, M.k), generator=gen)
    for t in (1e-1, 1e-2):
        near = M.retract(P.expand_as(V), t * V / frob(V)[..., None, None], "polar")
        assert best <= frob(X - near).min() + 1e-13


@pytest.mark.parametrize("M", [Stiefel(4, 2), Stiefel(2, 4), Orthogonal(3),
                               SpecialOrthogonal(3)], ids=repr)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_project_refuses_non_finite_entries_naming_x(M, value, gen):
    """A matrix with a non-finite entry has no polar factor: a ValueError naming ``X`` (the
    SVD raised LAPACK's error for some shapes and returned NaN for others), also for one bad
    point in a batch; meta tensors, which have no values, are not checked."""
    X = M.sample(3, generator=gen, dtype=torch.float64) * 2.0
    X[1, 0, 1] = value
    with pytest.raises(ValueError, match=r"^X: expected finite entries, got NaN or infinite"):
        M.project(X)
    assert M.project(X.to("meta")).shape == X.shape


def test_so_project_fixes_the_determinant(gen):
    M = SpecialOrthogonal(5)
    R = M.sample(generator=gen, dtype=F64)
    X = torch.diag(torch.tensor([1.0, 1, 1, 1, -1], dtype=F64)) @ R
    X = X + 0.05 * torch.randn(5, 5, generator=gen, dtype=F64)
    assert torch.linalg.det(Stiefel(5).project(X)) < 0  # the O(n) answer is a reflection
    P = M.project(X)
    assert M.check(P) and torch.linalg.det(P) > 0
    torch.testing.assert_close(torch.linalg.det(P), torch.tensor(1.0, dtype=F64))
    assert frob(X - P) <= frob(X - M.sample(1000, generator=gen, dtype=F64)).min()
    V = M.random_tangent(P.expand(200, 5, 5), generator=gen)
    near = M.retract(P.expand_as(V), 1e-2 * V / frob(V)[..., None, None])
    assert frob(X - P) <= frob(X - near).min() + 1e-13


def test_so_project_gradient_is_finite_at_repeated_singular_values(gen):
    """Reflections with a repeated larger singular value, and a batch that mixes them with a
    point of SO(n) (all singular values 1): the map is smooth there (its least singular value
    is simple); the SVD's own backward was NaN. Oracle: central differences."""
    M = SpecialOrthogonal(3)
    R = M.sample(2, generator=gen, dtype=F64)
    X = torch.stack([R[0] @ torch.diag(torch.tensor([2.0, 2.0, -1.0], dtype=F64)) @ R[1],
                     R[0]])
    C = torch.randn(2, 3, 3, generator=gen, dtype=F64)
    Xg = X.clone().requires_grad_()
    (M.project(Xg) * C).sum().backward()
    assert bool(torch.isfinite(Xg.grad).all())
    E = torch.randn(2, 3, 3, generator=gen, dtype=F64)
    h = 1e-6
    fd = ((M.project(X + h * E) - M.project(X - h * E)) * C).sum() / (2 * h)
    torch.testing.assert_close((Xg.grad * E).sum(), fd, rtol=1e-7, atol=1e-9)


def test_so3_project_matches_wahba_solution(gen):
    """Nearest rotation to X maximises tr(R^T X): scipy's Wahba solver (Kabsch)."""
    M = SpecialOrthogonal(3)
    for _ in range(5):
        X = torch.randn(3, 3, generator=gen, dtype=F64)
        expected, _ = Rotation.align_vectors(X.T.numpy(), np.eye(3))
        np.testing.assert_allclose(M.project(X).numpy(), expected.as_matrix(), atol=1e-10)


# ---------------------------------------------------------------------------- 3. check
@pytest.mark.parametrize(
    "M", [Stiefel(7, 3), Stiefel(3, 7), Stiefel(6), SpecialOrthogonal(6), Stiefel(1, 1)],
    ids=repr,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_check_sample(M, dtype, gen):
    if M.special and dtype.is_complex:
        with pytest.raises(ValueError, match="dtype"):
            M.sample(generator=gen, dtype=dtype)
        return
    X = M.sample(2, 3, generator=gen, dtype=dtype)
    assert X.shape == (2, 3, M.n, M.k) and X.dtype == dtype
    assert M.check(X)
    assert M.distance(X).shape == (2, 3)
    assert M.distance(X[0, 0]).shape == ()
    assert M.check(M.sample(generator=gen, dtype=dtype))


def test_check_sample_large_float32(gen):
    for M in (Orthogonal(1024), Stiefel(1024, 64), Stiefel(64, 1024)):
        X = M.sample(generator=gen, dtype=torch.float32)
        ok, reason = M.check(X, explain=True)
        assert ok, reason


def test_check_perturbed_explains(gen):
    M = Stiefel(6, 4)
    X = M.sample(3, 4, generator=gen, dtype=F64)
    E = torch.zeros_like(X)
    E[1, 2, 0, 0] = 1e-3
    Y = X + E
    err = float((Y[1, 2].mT @ Y[1, 2] - torch.eye(4, dtype=F64)).abs().max())
    assert err > 1e-4
    assert not M.check(Y)
    ok, reason = M.check(Y, explain=True)
    assert not ok
    assert "orthonormality" in reason and "X[1, 2]" in reason and f"{err:.3e}" in reason
    assert f"{M.tolerance(F64):.3e}" in reason
    ok, reason = M.check(Y, atol=1e-2, explain=True)
    assert ok and "1.000e-02" in reason
    torch.testing.assert_close(M.distance(Y)[1, 2], torch.tensor(err, dtype=F64))
    assert M.distance(Y)[0, 0] < 1e-14
    Y[0, 0, 0, 0] = float("nan")
    ok, reason = M.check(Y, explain=True)
    assert not ok and "non-finite" in reason and "X[0, 0]" in reason


def test_check_wide_and_so_reasons(gen):
    M = Stiefel(3, 5)
    X = 1.01 * M.sample(generator=gen, dtype=F64)
    ok, reason = M.check(X, explain=True)
    assert not ok and "X X^H - I" in reason and f"{1.01**2 - 1:.3e}" in reason
    S = SpecialOrthogonal(4)
    R = S.sample(generator=gen, dtype=F64)
    refl = R * torch.tensor([1.0, 1, 1, -1], dtype=F64)
    assert Orthogonal(4).check(refl) and not S.check(refl)
    ok, reason = S.check(refl, explain=True)
    assert not ok and "det" in reason and "2.000e+00" in reason
    assert float(S.distance(refl)) == 2.0


def test_tolerance_scales_with_dtype_and_size():
    M = Stiefel(10, 3)
    e32, e64 = torch.finfo(torch.float32).eps, torch.finfo(F64).eps
    assert M.tolerance(torch.float32) == pytest.approx(100 * 10 * e32)
    assert M.tolerance(torch.float32) / M.tolerance(F64) == pytest.approx(e32 / e64)
    assert M.tolerance(torch.complex64) == M.tolerance(torch.float32)
    assert Stiefel(20, 3).tolerance(F64) == pytest.approx(2 * M.tolerance(F64))
    assert Stiefel(3, 10).tolerance(F64) == M.tolerance(F64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tolerance_admits_rounded_points_only(dtype, gen):
    # 100 min(n eps, sqrt(eps)) passes 1 in half precision (8.8 in bfloat16): a Linear
    # initialization (max|W^T W - I| about 0.8) passed for orthogonal; capped at 0.1
    M = Stiefel(64, 64)
    assert M.tolerance(dtype) == 0.1 and Stiefel(10, 3).tolerance(dtype) <= 0.1
    W = torch.nn.Linear(64, 64).weight.detach().to(dtype)
    assert not M.check(W)
    rounded = M.sample(generator=gen, dtype=F64).to(dtype)  # exact point, rounded
    assert M.check(rounded)
    assert float(M.distance(rounded)) <= torch.finfo(dtype).eps


# ---------------------------------------------------------------------------- 4. laws
def test_so2_angle_is_uniform(gen):
    X = SpecialOrthogonal(2).sample(3000, generator=gen, dtype=F64)
    assert torch.allclose(torch.linalg.det(X), torch.ones(3000, dtype=F64))
    angle = torch.atan2(X[:, 1, 0], X[:, 0, 0]).numpy()
    p = scipy.stats.kstest(angle, "uniform", args=(-math.pi, 2 * math.pi)).pvalue
    assert p > 1e-3


def test_so3_rotation_angle_law(gen):
    """Haar SO(3): the rotation angle has density (1 - cos t)/pi on [0, pi]."""
    X = SpecialOrthogonal(3).sample(3000, generator=gen, dtype=F64)
    tr = X.diagonal(dim1=-2, dim2=-1).sum(-1)
    theta = torch.arccos(((tr - 1) / 2).clamp(-1, 1)).numpy()
    p = scipy.stats.kstest(theta, lambda t: (t - np.sin(t)) / np.pi).pvalue
    assert p > 1e-3


def test_orthogonal_haar_determinant_is_balanced(gen):
    det = torch.linalg.det(Orthogonal(4).sample(2000, generator=gen, dtype=F64))
    assert torch.allclose(det.abs(), torch.ones_like(det))
    assert scipy.stats.binomtest(int((det > 0).sum()), 2000, 0.5).pvalue > 1e-3


@pytest.mark.parametrize("M", [Stiefel(5, 2), Stiefel(2, 5), Stiefel(5)], ids=repr)
def test_stiefel_haar_coordinate_law(M, gen):
    """A column (row, if wide) of a Haar point is uniform on S^{p-1}: (x + 1)/2 ~ Beta."""
    X = M.sample(3000, generator=gen, dtype=F64)
    p = max(M.n, M.k)
    a = (p - 1) / 2
    for x in (X[:, 0, 0], X[:, -1, -1]):
        pval = scipy.stats.kstest(((x + 1) / 2).numpy(), "beta", args=(a, a)).pvalue
        assert pval > 1e-3


def test_unitary_haar_laws(gen):
    """U(n): |X_11|^2 ~ Beta(1, n - 1); a uniformly chosen eigen-angle is U(-pi, pi)."""
    n = 4
    X = Orthogonal(n).sample(2000, generator=gen, dtype=C128)
    p = scipy.stats.kstest((X[:, 0, 0].abs() ** 2).numpy(), "beta", args=(1, n - 1)).pvalue
    assert p > 1e-3
    angles = torch.linalg.eigvals(X).angle()
    pick = torch.randint(0, n, (2000, 1), generator=gen)
    chosen = angles.gather(-1, pick).squeeze(-1).numpy()
    assert scipy.stats.kstest(chosen, "uniform", args=(-math.pi, 2 * math.pi)).pvalue > 1e-3


def _positive_angles(W: torch.Tensor) -> np.ndarray:
    angles = torch.linalg.eigvals(W).angle()
    return angles[angles > 1e-9].numpy()


def test_henaff_init_angles_uniform(gen):
    M = Orthogonal(8)
    W = M.sample(300, generator=gen, dtype=F64, init="henaff")
    assert M.check(W)
    theta = _positive_angles(W)
    assert theta.size == 300 * 4
    assert scipy.stats.kstest(theta, "uniform", args=(0, math.pi)).pvalue > 1e-3


def test_cayley_init_angles(gen):
    """Through expm the angles are tan(u/2), F(t) = 4 atan(t)/pi on [0, 1]; through the
    Cayley map (I - A)^{-1}(I + A) = cayley(2A) they are u ~ U(0, pi/2)."""
    M = SpecialOrthogonal(8)
    W = M.sample(300, generator=gen, dtype=F64, init="cayley")
    assert M.check(W)
    theta = _positive_angles(W)
    assert theta.size == 300 * 4 and theta.max() <= 1
    p = scipy.stats.kstest(theta, lambda t: 4 * np.arctan(t) / np.pi).pvalue
    assert p > 1e-3
    A = torch.stack([generator_init(8, "cayley", generator=gen, dtype=F64)
                     for _ in range(300)])
    u = _positive_angles(cayley(2 * A))
    assert u.size == 300 * 4
    assert scipy.stats.kstest(u, "uniform", args=(0, math.pi / 2)).pvalue > 1e-3


@pytest.mark.parametrize("init", ["henaff", "cayley"])
def test_generator_init_structure(init, gen):
    A = generator_init(5, init, generator=gen, dtype=F64)
    assert A.shape == (5, 5) and A.dtype == F64
    torch.testing.assert_close(A, -A.mT, atol=0, rtol=0)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = mask[2, 3] = mask[3, 2] = True
    assert (A[~mask] == 0).all() and (A[mask] != 0).all()
    s = A[[0, 2], [1, 3]]
    if init == "henaff":
        assert (s.abs() <= math.pi).all()
    else:
        assert ((s <= 0) & (s >= -1)).all()
    W = Orthogonal(5).sample(generator=torch.Generator().manual_seed(0), dtype=F64,
                             init=init)
    torch.testing.assert_close(W[..., -1, -1], torch.tensor(1.0, dtype=F64))
    A_c = generator_init(4, init, generator=torch.Generator().manual_seed(0),
                         dtype=torch.complex64)
    A_r = generator_init(4, init, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float32)
    torch.testing.assert_close(A_c, A_r.to(torch.complex64))


# ---------------------------------------------------------------------------- 5. retract
@pytest.mark.parametrize("case, method", RETRACTION_CASES)
def test_retraction_on_manifold_and_first_order(case, method, gen):
    M, dtype = CASES[case]
    B = M.sample(2, generator=gen, dtype=dtype)
    V = tangent_vector(M, B, gen)
    V = V / frob(V)[..., None, None]
    X = M.retract(B, 0.5 * V, method)
    assert X.shape == B.shape and X.dtype == dtype
    ok, reason = M.check(X, explain=True)
    assert ok, reason
    torch.testing.assert_close(M.retract(B, torch.zeros_like(V), method), B,
                               atol=1e-12, rtol=0)
    t = 1e-4
    err = frob(M.retract(B, t * V, method) - B - t * V).max()
    assert err < 10 * t**2


def test_retraction_default_and_unknown_name(gen):
    for M, default in ((Stiefel(5, 2), "cayley"), (Orthogonal(3), "expm")):
        assert M.default_retraction == M.retractions[0] == default
        B = M.sample(generator=gen, dtype=F64)
        V = M.random_tangent(B, generator=gen)
        torch.testing.assert_close(M.retract(B, V), M.retract(B, V, default))
        with pytest.raises(ValueError, match="method") as info:
            M.retract(B, V, method="nope")
        assert "'nope'" in str(info.value)
        assert all(name in str(info.value) for name in M.retractions)


def test_square_retractions_are_left_translated_maps(gen):
    M = Orthogonal(4)
    B = M.sample(generator=gen, dtype=F64)
    V = M.random_tangent(B, generator=gen)
    A = (B.mT @ V).numpy()
    np.testing.assert_allclose(M.retract(B, V, "expm").numpy(),
                               B.numpy() @ scipy.linalg.expm(A), atol=1e-12)
    I4 = np.eye(4)
    np.testing.assert_allclose(M.retract(B, V, "cayley").numpy(),
                               B.numpy() @ np.linalg.solve(I4 - A / 2, I4 + A / 2), atol=1e-12)


def test_so_retractions_keep_determinant(gen):
    M = SpecialOrthogonal(4)
    B = M.sample(8, generator=gen, dtype=F64)
    V = 2.0 * M.random_tangent(B, generator=gen)
    for method in M.retractions:
        X = M.retract(B, V, method)
        ok, reason = M.check(X, explain=True)
        assert ok, (method, reason)


@pytest.mark.parametrize("case, method", RETRACTION_CASES)
def test_retract_inverse(case, method, gen):
    M, dtype = CASES[case]
    B = M.sample(2, generator=gen, dtype=dtype)
    V = 0.3 * tangent_vector(M, B, gen) / math.sqrt(M.n * M.k)
    X = M.retract(B, V, method)
    try:
        W = M.retract_inverse(B, X, method)
    except NotImplementedError as e:
        assert method in str(e)
        return
    assert method in ("expm", "cayley", "qr", "polar", "polar_ns")
    atol = 1e-6 if method == "polar_ns" else 1e-9
    torch.testing.assert_close(W, V, atol=atol, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_transport_lands_in_new_tangent_space(case, gen):
    M, dtype = CASES[case]
    B = M.sample(generator=gen, dtype=dtype)
    V = M.random_tangent(B, generator=gen)
    B_new = M.retract(B, 0.5 * V)
    T = M.transport(B, B_new, V)
    assert tangent_residual(M, B_new, T) < 1e-12
    torch.testing.assert_close(M.transport(B, B, V), V, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- 6. errors
@pytest.mark.parametrize(
    "args, kwargs, match",
    [((0, 3), {}, r"n: expected a positive integer, got 0"),
     ((3, -1), {}, r"k: expected a positive integer, got -1"),
     ((2.5,), {}, r"n: expected a positive integer, got 2.5"),
     ((3, 2), {"special": True}, r"special: .*square.*got n=3, k=2")],
)
def test_constructor_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Stiefel(*args, **kwargs)


def test_argument_errors(gen):
    M = Stiefel(5, 3)
    B = M.sample(generator=gen, dtype=F64)
    with pytest.raises(ValueError, match=r"X: expected .*\(\.\.\., 5, 3\).*got shape \(4, 3\)"):
        M.check(torch.zeros(4, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"X: expected .*\(\.\.\., 5, 3\).*got shape \(5,\)"):
        M.project(torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match=r"V: expected .*got shape \(3, 5\)"):
        M.proj_tangent(B, torch.zeros(3, 5, dtype=F64))
    with pytest.raises(ValueError, match=r"^V: expected the dtype of B, torch.float64, got "
                                         r"torch.float32"):
        M.proj_tangent(B, torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"B: expected .*got shape \(3,\)"):
        M.retract(torch.zeros(3, dtype=F64), B)
    with pytest.raises(ValueError, match=r"X: expected a floating point .*got dtype torch.int64"):
        M.distance(torch.zeros(5, 3, dtype=torch.int64))
    S = SpecialOrthogonal(3)
    with pytest.raises(ValueError, match=r"X: expected a real tensor .*complex128"):
        S.check(torch.eye(3, dtype=C128))
    with pytest.raises(ValueError, match=r"init: .*'henaff'.*square"):
        M.sample(init="henaff")
    with pytest.raises(ValueError, match=r"init: expected one of haar, henaff, cayley.*'nope'"):
        Orthogonal(4).sample(init="nope")
    with pytest.raises(ValueError, match=r"init: expected one of henaff, cayley, got 'haar'"):
        generator_init(4, "haar")
    with pytest.raises(ValueError, match=r"n: expected a positive integer, got 0"):
        generator_init(0, "henaff")


def test_repr():
    assert repr(Stiefel(5, 3)) == "Stiefel(n=5, k=3)"
    assert repr(Stiefel(4)) == "Stiefel(n=4, k=4)"
    assert repr(Orthogonal(4)) == "Orthogonal(n=4)"
    assert repr(SpecialOrthogonal(4)) == "SpecialOrthogonal(n=4)"
    assert repr(Stiefel(4, special=True)) == "Stiefel(n=4, k=4, special=True)"


# ---------------------------------------------------------------------------- 7. chart
@pytest.mark.parametrize("case", ["square", "so", "unitary"])
def test_square_chart_and_tangent(case, gen):
    M, dtype = CASES[case]
    B = M.sample(2, generator=gen, dtype=dtype)
    X = torch.randn(B.shape, generator=gen, dtype=dtype)
    torch.testing.assert_close(M.chart(X), (X - X.mH) / 2, atol=0, rtol=0)
    V = M.tangent(B, X)
    torch.testing.assert_close(V, B @ ((X - X.mH) / 2), atol=1e-14, rtol=0)
    assert tangent_residual(M, B, V) < 1e-12


@pytest.mark.parametrize("case", ["tall", "wide", "tall_c", "wide_c"])
def test_rectangular_chart_and_tangent(case, gen):
    M, dtype = CASES[case]
    B = M.sample(generator=gen, dtype=dtype)
    X = torch.randn(B.shape, generator=gen, dtype=dtype)
    assert M.chart(X) is X
    V = M.tangent(B, X)
    torch.testing.assert_close(V, M.proj_tangent(B, X), atol=0, rtol=0)
    assert tangent_residual(M, B, V) < 1e-12


@pytest.mark.parametrize("method", ["expm", "cayley"])
@pytest.mark.parametrize(
    "manifold, dtype",
    [(Orthogonal(6), torch.float64), (SpecialOrthogonal(6), torch.float64),
     (Orthogonal(6), torch.complex128)],
)
def test_square_trivialize_is_retract_of_tangent_with_its_derivatives(manifold, dtype, method):
    # the fused group map B f(skew(X)) against the composition it replaces, both arguments
    g = torch.Generator().manual_seed(3)
    B = manifold.sample(2, generator=g, dtype=dtype)
    X = 0.5 * torch.randn(2, 6, 6, generator=g, dtype=dtype)
    fused = manifold.trivialize(B, X, method)
    composed = manifold.retract(B, manifold.tangent(B, X), method)
    torch.testing.assert_close(fused, composed, rtol=0, atol=1e-12)
    assert manifold.check(fused)
    C = torch.randn(2, 6, 6, generator=g, dtype=dtype)
    Xf, Xc = X.clone().requires_grad_(), X.clone().requires_grad_()
    (manifold.trivialize(B, Xf, method) * C).real.sum().backward()
    (manifold.retract(B, manifold.tangent(B, Xc), method) * C).real.sum().backward()
    torch.testing.assert_close(Xf.grad, Xc.grad, rtol=0, atol=1e-12)
    assert gradcheck(lambda x: manifold.trivialize(B, x, method), (Xf.detach().requires_grad_(),))
