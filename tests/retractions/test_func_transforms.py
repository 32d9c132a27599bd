"""Every way of differentiating the Lie and Stiefel maps agrees with a torch oracle.

Oracles: the same map composed of torch operations whose derivatives are right in every
composition (``torch.linalg.matrix_exp``; the Cayley transform through ``torch.linalg.inv``),
differentiated reverse over reverse (``torch.autograd.functional.hessian``). Covered: the
``torch.func`` compositions that exercise forward mode (``jacrev(jacfwd)``,
``jacfwd(jacfwd)``, ``jacfwd(jacrev)``, ``vmap(jacfwd)``), ``torch.func.vjp`` and a dual
tensor's tangent differentiated by ``backward``.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jacfwd, jacrev, vjp, vmap

from dtriv import retractions
from dtriv.retractions import (
    cayley,
    cayley_inverse,
    expm,
    householder,
    logm,
    polar_factor,
    stiefel_cayley,
    stiefel_exp,
    stiefel_exp_canonical,
    stiefel_polar,
)
from dtriv.retractions import lie as lie_module
from dtriv.retractions.lie import cayley_of_skew, expm_of_skew

N = 4


def _cay(A: torch.Tensor) -> torch.Tensor:
    Id = torch.eye(A.shape[-1], dtype=A.dtype)
    return torch.linalg.inv(Id - A / 2) @ (Id + A / 2)


def _skew(X: torch.Tensor) -> torch.Tensor:
    return X - X.mT


@pytest.fixture
def cayley_node(monkeypatch):
    """Route cayley through its autograd.Function (_Cayley) at the small test sizes."""
    monkeypatch.setattr(lie_module, "CAYLEY_SOLVE_MAX_N", 0)


# (name, map of X, oracle of X); X is a general square matrix
_LIE = {
    "expm": (expm, torch.linalg.matrix_exp),
    "expm_skew": (lambda X: expm(_skew(X)), lambda X: torch.linalg.matrix_exp(_skew(X))),
    "expm_of_skew": (expm_of_skew, lambda X: torch.linalg.matrix_exp(_skew(X))),
    "expm_of_skew_lower": (lambda X: expm_of_skew(X, lower=True),
                           lambda X: torch.linalg.matrix_exp(_skew(X.tril()))),
    "cayley": (cayley, _cay),
    "cayley_skew": (lambda X: cayley(_skew(X)), lambda X: _cay(_skew(X))),
    "cayley_of_skew": (cayley_of_skew, lambda X: _cay(_skew(X))),
    "cayley_of_skew_lower": (lambda X: cayley_of_skew(X, lower=True),
                             lambda X: _cay(_skew(X.tril()))),
}

_COMPOSITIONS = {
    "jacrev(jacfwd)": lambda f: jacrev(jacfwd(f)),
    "jacfwd(jacfwd)": lambda f: jacfwd(jacfwd(f)),
    "jacfwd(jacrev)": lambda f: jacfwd(jacrev(f)),
}


def _hessians(fn, ref, X, C, composition):
    loss = lambda X: (fn(X) * C).sum()  # noqa: E731
    ref_loss = lambda X: (ref(X) * C).sum()  # noqa: E731
    return _COMPOSITIONS[composition](loss)(X), torch.autograd.functional.hessian(ref_loss, X)


@pytest.mark.parametrize("composition", list(_COMPOSITIONS))
@pytest.mark.parametrize("name", list(_LIE))
@pytest.mark.parametrize("node", [False, True], ids=["small", "node"])
def test_lie_second_derivatives_in_forward_mode(request, randn, name, composition, node):
    """Second derivatives through forward mode equal the oracle's. Before: jacrev(jacfwd)
    raised "flat_bdims must not be None" through _Cayley/_CayleyOfSkew (they saved
    different tensors for backward and forward) and was wrong for expm of a general matrix
    (its jvp read saved constants) and for cayley at small n (torch's solve); jacfwd(jacfwd)
    was wrong through every custom Function, and expm of a skew matrix raised (no vmap rule)."""
    if node:
        request.getfixturevalue("cayley_node")
    fn, ref = _LIE[name]
    X = 0.4 * randn(N, N)
    C = randn(N, N)
    H, H_ref = _hessians(fn, ref, X, C, composition)
    torch.testing.assert_close(H, H_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["cayley_of_skew", "cayley_of_skew_lower"])
def test_cayley_of_skew_with_left_second_derivatives(randn, name):
    """jacrev(jacfwd) and jacfwd(jacfwd) through cayley_of_skew with a ``left`` factor, in
    both arguments."""
    lower = name.endswith("lower")
    X, Bm, C = 0.4 * randn(N, N), randn(3, N), randn(3, N)

    def ref(X, Bm):
        L = X.tril() if lower else X
        return Bm @ _cay(_skew(L))

    for argnums in (0, 1):
        def loss(*args):
            return (cayley_of_skew(args[0], lower=lower, left=args[1]) * C).sum()

        def ref_loss(*args):
            return (ref(*args) * C).sum()

        H_ref = torch.autograd.functional.hessian(ref_loss, (X, Bm))[argnums][argnums]
        for outer, inner in ((jacrev, jacfwd), (jacfwd, jacfwd), (jacfwd, jacrev)):
            H = outer(inner(loss, argnums=argnums), argnums=argnums)(X, Bm)
            torch.testing.assert_close(H, H_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(_LIE))
@pytest.mark.parametrize("node", [False, True], ids=["small", "node"])
def test_lie_vmap_of_jacfwd(request, randn, name, node):
    """vmap(jacfwd(f)) equals the per-sample Jacobian. Before: wrong by orders of magnitude
    for cayley at small n (torch 2.13's forward-mode solve under vmap)."""
    if node:
        request.getfixturevalue("cayley_node")
    fn, ref = _LIE[name]
    X = 0.4 * randn(3, N, N)
    J = vmap(jacfwd(fn))(X)
    J_ref = torch.stack([torch.autograd.functional.jacobian(ref, x) for x in X])
    torch.testing.assert_close(J, J_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(_LIE))
def test_lie_func_vjp(randn, name):
    """torch.func.vjp's vjp_fn (run after vjp returned) gives the gradient. Before: expm of a
    skew matrix and expm_of_skew raised "element 0 of tensors does not require grad"."""
    fn, ref = _LIE[name]
    X, C = 0.4 * randn(N, N), randn(N, N)
    (g,) = vjp(fn, X)[1](C)
    (g_ref,) = vjp(ref, X)[1](C)
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(_LIE))
@pytest.mark.parametrize("node", [False, True], ids=["small", "node"])
def test_lie_dual_tangent_backward(request, randn, name, node):
    """The tangent of a dual tensor, differentiated by backward (reverse over forward outside
    torch.func), equals the oracle's Hessian-vector product. Before: the Taylor nodes' tangent
    had no graph (their jvp read saved intermediates), and the small Cayley map's missed the
    terms of torch.linalg.solve's LU factors."""
    if node:
        request.getfixturevalue("cayley_node")
    fn, ref = _LIE[name]
    X, T, C = 0.4 * randn(N, N), randn(N, N), randn(N, N)
    Xg = X.clone().requires_grad_()
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(fn(fwAD.make_dual(Xg, T))).tangent
        (hv,) = torch.autograd.grad((tangent * C).sum(), Xg)
    hv_ref = torch.autograd.functional.hvp(lambda X: (ref(X) * C).sum(), X, T)[1]
    torch.testing.assert_close(hv, hv_ref, atol=1e-10, rtol=0)


def test_cayley_inverse_under_vmap(randn):
    """cayley_inverse runs under vmap (its value checks are skipped there) and its
    derivatives compose. Before: vmap raised on the data-dependent check, and
    jacrev(jacfwd) was wrong (torch's solve)."""
    Q = torch.linalg.matrix_exp(_skew(0.4 * randn(3, N, N)))

    def ref(Q):
        Id = torch.eye(N, dtype=Q.dtype)
        return 2 * (Q - Id) @ torch.linalg.inv(Q + Id)

    torch.testing.assert_close(vmap(cayley_inverse)(Q), cayley_inverse(Q))
    C = randn(N, N)
    H = jacrev(jacfwd(lambda Q: (cayley_inverse(Q) * C).sum()))(Q[0])
    H_ref = torch.autograd.functional.hessian(lambda Q: (ref(Q) * C).sum(), Q[0])
    torch.testing.assert_close(H, H_ref, atol=1e-10, rtol=0)


def _stiefel_point(randn, n=5, k=3):
    B = torch.linalg.qr(randn(n, k))[0]
    V = 0.3 * randn(n, k)
    return B, V - B @ ((B.mT @ V + V.mT @ B) / 2)


def _dense_cayley(B, V):
    """The dense Cayley transform of Wen & Yin's Omega = PV B^T - B (PV)^T (for the oracle)."""
    PV = V - B @ (B.mT @ V) / 2
    return _cay(PV @ B.mT - B @ PV.mT) @ B


@pytest.mark.parametrize("argnum", [0, 1], ids=["dB", "dV"])
def test_stiefel_cayley_forward_mode(randn, argnum):
    """stiefel_cayley: vmap(jacfwd) and jacrev(jacfwd) equal the dense oracle's derivatives.
    Before: vmap(jacfwd) was off by 1e5 and jacrev(jacfwd) by 0.2 (torch's solve)."""
    B, V = _stiefel_point(randn)
    C = randn(*B.shape)
    J = vmap(jacfwd(stiefel_cayley, argnums=argnum))(torch.stack([B, B]), torch.stack([V, V]))
    J_ref = torch.autograd.functional.jacobian(_dense_cayley, (B, V))[argnum]
    torch.testing.assert_close(J, torch.stack([J_ref, J_ref]), atol=1e-10, rtol=0)
    H = jacrev(jacfwd(lambda B, V: (stiefel_cayley(B, V) * C).sum(), argnums=argnum),
               argnums=argnum)(B, V)
    H_ref = torch.autograd.functional.hessian(
        lambda B, V: (_dense_cayley(B, V) * C).sum(), (B, V))[argnum][argnum]
    torch.testing.assert_close(H, H_ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("fn", [stiefel_exp, stiefel_exp_canonical])
def test_stiefel_geodesics_reverse_over_forward(randn, fn):
    """The Stiefel geodesics (expm of a general 2k x 2k block): jacrev(jacfwd) equals the
    Hessian by reverse over reverse. Before: wrong (the exponential's jvp read saved
    constants)."""
    B, V = _stiefel_point(randn)
    C = randn(*B.shape)
    loss = lambda V: (fn(B, V) * C).sum()  # noqa: E731
    H_ref = torch.autograd.functional.hessian(loss, V)
    torch.testing.assert_close(jacrev(jacfwd(loss))(V), H_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(jacfwd(jacfwd(loss))(V), H_ref, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- logm


def _log_ref(Q: torch.Tensor) -> torch.Tensor:
    """The principal logarithm through torch.linalg.eig (distinct eigenvalues; any order of
    derivatives by autograd)."""
    w, V = torch.linalg.eig(Q)
    L = V @ torch.diag_embed(torch.log(w)) @ torch.linalg.inv(V)
    return L if Q.is_complex() else L.real


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_logm_second_derivatives(randn, dtype):
    """logm's double backward is the Hessian of the principal logarithm (eig-based oracle,
    reverse over reverse), in eager autograd and under jacrev(jacrev). Before: the backward
    was once_differentiable in eager code (gradgradcheck's analytical side 0) and every
    torch.func transform raised (no setup_context)."""
    Q = torch.linalg.matrix_exp(0.4 * (lambda X: X - X.mH)(randn(N, N, dtype=dtype)))
    C = randn(N, N, dtype=dtype)

    def loss(Q):
        return (logm(Q) * C.conj()).sum().real

    def ref_loss(Q):
        return (_log_ref(Q) * C.conj()).sum().real

    T = randn(N, N, dtype=dtype)
    hv_ref = torch.autograd.functional.hvp(ref_loss, Q, T)[1]
    Qg = Q.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(Qg), Qg, create_graph=True)
    (hv,) = torch.autograd.grad((g * T.conj()).sum().real, Qg)
    torch.testing.assert_close(hv, hv_ref, atol=1e-9, rtol=0)
    if not dtype.is_complex:
        H = jacrev(jacrev(loss))(Q)
        H_ref = torch.autograd.functional.hessian(ref_loss, Q)
        torch.testing.assert_close(H, H_ref, atol=1e-9, rtol=0)


def test_logm_double_backward_along_the_group_matches_finite_differences(randn):
    """Along a direction tangent to SO(n) (where logm's backward is the exact gradient of the
    logarithm) the double backward equals central differences of the backward."""
    X = randn(N, N)
    Q = torch.linalg.matrix_exp(0.4 * (X - X.mT))
    Om = randn(N, N)
    Om = Om - Om.mT
    C = randn(N, N)

    def grad_at(Q):
        Qg = Q.clone().requires_grad_()
        return torch.autograd.grad((logm(Qg) * C).sum(), Qg)[0]

    h = 1e-5
    fd = (grad_at(Q @ torch.linalg.matrix_exp(h * Om))
          - grad_at(Q @ torch.linalg.matrix_exp(-h * Om))) / (2 * h)
    E = Q @ Om  # the derivative of Q exp(t Om) at t = 0
    Qg = Q.clone().requires_grad_()
    (g,) = torch.autograd.grad((logm(Qg) * C).sum(), Qg, create_graph=True)
    W = randn(N, N)
    (hw,) = torch.autograd.grad((g * W).sum(), Qg)  # H W; <H W, E> = <W, H E> = <W, fd>
    torch.testing.assert_close((hw * E).sum(), (fd * W).sum(), atol=1e-8, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_logm_forward_mode(randn, dtype):
    """jvp, jacfwd and vmap of jvp equal the eig-based reference's derivatives; a dual
    tensor's tangent, differentiated by backward, gives the reference's Hessian-vector
    product. Before: no forward mode at all."""
    X = randn(N, N, dtype=dtype)
    Q = torch.linalg.matrix_exp(0.5 * (X - X.mH))
    E, C = randn(N, N, dtype=dtype), randn(N, N, dtype=dtype)
    tangent = torch.func.jvp(logm, (Q,), (E,))[1]
    ref = torch.autograd.functional.jvp(_log_ref, Q, E)[1]
    torch.testing.assert_close(tangent, ref, atol=1e-12, rtol=0)
    Qs, Es = torch.stack([Q, Q.mH]), torch.stack([E, C])
    batched = vmap(lambda q, e: torch.func.jvp(logm, (q,), (e,))[1])(Qs, Es)
    torch.testing.assert_close(batched, torch.stack(
        [torch.autograd.functional.jvp(_log_ref, q, e)[1] for q, e in zip(Qs, Es)]),
        atol=1e-12, rtol=0)
    if not dtype.is_complex:
        torch.testing.assert_close(jacfwd(logm)(Q),
                                   torch.autograd.functional.jacobian(_log_ref, Q),
                                   atol=1e-12, rtol=0)
    Qg = Q.clone().requires_grad_()
    with fwAD.dual_level():
        t = fwAD.unpack_dual(logm(fwAD.make_dual(Qg, E))).tangent
        (hv,) = torch.autograd.grad((t * C.conj()).sum().real, Qg)
    torch.testing.assert_close(t.detach(), ref, atol=1e-12, rtol=0)
    hv_ref = torch.autograd.functional.hvp(
        lambda Q: (_log_ref(Q) * C.conj()).sum().real, Q, E)[1]
    torch.testing.assert_close(hv, hv_ref, atol=1e-9, rtol=0)


def test_logm_compositions_that_raise(randn):
    """Second derivatives through forward mode under torch.func raise a NotImplementedError
    naming the way that works (jacrev of jacrev), rather than returning wrong numbers."""
    X = randn(N, N)
    Q = torch.linalg.matrix_exp(0.5 * (X - X.mT))
    C = randn(N, N)
    loss = lambda Q: (logm(Q) * C).sum()  # noqa: E731
    for composition in (jacrev(jacfwd(loss)), jacfwd(jacfwd(loss)), torch.func.hessian(loss)):
        with pytest.raises(NotImplementedError, match=r"logm: .*jacrev\(jacrev\(f\)\)"):
            composition(Q)
    H = jacrev(jacrev(loss))(Q)
    torch.testing.assert_close(
        H, torch.autograd.functional.hessian(lambda Q: (_log_ref(Q) * C).sum(), Q),
        atol=1e-9, rtol=0)


def test_logm_under_vmap_grad_jacrev(randn):
    """logm under vmap (its value checks skipped), torch.func.grad and jacrev equal the loop
    over the batch and eager autograd. Before: every transform raised (old-style Function)."""
    X = randn(3, N, N)
    Q = torch.linalg.matrix_exp(0.4 * (X - X.mT))
    C = randn(N, N)
    torch.testing.assert_close(vmap(logm)(Q), torch.stack([logm(q) for q in Q]))
    loss = lambda Q: (logm(Q) * C).sum()  # noqa: E731
    g = torch.func.grad(loss)(Q[0])
    g_ref = torch.autograd.functional.jacobian(lambda Q: (_log_ref(Q) * C).sum(), Q[0])
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0)
    J = jacrev(logm)(Q[0])
    torch.testing.assert_close(J, torch.autograd.functional.jacobian(_log_ref, Q[0]),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(vmap(torch.func.grad(loss))(Q),
                               torch.stack([torch.func.grad(loss)(q) for q in Q]))


# --------------------------------------------------------------------------- nested forward mode


def _householder_ref(X: torch.Tensor) -> torch.Tensor:
    """householder through torch.linalg.householder_product (differentiated in reverse mode
    only: its forward-mode derivative is wrong at second order in torch 2.13)."""
    A = X.tril(-1)
    Q = torch.linalg.householder_product(A, 2.0 / (1.0 + (A * A).sum(dim=-2)))
    return Q * torch.where(X.detach().diagonal() < 0, -1.0, 1.0).to(Q.dtype)


def _polar_ref(X: torch.Tensor) -> torch.Tensor:
    U, _, Wh = torch.linalg.svd(X, full_matrices=False)
    return U @ Wh


@pytest.mark.parametrize("name", ["householder", "polar_factor", "stiefel_polar"])
def test_householder_and_polar_under_nested_forward_mode(randn, name):
    """jacfwd(jacfwd) equals the Hessian of the torch composition (reverse over reverse), and
    the values under nested forward mode equal the eager fast path. Before: off by 0.85
    (householder) and 0.69 (polar): the custom jvp was not differentiated at the outer
    level."""
    X = randn(5, 3)
    B, V = _stiefel_point(randn)
    fn, ref, arg = {
        "householder": (householder, _householder_ref, X),
        "polar_factor": (polar_factor, _polar_ref, X),
        "stiefel_polar": (lambda V: stiefel_polar(B, V), lambda V: _polar_ref(B + V), V),
    }[name]
    C = randn(5, 3)
    H_ref = torch.autograd.functional.hessian(lambda Y: (ref(Y) * C).sum(), arg)
    for outer, inner in ((jacfwd, jacfwd), (jacrev, jacfwd), (jacfwd, jacrev)):
        H = outer(inner(lambda Y: (fn(Y) * C).sum()))(arg)
        torch.testing.assert_close(H, H_ref, atol=1e-10, rtol=0)
    # the value under nested forward mode (the reference path) is the eager one
    torch.testing.assert_close(
        torch.func.jvp(lambda Y: torch.func.jvp(fn, (Y,), (Y,))[0], (arg,), (arg,))[0],
        fn(arg), atol=1e-14, rtol=0)


def test_householder_under_a_dual_tensor(randn):
    """The forward mode of torch.autograd.forward_ad (not torch.func): the tangent equals the
    reference's Jacobian-vector product, and differentiated by backward, its Hessian-vector
    product. Before: "Nested forward mode AD is not supported" (the jvp ran torch.func.jvp
    inside a dual level)."""
    X, T, C = randn(5, 3), randn(5, 3), randn(5, 3)
    Xg = X.clone().requires_grad_()
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(householder(fwAD.make_dual(Xg, T))).tangent
        (hv,) = torch.autograd.grad((tangent * C).sum(), Xg)
    jv_ref = torch.autograd.functional.jvp(_householder_ref, X, T)[1]
    torch.testing.assert_close(tangent.detach(), jv_ref, atol=1e-10, rtol=0)
    hv_ref = torch.autograd.functional.hvp(lambda X: (_householder_ref(X) * C).sum(), X, T)[1]
    torch.testing.assert_close(hv, hv_ref, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(householder, (Xg,), check_forward_ad=True)


# --------------------------------------------------------------------------- vmap of host checks


def _sphere_points(randn, b=3, n=6):
    x = randn(b, n)
    x = x / x.norm(dim=-1, keepdim=True)
    y = x + 0.3 * randn(b, n)
    return x, y / y.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("name", ["stiefel_qr", "stiefel_qr_inverse", "stiefel_polar_inverse",
                                  "sphere_log", "sphere_projective_inverse",
                                  "stiefel_polar_newton_schulz"])
def test_vmap_of_maps_with_value_checks(randn, name):
    """vmap equals the loop over the batch (the value checks are skipped under transforms,
    stiefel_qr takes Householder QR, and the Newton--Schulz polar map, whose stop reads a
    residual, its limit, the SVD polar factor). Before: vmap raised on the data-dependent
    reads."""
    if name.startswith("sphere"):
        x, y = _sphere_points(randn)
    else:
        pts = [_stiefel_point(randn) for _ in range(3)]
        x = torch.stack([B for B, _ in pts])
        V = torch.stack([V for _, V in pts])
        y = V if not name.endswith("inverse") else getattr(retractions, name[:-8])(x, V)
    fn = getattr(retractions, name)
    out = vmap(fn)(x, y)
    torch.testing.assert_close(out, torch.stack([fn(a, b) for a, b in zip(x, y)]),
                               atol=1e-12, rtol=0)


# ------------------------------------------------------------- sphere and spectral clip
def _sphere_refs():
    """(map of (x, V), reference composition of torch operations) per sphere node."""
    from dtriv.retractions import sphere as sph

    def exp_ref(x, V, r):
        t = torch.sqrt((V * V).sum(-1, keepdim=True)) / r
        return torch.cos(t) * x + (r * torch.sin(t) / (t * r)) * V

    def proj_ref(x, V, r):
        w = x + V
        return r * w / torch.sqrt((w * w).sum(-1, keepdim=True))

    def tan_ref(x, X, r):
        return X - x * (x * X).sum(-1, keepdim=True) / r**2

    return {
        "exp": (sph.exp_radius, exp_ref),
        "projective": (sph.projective_radius, proj_ref),
        "tangent": (sph.tangent_radius, tan_ref),
        "trivialize_exp": (sph.trivialize_exp_radius,
                           lambda x, X, r: exp_ref(x, tan_ref(x, X, r), r)),
        "trivialize_projective": (sph.trivialize_projective_radius,
                                  lambda x, X, r: proj_ref(x, tan_ref(x, X, r), r)),
    }


_SPHERE = _sphere_refs()


def _sphere_inputs(randn, shape, radius, scale=0.3):
    x = randn(*shape)
    x = radius * x / x.norm(dim=-1, keepdim=True)
    V = scale * randn(*shape)
    return x, V - x * (x * V).sum(-1, keepdim=True) / radius**2  # tangent (for exp's inputs)


@pytest.mark.parametrize("radius", [1.0, 2.0])
@pytest.mark.parametrize("shape", [(5,), (3, 5)], ids=["vector", "batch"])
@pytest.mark.parametrize("name", list(_SPHERE))
def test_sphere_maps_forward_mode(randn, name, shape, radius):
    # jvp (both arguments, and each alone) and dual numbers against the same derivative of a
    # composition of torch operations; the nodes had no jvp (NotImplementedError)
    fn, ref = _SPHERE[name]
    x, V = _sphere_inputs(randn, shape, radius)
    dx, dV = randn(*shape), randn(*shape)
    for args, tangents in [((x, V), (dx, dV)), ((x,), (dx,)), ((V,), (dV,))]:
        if len(args) == 2:
            f, g = (lambda a, b: fn(a, b, radius)), (lambda a, b: ref(a, b, radius))
        elif args[0] is x:
            f, g = (lambda a: fn(a, V, radius)), (lambda a: ref(a, V, radius))
        else:
            f, g = (lambda b: fn(x, b, radius)), (lambda b: ref(x, b, radius))
        value, tangent = torch.func.jvp(f, args, tangents)
        torch.testing.assert_close(tangent, torch.func.jvp(g, args, tangents)[1])
        torch.testing.assert_close(value, g(*args))
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(x, dx), fwAD.make_dual(V, dV), radius)
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, torch.func.jvp(
        lambda a, b: ref(a, b, radius), (x, V), (dx, dV))[1])


@pytest.mark.parametrize("scale", [0.3, 1e-5], ids=["away", "near0"])
@pytest.mark.parametrize("composition", list(_COMPOSITIONS))
@pytest.mark.parametrize("name", list(_SPHERE))
def test_sphere_maps_second_derivatives_in_forward_mode(randn, name, composition, scale):
    # near0: the exponential's power-series regime (the reference's sin(t)/t is exact there
    # to rounding in float64 at t = 1e-5)
    fn, ref = _SPHERE[name]
    x, V = _sphere_inputs(randn, (2, 4), 1.0, scale)
    C = randn(2, 4)
    got, want = _hessians(lambda X: fn(x, X, 1.0), lambda X: ref(x, X, 1.0), V, C, composition)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def _clip_ref(W, upper, lower):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U * S.clamp(min=lower, max=upper).unsqueeze(-2).to(U.dtype)) @ Vh


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (2, 4, 4)])
def test_clip_singular_values_forward_mode(randn, shape, dtype):
    # distinct singular values on both sides of the bounds; the node had no jvp
    from dtriv.retractions import clip_singular_values

    W, dW = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    bounds = (1.5, 0.5)
    _, tangent = torch.func.jvp(lambda A: clip_singular_values(A, *bounds), (W,), (dW,))
    _, want = torch.func.jvp(lambda A: _clip_ref(A, *bounds), (W,), (dW,))
    torch.testing.assert_close(tangent, want)
    if dtype == torch.float64:
        C = randn(*shape)
        for composition in _COMPOSITIONS:
            got, ref = _hessians(lambda A: clip_singular_values(A, *bounds),
                                 lambda A: _clip_ref(A, *bounds), W, C, composition)
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)


