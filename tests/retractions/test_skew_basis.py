"""The Cayley retraction and the two geodesics of the Stiefel manifold in an orthonormal
basis (dtriv.retractions._skew_basis): the dense n x n formulas as oracles, for values, first
and second derivatives, in both forms; accuracy where the Gram forms lost it."""

from __future__ import annotations

import pytest
import torch

from dtriv.parametrize import twins
from dtriv.retractions import _skew_basis
from dtriv.retractions.stiefel import stiefel_cayley, stiefel_exp, stiefel_exp_canonical

SHAPES = [(7, 3), (5, 3), (4, 4), (6, 1)]  # tall, n < 2k, square, one column
DTYPES = [torch.float64, torch.complex128]
MAPS = ["cayley", "exp_canonical", "exp"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _point(n, k, dtype, seed=0):
    return torch.linalg.qr(torch.randn(n, k, dtype=dtype, generator=_gen(seed)))[0]


def _tangent(B, scale=1.0, seed=1):
    Z = scale * torch.randn(*B.shape, dtype=B.dtype, generator=_gen(seed))
    return Z - B @ ((B.mH @ Z + Z.mH @ B) / 2)


def _dense(name, B, V):
    """f(Ω) B with Ω formed as an n x n matrix of B and V (any B: the maps' identities)."""
    n = B.shape[-2]
    I = torch.eye(n, dtype=B.dtype)
    if name == "cayley":
        PV = V - B @ (B.mH @ V) / 2
        Om = PV @ B.mH - B @ PV.mH
        return torch.linalg.solve(I - Om / 2, (I + Om / 2) @ B)
    A = B.mH @ V
    N = V - B @ A
    if name == "exp_canonical":
        return torch.linalg.matrix_exp(B @ A @ B.mH + N @ B.mH - B @ N.mH) @ B
    # the embedded geodesic: Edelman, Arias & Smith's [B, V] exp([[A, -S], [I, A]]) [exp(-A); 0]
    # for B on the manifold; exp(2 B A B^H + N B^H - B N^H) B exp(-A) for any B
    rotated = torch.linalg.matrix_exp(2 * B @ A @ B.mH + N @ B.mH - B @ N.mH) @ B
    return rotated @ torch.linalg.matrix_exp(-A)


MAP = {"cayley": stiefel_cayley, "exp_canonical": stiefel_exp_canonical, "exp": stiefel_exp}


@pytest.fixture(params=["gram", "basis"])
def form(request, monkeypatch):
    """Each map in its Gram form (small tangents) and in the basis form (forced)."""
    if request.param == "basis":
        monkeypatch.setattr(_skew_basis, "GRAM_MAX_NORM", 0.0)
    return request.param


def _took_basis(name, B, V) -> bool:
    fn = MAP[name](B, V).grad_fn
    if name == "exp":  # (the right factor exp(-A): a product)
        fn = fn.next_functions[0][0]
    return fn.name().startswith("_SkewMapInBasis")


@pytest.mark.parametrize("name", MAPS)
def test_forms_are_chosen_by_the_norm(name, form):
    B = _point(7, 3, torch.float64)
    V = _tangent(B, 0.3).requires_grad_()
    assert _took_basis(name, B, V) == (form == "basis")
    assert _took_basis(name, B, _tangent(B, 100.0).requires_grad_())  # |N|_2 > 10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MAPS)
def test_values_and_gradients_equal_the_dense_formula(name, shape, dtype, form):
    """Values and the gradients in B and V equal those of the dense formula (float64 autograd),
    the base off the manifold included (both identities hold for any B)."""
    B = _point(*shape, dtype, seed=3)
    V = _tangent(B, 1.5, seed=4)
    for base in (B, B + 0.05 * torch.randn(*shape, dtype=dtype, generator=_gen(5))):
        b, v = base.clone().requires_grad_(), V.clone().requires_grad_()
        Y = MAP[name](b, v)
        Yd = _dense(name, b, v)
        torch.testing.assert_close(Y, Yd, atol=1e-12, rtol=0)
        G = torch.randn(*shape, dtype=dtype, generator=_gen(6))
        got = torch.autograd.grad(Y, (b, v), G)
        want = torch.autograd.grad(Yd, (b, v), G)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-11, rtol=0)


