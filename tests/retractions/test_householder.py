"""Householder map and its inverse against torch.nn.utils.parametrizations.orthogonal."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils import parametrizations

from dtriv.retractions import householder, householder_inverse

SHAPES = [(5, 5), (7, 3), (3, 7), (6, 1)]  # square, tall, wide (torch transposes), column


def torch_householder_layer(out_features, in_features, dtype=torch.float64):
    layer = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
    parametrizations.orthogonal(
        layer, orthogonal_map="householder", use_trivialization=False
    )
    return layer


def tall(X):
    return X if X.shape[-2] >= X.shape[-1] else X.mT


def random_signs(randn, X):
    """X with a diagonal of +-1, the form householder_inverse (and torch) produce."""
    X = X.clone()
    signs = torch.where(randn(*X.diagonal(dim1=-2, dim2=-1).shape) < 0, -1.0, 1.0)
    X.diagonal(dim1=-2, dim2=-1).copy_(signs)
    return X


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_is_torch_householder_bit_for_bit(randn, shape, dtype):
    layer = torch_householder_layer(*shape, dtype=dtype)
    X = random_signs(randn, randn(*shape)).to(dtype)
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(X)
    Q = householder(tall(X))
    assert torch.equal(tall(layer.weight), Q)


@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_is_torch_right_inverse_bit_for_bit(random_stiefel, shape):
    layer = torch_householder_layer(*shape)
    n, k = max(shape), min(shape)
    Q = random_stiefel(n, k)
    W = Q if shape[0] >= shape[1] else Q.mT
    with torch.no_grad():
        layer.weight = W
    original = layer.parametrizations.weight.original
    assert torch.equal(tall(original), householder_inverse(Q))
    assert torch.equal(tall(layer.weight), householder(householder_inverse(Q)))


@pytest.mark.parametrize("shape", [(4, 5, 5), (2, 3, 8, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_tall_and_square_batched(random_stiefel, shape, dtype):
    Q = random_stiefel(*shape).to(dtype)
    X = householder_inverse(Q)
    tol = 1e-14 if dtype == torch.float64 else 2e-6
    assert (householder(X) - Q).abs().max().item() < tol * Q.shape[-2]


def test_round_trip_with_skipped_reflections():
    """Columns already +-e_j make LAPACK skip the reflection (tau = 0): the sign fix-up."""
    P = torch.eye(5, dtype=torch.float64)[:, [0, 2, 1, 3, 4]]
    for D in (torch.eye(5, dtype=torch.float64), torch.diag(torch.tensor([1.0, -1, 1, -1, -1]))):
        Q = (P @ D.to(torch.float64))[:, :4]
        _, tau = torch.geqrf(Q)
        assert (tau == 0).any()
        assert torch.equal(householder(householder_inverse(Q)), Q)
        assert torch.equal(householder(householder_inverse(D)), D)


def test_minus_identity_maps_to_identity():
    """torch's use_trivialization=True initialises the parameter to -I: it maps to I.

    With no reflector tails every tau is 2, so each H_j flips e_j; a zero diagonal counts as
    +1 and gives -I, the diagonal -1 flips the signs back."""
    Id = torch.eye(4, 3, dtype=torch.float64)
    assert torch.equal(householder(-Id), Id)
    assert torch.equal(householder(torch.zeros(4, 3, dtype=torch.float64)), -Id)


def test_output_orthonormal_for_any_input(randn):
    X = 3 * randn(3, 7, 4)
    X[0].diagonal().zero_()  # a zero diagonal counts as +1
    Q = householder(X)
    Id = torch.eye(4, dtype=torch.float64)
    assert (Q.mT @ Q - Id).abs().max().item() < 1e-14


def test_inverse_of_a_non_orthogonal_matrix_is_its_positive_qr(randn):
    A = randn(2, 6, 4)
    Qr, R = torch.linalg.qr(A)
    Qr = Qr * torch.sign(R.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)
    assert (householder(householder_inverse(A)) - Qr).abs().max().item() < 1e-14


def test_gradcheck(randn):
    # fast mode: householder_product's backward is slow on CPU (one call per output otherwise)
    X = random_signs(randn, randn(2, 5, 3)).requires_grad_()
    assert gradcheck(householder, (X,), fast_mode=True)
    X = random_signs(randn, randn(4, 4)).requires_grad_()
    assert gradcheck(householder, (X,), fast_mode=True)


def test_no_gradient_through_the_diagonal(randn):
    X = random_signs(randn, randn(5, 3)).requires_grad_()
    householder(X).pow(3).sum().backward()
    assert X.grad.diagonal().abs().max().item() == 0
    assert X.grad.tril(-1).abs().max().item() > 0


def test_inverse_is_not_differentiable_and_says_so(random_stiefel):
    Q = random_stiefel(4, 4).requires_grad_()
    X = householder_inverse(Q)
    assert not X.requires_grad
    assert "Not differentiable" in householder_inverse.__doc__


@pytest.mark.parametrize("fn, name", [(householder, "X"), (householder_inverse, "Q")])
def test_complex_is_rejected(fn, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected a real .*got complex dtype"):
        fn(torch.eye(3, dtype=torch.complex128))


@pytest.mark.parametrize("fn, name", [(householder, "X"), (householder_inverse, "Q")])
def test_shape_checks(fn, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected tall"):
        fn(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=rf"^{name}: expected a floating point"):
        fn(torch.zeros(3, 2, dtype=torch.int32))


def _torch_gradient(X, G):
    """The gradient of ``<G, Q>`` for the map written with torch's ``tril`` and
    ``householder_product``, differentiated by torch (``X``: diagonal of signs)."""
    theirs = X.clone().requires_grad_()
    A = theirs.tril(-1)
    tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
    Q = torch.linalg.householder_product(A, tau) * X.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)
    (Q * G).sum().backward()
    return theirs.grad


@pytest.mark.parametrize("shape", [(7, 7), (9, 4), (3, 6, 2)])
def test_householder_gradient_equals_torch_householder_product_autograd(shape):
    # the backward goes through the compact WY form; torch differentiates orgqr directly
    g = torch.Generator().manual_seed(3)
    X = torch.randn(shape, generator=g, dtype=torch.float64)
    X.diagonal(dim1=-2, dim2=-1).copy_(torch.sign(X.diagonal(dim1=-2, dim2=-1)))
    G = torch.randn(shape, generator=g, dtype=torch.float64)

    ours = X.clone().requires_grad_()
    (householder(ours) * G).sum().backward()
    torch.testing.assert_close(ours.grad, _torch_gradient(X, G), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(7, 4), (9, 9), (3, 6, 2), (2, 5, 5), (40, 40)])
@pytest.mark.parametrize("grad_mode", [False, True])
def test_closed_form_vjp_equals_autograd_of_the_wy_form(shape, grad_mode):
    """The backward's closed-form vector-Jacobian product against torch's differentiation of
    the WY product, in both of its branches (in place without grad mode; recorded, for a
    double backward, with it), batched, tall and square."""
    H = importlib.import_module("dtriv.retractions.householder")  # the module, not the map
    g = torch.Generator().manual_seed(7)
    A = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).tril(-1)
    G = torch.randn(shape, generator=g, dtype=torch.float64)
    _, vjp = torch.func.vjp(H._reflector_product_wy, A)
    (want,) = vjp(G)
    with torch.set_grad_enabled(grad_mode):
        got = H._reflector_product_wy_vjp(A, G)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_householder_backward_is_o_nk2_on_a_very_tall_matrix():
    # torch's own householder_product backward would allocate n x n (320 GB here)
    g = torch.Generator().manual_seed(4)
    X = (torch.randn(200_000, 8, generator=g, dtype=torch.float64) / 400).requires_grad_()
    Q = householder(X)
    (Q[:100] ** 2).sum().backward()
    assert torch.isfinite(X.grad).all()
    assert (Q.mT @ Q - torch.eye(8, dtype=torch.float64)).abs().max() < 1e-12


def test_householder_works_under_torch_func_grad():
    X = torch.randn(5, 3, dtype=torch.float64)
    grad = torch.func.grad(lambda Z: householder(Z).sum())(X)
    Y = X.clone().requires_grad_()
    householder(Y).sum().backward()
    torch.testing.assert_close(grad, Y.grad)


# ------------------------------------------------------------------ second derivatives, torch.func


def test_gradgradcheck(randn):
    # fast mode, as for test_gradcheck
    X = random_signs(randn, randn(2, 5, 3)).requires_grad_()
    assert torch.autograd.gradgradcheck(householder, (X,), fast_mode=True)
    X = random_signs(randn, randn(4, 4)).requires_grad_()
    assert torch.autograd.gradgradcheck(householder, (X,), fast_mode=True)


def _loss(W, C):
    """A loss with a non-zero Hessian in the weight: <W, C>^2 + sum W^3."""
    return (W * C).sum() ** 2 + W.pow(3).sum()


@pytest.mark.parametrize("shape", [(7, 3), (5, 5)])
def test_hessian_vector_product_equals_torch_orthogonal(randn, shape):
    """Oracle: torch's orthogonal(..., orthogonal_map="householder"), differentiated twice by
    torch's own derivatives of householder_product."""
    layer = torch_householder_layer(*shape)
    key = "parametrizations.weight.original"
    X = random_signs(randn, randn(*shape))
    C, E = randn(*shape), randn(*shape)

    eye = torch.eye(shape[1], dtype=X.dtype)

    def theirs(x):  # the layer maps eye to eye @ W^T
        return _loss(torch.func.functional_call(layer, {key: x}, (eye,)).mT, C)

    def ours(x):
        return _loss(householder(x), C)

    _, hv_ref = torch.autograd.functional.hvp(theirs, X, E)
    _, hv = torch.autograd.functional.hvp(ours, X, E)
    assert hv_ref.abs().max() > 0.1
    torch.testing.assert_close(hv, hv_ref, atol=1e-11, rtol=0)


