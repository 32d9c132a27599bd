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

from dtriv.retractions import (
    cayley,
    cayley_inverse,
    expm,
    stiefel_cayley,
    stiefel_exp,
    stiefel_exp_canonical,
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
    torch.func), equals the oracle's Hessian-vector product."""
    if node:
        request.getfixturevalue("cayley_node")
    if name.startswith("cayley") and not node:
        pytest.skip("torch.linalg.solve's forward mode treats its LU factors as constants")
    if name in ("expm_skew", "expm_of_skew", "expm_of_skew_lower"):
        pytest.skip("the Taylor nodes' jvp reads saved intermediates outside torch.func")
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