# ------------------------------------------- value checks under transforms that read values
def _invalid_inputs(randn, name):
    """(base, invalid point) for each map that checks a value: an antipode, an eigenvalue
    -1, a point outside the image of the retraction at the base."""
    if name.startswith("sphere"):
        x = randn(4)
        x = x / x.norm()
        return x, -x
    if name in ("cayley_inverse", "logm"):
        Q = torch.linalg.qr(randn(N, N))[0]
        D = torch.diag(torch.tensor([-1.0, -1.0] + [1.0] * (N - 2), dtype=Q.dtype))
        return None, Q @ D @ Q.mT  # eigenvalue -1 (twice: det = +1)
    B = torch.linalg.qr(randn(5, 3))[0]
    return B, -B  # B^H Q = -I: diag(R) < 0, S negative definite


_CHECKED = ["sphere_log", "sphere_projective_inverse", "cayley_inverse", "logm",
            "stiefel_qr_inverse", "stiefel_polar_inverse"]


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp"])
@pytest.mark.parametrize("name", _CHECKED)
def test_value_checks_raise_under_transforms_that_read_values(randn, name, transform):
    """Under grad, jacrev (whose forward is not vmapped) and jvp a value can be read on the
    host: the checks raise as in eager code. Only vmap (also jacfwd, hessian) skips them.
    Before: every torch.func transform skipped them, so torch.func.grad of sphere_log at an
    antipode returned NaN silently."""
    base, bad = _invalid_inputs(randn, name)
    fn = getattr(retractions, name)

    def f(y):
        return fn(y) if base is None else fn(base, y)

    with pytest.raises(ValueError):
        f(bad)  # eager
    with pytest.raises(ValueError):
        if transform == "grad":
            torch.func.grad(lambda y: f(y).sum())(bad)
        elif transform == "jacrev":
            jacrev(f)(bad)
        else:
            torch.func.jvp(f, (bad,), (torch.ones_like(bad),))


@pytest.mark.parametrize("name", _CHECKED)
def test_value_checks_skipped_under_vmap(randn, name):
    """Under vmap no value can be read: the checks are skipped (documented) and the result
    is not finite or meaningless, with no error."""
    base, bad = _invalid_inputs(randn, name)
    fn = getattr(retractions, name)
    if base is None:
        vmap(fn)(bad[None])
    else:
        vmap(fn)(base[None], bad[None])