def _householder_reference(X):
    A = X.tril(-1)
    tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
    signs = X.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)
    return torch.linalg.householder_product(A, tau) * signs


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_householder_under_torch_func_transforms(randn):
    """vmap(grad) equals a loop of backward passes, jvp equals the derivative of torch's
    householder_product, torch.func.hessian (forward over reverse) equals autograd's Hessian
    (reverse over reverse, checked against torch's in the test above)."""
    C = randn(6, 3)
    Xs = torch.stack([random_signs(randn, randn(6, 3)) for _ in range(4)])

    def loss(x):
        return _loss(householder(x), C)

    looped = []
    for x in Xs:
        x = x.clone().requires_grad_()
        looped.append(torch.autograd.grad(loss(x), x)[0])
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss))(Xs), torch.stack(looped),
                               atol=1e-13, rtol=0)

    X, E = Xs[0], randn(6, 3)
    _, dQ = torch.func.jvp(householder, (X,), (E,))
    _, dQ_ref = torch.func.jvp(_householder_reference, (X,), (E,))
    torch.testing.assert_close(dQ, dQ_ref, atol=1e-12, rtol=0)

    H = torch.autograd.functional.hessian(loss, X)
    assert H.abs().max() > 0.1
    torch.testing.assert_close(torch.func.hessian(loss)(X), H, atol=1e-11, rtol=0)


