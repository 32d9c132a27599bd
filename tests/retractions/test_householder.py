"""Householder map and its inverse against torch.nn.utils.parametrizations.orthogonal."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
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


@pytest.mark.parametrize("shape", [(7, 7), (9, 4), (3, 6, 2)])
def test_householder_gradient_equals_torch_householder_product_autograd(shape):
    # the backward goes through the compact WY form; torch differentiates orgqr directly
    g = torch.Generator().manual_seed(3)
    X = torch.randn(shape, generator=g, dtype=torch.float64)
    X.diagonal(dim1=-2, dim2=-1).copy_(torch.sign(X.diagonal(dim1=-2, dim2=-1)))
    G = torch.randn(shape, generator=g, dtype=torch.float64)

    ours = X.clone().requires_grad_()
    (householder(ours) * G).sum().backward()

    theirs = X.clone().requires_grad_()
    A = theirs.tril(-1)
    tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
    Q = torch.linalg.householder_product(A, tau) * X.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)
    (Q * G).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-12, rtol=0)


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