@pytest.mark.parametrize("name", MAPS)
def test_gradcheck_where_the_basis_loses_rank(name, form):
    """V = 0, a vertical V = B A and n < 2k: U = [X, B] is rank deficient, where the QR's own
    derivative is singular; the map is smooth and its gradient exact."""
    B = _point(6, 2, torch.float64, seed=7)
    A = torch.randn(2, 2, dtype=torch.float64, generator=_gen(8))
    Bs = _point(3, 2, torch.float64, seed=9)
    for b, v in ((B, torch.zeros_like(B)), (B, B @ (A - A.T)), (Bs, _tangent(Bs, 2.0))):
        args = (b.clone().requires_grad_(), v.clone().requires_grad_())
        assert torch.autograd.gradcheck(MAP[name], args)
        assert torch.autograd.gradgradcheck(MAP[name], args)


@pytest.mark.parametrize("name", MAPS)
def test_second_derivatives_equal_the_dense_formula(name, form):
    B = _point(7, 3, torch.float64, seed=10)
    V = _tangent(B, 1.2, seed=11)
    C = torch.randn(7, 3, dtype=torch.float64, generator=_gen(12))
    H = torch.autograd.functional.hessian(lambda v: (MAP[name](B, v) * C).sum(), V)
    H_ref = torch.autograd.functional.hessian(lambda v: (_dense(name, B, v) * C).sum(), V)
    torch.testing.assert_close(H, H_ref, atol=1e-10, rtol=0)


def _anisotropic(n, k, sig, seed=13):
    """(B, V) in float64: V = B A + N, N with singular values ``sig``, |A| about sig[0] / 4."""
    B = _point(n, k, torch.float64, seed)
    Z = torch.randn(k, k, dtype=torch.float64, generator=_gen(seed + 1))
    U = torch.randn(n, k, dtype=torch.float64, generator=_gen(seed + 2))
    U = torch.linalg.qr(U - B @ (B.T @ U))[0]
    W = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=_gen(seed + 3)))[0]
    N = U @ torch.diag(torch.tensor(sig, dtype=torch.float64)) @ W.T
    return B, B @ (Z - Z.T) * (sig[0] / 4) + N


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("sig, bound", [((100.0, 1, 1, 1), 1e-5), ((1e3, 1, 0.1, 0), 1e-4)])
def test_float32_accuracy_of_large_anisotropic_tangents(name, sig, bound):
    """float32 against the float64 dense formula, where the Gram forms erred by 3e-5 to 7e-5
    (singular values 100, 1, 1, 1) and 2e-3 to 4e-3 (1000, 1, 0.1, 0); the dense float32
    formulas err by 3e-6 to 2e-5 and 2e-5 to 1.4e-4 there."""
    B, V = _anisotropic(64, 4, sig)
    ref = _dense(name, B, V)
    Y = MAP[name](B.float(), V.float())
    assert (Y.double() - ref).abs().max() < bound
    Bq, Vq = B.float().requires_grad_(), V.float().requires_grad_()
    G = torch.randn(64, 4, dtype=torch.float64, generator=_gen(14))
    g = torch.autograd.grad(MAP[name](Bq, Vq), Vq, G.float())[0]
    Vd = V.clone().requires_grad_()
    g_ref = torch.autograd.grad(_dense(name, B, Vd), Vd, G)[0]
    assert (g.double() - g_ref).abs().max() < bound * g_ref.abs().max()