@pytest.mark.parametrize("shape", [(7, 7), (9, 4), (3, 6, 2)])
def test_strict_lower_node_gives_torchs_gradients(monkeypatch, shape):
    # from STRICT_LOWER_NODE_MIN_NUMEL entries the reflectors' tails are taken by a node of
    # our own (a copy and tril_ forward and backward); forced here at small sizes: the
    # gradient, gradgradcheck and the hessian-vector product against torch's tril
    H = importlib.import_module("dtriv.retractions.householder")
    monkeypatch.setattr(H, "STRICT_LOWER_NODE_MIN_NUMEL", 0)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(shape, generator=g, dtype=torch.float64)
    X.diagonal(dim1=-2, dim2=-1).copy_(torch.sign(X.diagonal(dim1=-2, dim2=-1)))
    G = torch.randn(shape, generator=g, dtype=torch.float64)
    ours = X.clone().requires_grad_()
    Q = householder(ours)
    names = set()
    stack = [Q.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(type(node).__name__)
            stack.extend(f for f, _ in node.next_functions)
    assert "_StrictLowerTriangleBackward" in names and "TrilBackward0" not in names
    (Q * G).sum().backward()
    torch.testing.assert_close(ours.grad, _torch_gradient(X, G), atol=1e-12, rtol=0)
    assert gradgradcheck(householder, (X.clone().requires_grad_(),), fast_mode=True)


def test_strict_lower_node_alone_gradcheck():
    H = importlib.import_module("dtriv.retractions.householder")
    X = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    f = lambda X: H._StrictLowerTriangle.apply(X)  # noqa: E731
    assert torch.equal(f(X), X.tril(-1))
    assert gradcheck(f, (X,)) and gradgradcheck(f, (X,))
    dX = torch.randn_like(X)
    _, tangent = torch.func.jvp(f, (X.detach(),), (dX,))
    assert torch.equal(tangent, dX.tril(-1))
