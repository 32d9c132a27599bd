"""Trivialization: the map, assignment, refresh, static mode, tensor readings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dtriv.manifolds import Orthogonal, SpecialOrthogonal, SpectrallyBounded, Sphere, Stiefel
from dtriv.parametrize import Trivialization, constrain, register_parametrization, trivializations
from dtriv.retractions.lie import logm

F64 = torch.float64


def linear(n_in, n_out, seed=0, dtype=F64):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).to(dtype)


def set_original(module, value, name="weight"):
    with torch.no_grad():
        module.parametrizations[name].original.copy_(value)


def orthonormality(W):
    W = W.detach()
    W = W if W.shape[-2] >= W.shape[-1] else W.mT
    eye = torch.eye(W.shape[-1], dtype=W.dtype)
    return float((W.mT @ W - eye).abs().max())


CASES = [
    (Orthogonal(6), r, (6, 6)) for r in Orthogonal(6).retractions
] + [
    (Stiefel(7, 3), r, (7, 3)) for r in Stiefel(7, 3).retractions
] + [
    (Stiefel(3, 7), "qr", (3, 7)),
    (Sphere(5), "exp", (4, 5)),
    (Sphere(5, radius=2.0), "projective", (5,)),
    (SpectrallyBounded(5, 4, upper=0.5), "clip", (5, 4)),
]


@pytest.mark.parametrize("manifold, retraction, shape", CASES, ids=lambda c: repr(c))
def test_forward_is_retraction_of_tangent_and_refresh_keeps_weight(manifold, retraction, shape):
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(shape, generator=g, dtype=F64)
    module = nn.Module()
    module.weight = nn.Parameter(W0.clone())
    constrain(module, "weight", manifold, retraction)
    triv = module.parametrizations.weight[0]
    # registration keeps the weight, projected onto the manifold; the parameter is zero
    assert torch.allclose(module.weight, manifold.project(W0), atol=1e-12)
    assert torch.equal(module.parametrizations.weight.original, torch.zeros(shape, dtype=F64))
    # forward(X) = retract(base, tangent(base, X)) (an oracle from the manifold's own maps)
    X = 0.3 * torch.randn(shape, generator=g, dtype=F64)
    set_original(module, X)
    expected = manifold.retract(triv.base, manifold.tangent(triv.base, X), retraction)
    W = module.weight
    # equal up to rounding: manifolds may fuse the two maps (Manifold.trivialize)
    torch.testing.assert_close(W, expected, rtol=0, atol=1e-12)
    assert manifold.check(W.detach())
    # refresh: weight unchanged, parameter zeroed, base = old weight, same tensors
    base_id, orig = id(triv.base), module.parametrizations.weight.original
    triv.refresh()
    assert id(triv.base) == base_id and module.parametrizations.weight.original is orig
    assert torch.equal(orig, torch.zeros_like(orig))
    assert torch.allclose(module.weight, W, atol=1e-12)
    assert torch.allclose(triv.base, W, atol=1e-12)


def test_square_expm_is_base_times_matrix_exponential():
    layer = linear(5, 5, seed=2)
    constrain(layer, "weight", Orthogonal(5), "expm")
    triv = layer.parametrizations.weight[0]
    X = torch.randn(5, 5, dtype=F64)
    set_original(layer, X)
    expected = triv.base @ torch.matrix_exp((X - X.T) / 2)
    assert torch.allclose(layer.weight, expected, atol=1e-12)


def test_gradients_flow_to_the_parameter():
    layer = linear(4, 6, seed=3)
    constrain(layer, "weight", Stiefel(6, 4), "cayley")
    x = torch.randn(8, 4, dtype=F64)
    layer(x).square().sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None and grad.shape == (6, 4) and float(grad.abs().max()) > 0
    # the base is a buffer: no gradient, not a parameter
    names = [n for n, _ in layer.named_parameters()]
    assert "parametrizations.weight.original" in names
    assert not any(n.endswith("base") for n in names)


def test_assignment_sets_base_and_zeroes_parameter():
    layer = linear(8, 8, seed=4, dtype=torch.float32)
    constrain(layer, "weight", Orthogonal(8))
    triv = layer.parametrizations.weight[0]
    set_original(layer, torch.randn(8, 8))
    Q = Orthogonal(8).sample(generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    base_id = id(triv.base)
    layer.weight = Q
    assert id(triv.base) == base_id
    assert torch.equal(triv.base, Q)
    assert torch.equal(layer.parametrizations.weight.original, torch.zeros(8, 8))
    assert float((layer.weight.detach() - Q).abs().max()) < 1e-6


def test_refresh_keeps_weight_and_zeroes_parameter_float32():
    layer = linear(8, 8, seed=6, dtype=torch.float32)
    constrain(layer, "weight", Orthogonal(8))
    set_original(layer, 0.2 * torch.randn(8, 8))
    W = layer.weight.detach().clone()
    layer.parametrizations.weight[0].refresh()
    assert float((layer.weight.detach() - W).abs().max()) < 1e-6
    assert torch.equal(layer.parametrizations.weight.original, torch.zeros(8, 8))


def _refresh_walk(retraction, steps):
    n = 8
    layer = linear(n, n, seed=7, dtype=torch.float32)
    constrain(layer, "weight", Orthogonal(n), retraction)
    triv = layer.parametrizations.weight[0]
    original = layer.parametrizations.weight.original
    start = triv.base.clone()
    g = torch.Generator().manual_seed(8)
    tangents = 1e-2 * torch.randn(steps, n, n, generator=g)
    eye = torch.eye(n)
    errors = torch.empty(steps)
    with torch.no_grad():
        for i in range(steps):
            original.copy_(tangents[i])
            triv.refresh()
            errors[i] = (triv.base.T @ triv.base - eye).abs().max()
    # after a refresh the weight is the base (retract(B, 0) = B)
    W = layer.weight.detach()
    assert float((W - triv.base).abs().max()) < 1e-6
    worst = max(float(errors.max()), float((W.T @ W - eye).abs().max()))
    assert worst < 1e-5
    # the walk did move: the weight is far from where it started
    assert float((triv.base - start).abs().max()) > 0.1


def test_ten_thousand_refreshes_stay_orthogonal_float32():
    _refresh_walk("expm", 10_000)


def test_thousand_cayley_refreshes_stay_orthogonal_float32():
    _refresh_walk("cayley", 1_000)


@pytest.mark.slow
def test_ten_thousand_cayley_refreshes_stay_orthogonal_float32():
    _refresh_walk("cayley", 10_000)


def test_refresh_reprojects_drifted_base():
    layer = linear(6, 6, seed=9)
    constrain(layer, "weight", Orthogonal(6))
    triv = layer.parametrizations.weight[0]
    with torch.no_grad():
        triv.base.mul_(1 + 1e-6)  # off the manifold by 2e-6 >> the re-projection threshold
    assert float(Orthogonal(6).distance(triv.base)) > triv.reproject_atol(F64)
    triv.refresh()
    assert float(Orthogonal(6).distance(triv.base)) < 1e-13


def test_special_orthogonal_registration_projects_to_det_one():
    layer = linear(4, 4, seed=10)
    with torch.no_grad():
        layer.weight.copy_(torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=F64)))
    constrain(layer, "weight", SpecialOrthogonal(4))
    assert float(torch.linalg.det(layer.weight.detach())) == pytest.approx(1.0)


def test_batched_reading():
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(3, 2, 5, 4, dtype=F64))
    constrain(module, "weight", Stiefel(5, 4))
    set_original(module, torch.randn(3, 2, 5, 4, dtype=F64))
    W = module.weight
    assert W.shape == (3, 2, 5, 4)
    assert orthonormality(W) < 1e-12
    assert module.parametrizations.weight[0].base.shape == (3, 2, 5, 4)


def test_flattened_conv_kernel():
    torch.manual_seed(11)
    conv = nn.Conv2d(3, 4, 3).double()
    W0 = conv.weight.detach().clone()
    constrain(conv, "weight", Stiefel(4, 27), "qr")
    triv = conv.parametrizations.weight[0]
    assert triv.base.shape == (4, 27)
    assert conv.weight.shape == (4, 3, 3, 3)
    assert torch.allclose(conv.weight.reshape(4, 27), Stiefel(4, 27).project(W0.reshape(4, 27)),
                          atol=1e-12)
    set_original(conv, torch.randn(4, 3, 3, 3, dtype=F64))
    assert orthonormality(conv.weight.reshape(4, 27)) < 1e-12
    out = conv(torch.randn(2, 3, 5, 5, dtype=F64))
    assert out.shape == (2, 4, 3, 3)


def test_flatten_along_another_dim():
    # a transposed-conv kernel (in, out, kh, kw) read as out x (in kh kw) with dim=1
    module = nn.Module()
    W0 = torch.randn(3, 4, 2, 2, dtype=F64)
    module.weight = nn.Parameter(W0.clone())
    constrain(module, "weight", Stiefel(4, 12), flatten=True, dim=1)
    M = module.weight.movedim(1, 0).reshape(4, 12)
    assert torch.allclose(M, Stiefel(4, 12).project(W0.movedim(1, 0).reshape(4, 12)), atol=1e-12)
    assert module.weight.shape == (3, 4, 2, 2)


def test_static_square_assignment_is_the_true_inverse():
    layer = linear(5, 5, seed=12)
    constrain(layer, "weight", Orthogonal(5), "expm", dynamic=False)
    triv = layer.parametrizations.weight[0]
    B = triv.base.clone()
    A = torch.randn(5, 5, dtype=F64)
    A = 0.5 * (A - A.T)
    target = B @ torch.matrix_exp(A)
    layer.weight = target
    # the reference point did not move, the parameter is the logarithm
    assert torch.equal(triv.base, B)
    assert torch.allclose(layer.parametrizations.weight.original, logm(B.T @ target), atol=1e-10)
    assert torch.allclose(layer.parametrizations.weight.original, A, atol=1e-10)
    assert torch.allclose(layer.weight, target, atol=1e-10)
    # static trivializations are not refreshed and not listed
    with pytest.raises(RuntimeError, match="static"):
        triv.refresh()
    assert list(trivializations(layer)) == []


def test_static_tall_qr_inverse_and_missing_inverse():
    layer = linear(3, 6, seed=13)
    constrain(layer, "weight", Stiefel(6, 3), "qr", dynamic=False)
    triv = layer.parametrizations.weight[0]
    target = Stiefel(6, 3).retract(triv.base, 0.1 * Stiefel(6, 3).random_tangent(triv.base), "qr")
    layer.weight = target
    assert torch.allclose(layer.weight, target, atol=1e-10)

    layer = linear(3, 6, seed=14)
    constrain(layer, "weight", Stiefel(6, 3), "exp", dynamic=False)
    before = layer.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="static trivialization.*inverse"):
        layer.weight = target
    assert torch.equal(layer.weight, before)


def test_not_first_parametrization_is_reported():
    class Double(nn.Module):
        def forward(self, X):
            return 2 * X

    layer = linear(4, 4, seed=15)
    register_parametrization(layer, "weight", Double())
    with pytest.raises(RuntimeError, match="no base point"):
        register_parametrization(layer, "weight", Trivialization(Orthogonal(4)))


def test_later_parametrizations_and_refresh():
    class Scale(nn.Module):
        def forward(self, X):
            return 3 * X

        def right_inverse(self, W):
            return W / 3

    layer = linear(4, 4, seed=16)
    constrain(layer, "weight", Orthogonal(4))
    register_parametrization(layer, "weight", Scale())
    set_original(layer, torch.randn(4, 4, dtype=F64))
    W = layer.weight.detach().clone()
    assert orthonormality(W / 3) < 1e-12
    layer.parametrizations.weight[0].refresh()
    assert torch.allclose(layer.weight, W, atol=1e-12)
    # assignment goes through both right inverses
    Q = Orthogonal(4).sample(dtype=F64, generator=torch.Generator().manual_seed(0))
    layer.weight = 3 * Q
    assert torch.allclose(layer.weight, 3 * Q, atol=1e-12)


def test_direct_registration_and_link_repair():
    layer = linear(4, 4, seed=17)
    triv = Trivialization(Orthogonal(4))
    register_parametrization(layer, "weight", triv)
    with pytest.raises(RuntimeError, match="does not know its parameter"):
        triv.refresh()
    original = layer.parametrizations.weight.original
    triv.refresh(original)  # explicit form works
    found = list(trivializations(layer))  # also restores the links
    assert found == [(layer, "weight", triv)]
    assert original._dtriv_trivialization() is triv
    set_original(layer, torch.randn(4, 4, dtype=F64))
    W = layer.weight.detach().clone()
    triv.refresh()
    assert torch.allclose(layer.weight, W, atol=1e-12)


def test_deepcopy_links_point_to_the_copy():
    layer = linear(4, 4, seed=18)
    constrain(layer, "weight", Orthogonal(4))
    twin = copy.deepcopy(layer)
    triv, triv2 = layer.parametrizations.weight[0], twin.parametrizations.weight[0]
    assert triv._owner() is layer.parametrizations.weight
    assert triv2._owner() is twin.parametrizations.weight
    set_original(twin, torch.randn(4, 4, dtype=F64))
    base = triv.base.clone()
    W2 = twin.weight.detach().clone()
    triv2.refresh()
    assert torch.equal(triv.base, base)  # the original model is untouched
    assert torch.allclose(twin.weight, W2, atol=1e-12)
    list(trivializations(twin))
    assert twin.parametrizations.weight.original._dtriv_trivialization() is triv2


def test_parameter_carries_a_weak_link_to_its_trivialization():
    layer = linear(4, 4, seed=19)
    constrain(layer, "weight", Orthogonal(4))
    original = layer.parametrizations.weight.original
    assert original._dtriv_trivialization() is layer.parametrizations.weight[0]
    # what an optimizer holds: the same parameter objects in its param groups
    param_groups = [{"params": list(layer.parameters())}]
    links = [getattr(p, "_dtriv_trivialization", None) for g in param_groups
             for p in g["params"]]
    assert sum(link is not None for link in links) == 1


def test_repr():
    layer = linear(4, 6, seed=20)
    constrain(layer, "weight", Stiefel(6, 4), "qr")
    assert "Trivialization(manifold=Stiefel(n=6, k=4), retraction='qr')" in repr(layer)


def test_complex_unitary_weight():
    module = nn.Module()
    g = torch.Generator().manual_seed(21)
    module.weight = nn.Parameter(torch.randn(5, 5, generator=g, dtype=torch.complex128))
    constrain(module, "weight", Orthogonal(5))
    set_original(module, torch.randn(5, 5, generator=g, dtype=torch.complex128))
    W = module.weight.detach()
    assert float((W.mH @ W - torch.eye(5, dtype=W.dtype)).abs().max()) < 1e-12
    module.parametrizations.weight[0].refresh()
    assert torch.allclose(module.weight.detach(), W, atol=1e-12)


def test_refresh_polishes_rounding_drift_without_a_full_projection(monkeypatch):
    # a base a little off the manifold (below the re-projection threshold) is polished back
    # to rounding level by one Newton-Schulz step at refresh, never by an SVD projection
    import dtriv
    from dtriv.manifolds import Orthogonal

    torch.manual_seed(0)
    n = 32
    layer = torch.nn.Linear(n, n, bias=False)
    dtriv.constrain(layer, "weight", Orthogonal(n))
    triv = layer.parametrizations.weight[0]
    with torch.no_grad():
        triv.base.add_(1e-6 * torch.randn(n, n))
    error = float(triv.manifold.distance(triv.base))
    assert triv.polish_atol(torch.float32) < error < triv.reproject_atol(torch.float32)

    def no_projection(X):
        raise AssertionError("refresh projected instead of polishing")

    monkeypatch.setattr(triv.manifold, "project", no_projection)
    triv.refresh()
    assert float(triv.manifold.distance(triv.base)) < triv.polish_atol(torch.float32)


@pytest.mark.parametrize("retraction", ["expm", "cayley"])
def test_static_assignment_on_a_complex_base_reads_back(retraction):
    """A static trivialization of U(4) assigned ``W = B expm(Omega)`` reads back ``W``: the
    inverse maps back to coordinates with ``B^H`` (``B^T`` is wrong for a complex base; a real
    initial weight, hence a real base, would hide it)."""
    C128 = torch.complex128
    g = torch.Generator().manual_seed(1)
    lin = linear(4, 4, dtype=C128)
    with torch.no_grad():
        lin.weight.copy_(Orthogonal(4).sample(generator=g, dtype=C128))
    constrain(lin, "weight", Orthogonal(4), retraction, dynamic=False)
    B = lin.weight.detach().clone()
    assert B.imag.abs().max() > 0.1  # a genuinely complex base
    S = torch.randn(4, 4, generator=g, dtype=C128)
    W = B @ torch.linalg.matrix_exp(0.3 * (S - S.mH))
    lin.weight = W
    torch.testing.assert_close(lin.weight.detach(), W, atol=1e-12, rtol=0)


def test_flatten_with_a_negative_dim_counts_from_the_back(weight_holder):
    """``dim=-1`` on a ``(3, 4, 5)`` tensor is its last dimension (size 5): the tensor is read
    as the ``5 x 12`` matrix with that dimension first, exactly as ``dim=2`` reads it."""
    M = Stiefel(5, 12)
    neg = constrain(weight_holder((3, 4, 5)), "weight", M, flatten=True, dim=-1)
    pos = constrain(weight_holder((3, 4, 5)), "weight", M, flatten=True, dim=2)
    W = neg.weight.detach()
    assert W.shape == (3, 4, 5)
    assert M.check(W.movedim(-1, 0).reshape(5, 12))
    torch.testing.assert_close(W, pos.weight.detach(), atol=0, rtol=0)


def test_registration_keeps_no_alias_of_the_old_weight():
    """The base is a copy of the weight at registration: an in-place write through an alias of
    the old parameter (a view a caller kept) does not move the constrained weight."""
    lin = linear(4, 4)
    Q = Orthogonal(4).sample(generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(Q)
    alias = lin.weight.detach()
    constrain(lin, "weight", Orthogonal(4))
    alias.zero_()
    torch.testing.assert_close(lin.weight.detach(), Q, atol=1e-14, rtol=0)