@pytest.mark.parametrize("name", MAPS)
def test_a_batch_with_one_large_tangent(name):
    """The whole batch takes the basis when one matrix needs it; each result equals the
    matrix's own."""
    B = torch.stack([_point(8, 3, torch.float64, seed=s) for s in range(3)])
    V = torch.stack([_tangent(B[i], scale, seed=20 + i)
                     for i, scale in enumerate((0.1, 50.0, 1.0))])
    Y = MAP[name](B, V)
    assert Y.requires_grad is False
    for i in range(3):
        torch.testing.assert_close(Y[i], _dense(name, B[i], V[i]), atol=1e-11, rtol=0)


@pytest.mark.parametrize("omap", ["matrix_exp", "cayley"])
def test_tall_twin_with_a_large_parameter_matches_torch(omap):
    """The tall orthogonal twin (use_trivialization=False, float32) at a parameter whose rows
    below the top square have singular values (100, 1, 1, 1), against torch's n x n
    parametrization in float64: closer than torch's own float32 result (the Gram forms erred
    by 9e-5 and 8e-5, torch by 6e-5 and 2e-6; now 6e-6 and 1e-6)."""
    from torch.nn.utils.parametrizations import orthogonal

    n, k = 48, 4
    g = _gen(15)
    U = torch.linalg.qr(torch.randn(n - k, k, dtype=torch.float64, generator=g))[0]
    W = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=g))[0]
    sig = torch.tensor([100.0, 1, 1, 1], dtype=torch.float64)
    X = torch.cat([0.1 * torch.randn(k, k, dtype=torch.float64, generator=g),
                   U @ torch.diag(sig) @ W.T])
    weights = {}
    for key, module, make, dtype in (
            ("ref", torch.nn.Linear(k, n).double(), orthogonal, torch.float64),
            ("torch32", torch.nn.Linear(k, n), orthogonal, torch.float32),
            ("dtriv", torch.nn.Linear(k, n), twins.orthogonal, torch.float32)):
        make(module, orthogonal_map=omap, use_trivialization=False)
        module.parametrizations.weight.original = torch.nn.Parameter(X.to(dtype))
        weights[key] = module.weight.detach().double()
    err = (weights["dtriv"] - weights["ref"]).abs().max()
    assert err < 1e-5
    assert err < (weights["torch32"] - weights["ref"]).abs().max()


@pytest.mark.parametrize("name", MAPS)
def test_basis_form_under_activation_checkpointing(name):
    """The basis node reads its saved tensors once per backward (non-reentrant checkpointing
    allows one unpack; a second read raised CheckpointError); gradients equal the dense
    formula's."""
    from torch.utils.checkpoint import checkpoint

    B = _point(9, 3, torch.float64, seed=30)
    V = _tangent(B, 40.0, seed=31).requires_grad_()
    assert _took_basis(name, B, V)
    C = torch.randn(9, 3, dtype=torch.float64, generator=_gen(32))
    (g,) = torch.autograd.grad((checkpoint(MAP[name], B, V, use_reentrant=False) * C).sum(), V)
    (g_ref,) = torch.autograd.grad((_dense(name, B, V) * C).sum(), V)
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", MAPS)
def test_fake_tensors_and_a_non_finite_neighbour(name):
    """Under FakeTensorMode no norm can be read: the Gram form (it raised). In a batch, a
    matrix with NaN entries leaves the others their own test (its NaN norm made the batch's
    maximum NaN, and the large tangent beside it took the Gram form: 1.2e-2 in float32)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        B = torch.empty(9, 3)
        assert MAP[name](B, torch.empty(9, 3)).shape == (9, 3)
    B, V = _anisotropic(64, 4, (1e3, 1, 0.1, 0))
    batch_B = torch.stack([B, B]).float()
    batch_V = torch.stack([V, torch.full_like(V, float("nan"))]).float()
    Y = MAP[name](batch_B, batch_V)
    assert (Y[0].double() - _dense(name, B, V)).abs().max() < 1e-4
    assert Y[1].isnan().all()
