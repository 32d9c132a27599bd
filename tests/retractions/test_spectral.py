"""Power iteration against torch's spectral_norm buffers; singular-value clipping against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils import parametrizations
from torch.nn.utils.parametrizations import _SpectralNorm

import dtriv
from dtriv.manifolds import SpectrallyBounded
from dtriv.retractions import (
    clip_singular_values,
    polar_factor,
    power_iteration_,
    power_iteration_init,
    spectral_norm_estimate,
)


def make_layer(kind, dtype):
    torch.manual_seed(7)
    if kind == "linear":
        return torch.nn.Linear(6, 4, dtype=dtype)
    if kind == "wide":
        return torch.nn.Linear(9, 3, dtype=dtype)
    return torch.nn.Conv2d(3, 5, 3, dtype=dtype)


@pytest.mark.parametrize("kind", ["linear", "wide", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_init_reproduces_torch_buffers_bit_for_bit(kind, dtype):
    layer = make_layer(kind, dtype)
    W = layer.weight.detach().flatten(1)  # torch's matrix for dim=0
    torch.manual_seed(11)
    module = _SpectralNorm(layer.weight.detach())
    torch.manual_seed(11)
    u, v = power_iteration_init(W)
    assert torch.equal(u, module._u) and torch.equal(v, module._v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_in_place_updates_follow_the_module_bit_for_bit(dtype):
    """spectral_norm() registers (15 warm-up steps) and checks the forward once (1 step);
    every training forward runs one more step on the same buffers."""
    layer = make_layer("linear", dtype)
    W = layer.weight.detach().clone()
    torch.manual_seed(3)
    parametrizations.spectral_norm(layer)
    torch.manual_seed(3)
    u, v = power_iteration_init(W)
    power_iteration_(W, u, v, 1)
    module = layer.parametrizations.weight[0]
    ptrs = (u.data_ptr(), v.data_ptr(), module._u.data_ptr(), module._v.data_ptr())
    ids = (id(u), id(v))
    for _ in range(3):
        weight = layer.weight  # a training forward of the parametrization
        power_iteration_(W, u, v, 1)
        assert torch.equal(u, module._u) and torch.equal(v, module._v)
        assert torch.equal(weight, W / spectral_norm_estimate(W, u, v))
    assert (u.data_ptr(), v.data_ptr(), module._u.data_ptr(), module._v.data_ptr()) == ptrs
    assert (id(u), id(v)) == ids


def test_generator_and_warmup_arguments(randn):
    W = randn(5, 4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    u0, v0 = power_iteration_init(W, n_warmup=0, generator=g1)
    u1 = torch.nn.functional.normalize(torch.randn(5, dtype=W.dtype, generator=g2), dim=0)
    v1 = torch.nn.functional.normalize(torch.randn(4, dtype=W.dtype, generator=g2), dim=0)
    assert torch.equal(u0, u1) and torch.equal(v0, v1)
    u2, v2 = u0.clone(), v0.clone()
    power_iteration_(W, u2, v2, 15)
    u3, v3 = power_iteration_init(W, generator=torch.Generator().manual_seed(5))
    assert torch.equal(u2, u3) and torch.equal(v2, v3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_estimate_converges_to_the_spectral_norm(randn, dtype):
    W = randn(7, 5, dtype=dtype)
    u, v = power_iteration_init(W, generator=torch.Generator().manual_seed(0))
    power_iteration_(W, u, v, 300)
    sigma = spectral_norm_estimate(W, u, v)
    exact = torch.linalg.matrix_norm(W, 2)
    assert abs(sigma - exact).item() < 1e-12 * exact.item()
    assert torch.allclose(u, W @ v / sigma, atol=1e-6)


def test_estimate_gradient_is_u_v_transpose(randn):
    W = randn(4, 3).requires_grad_()
    u, v = power_iteration_init(W.detach(), generator=torch.Generator().manual_seed(0))
    assert gradcheck(spectral_norm_estimate, (W, u, v))
    spectral_norm_estimate(W, u, v).backward()
    assert torch.equal(W.grad, torch.outer(u, v))


def test_estimate_survives_a_later_in_place_update(randn):
    """u, v are cloned: the graph of sigma stays valid after power_iteration_ (GAN pattern)."""
    W = randn(4, 3).requires_grad_()
    u, v = power_iteration_init(W.detach())
    first = spectral_norm_estimate(W, u, v)
    power_iteration_(W.detach(), u, v, 2)
    second = spectral_norm_estimate(W, u, v)
    (first - second).backward()
    assert torch.isfinite(W.grad).all()


def test_batched_power_iteration_equals_the_loop(randn):
    W = randn(3, 2, 6, 4)
    u, v = power_iteration_init(W, generator=torch.Generator().manual_seed(1))
    u_loop, v_loop = u.clone(), v.clone()
    power_iteration_(W, u, v, 4)
    sigma = spectral_norm_estimate(W, u, v)
    for i in range(3):
        for j in range(2):
            ui, vi = u_loop[i, j].clone(), v_loop[i, j].clone()
            power_iteration_(W[i, j], ui, vi, 4)
            assert torch.allclose(u[i, j], ui, rtol=0, atol=1e-14)
            assert torch.allclose(v[i, j], vi, rtol=0, atol=1e-14)
            assert torch.allclose(sigma[i, j], spectral_norm_estimate(W[i, j], ui, vi),
                                  rtol=1e-14, atol=0)


def test_power_iteration_argument_checks(randn):
    W = randn(4, 3)
    with pytest.raises(ValueError, match=r"^u: expected shape \(4,\)"):
        power_iteration_(W, torch.ones(3, dtype=W.dtype), torch.ones(3, dtype=W.dtype))
    with pytest.raises(ValueError, match=r"^v: expected dtype torch.float64"):
        power_iteration_(W, torch.ones(4, dtype=W.dtype), torch.ones(3))
    with pytest.raises(ValueError, match=r"^n_iterations"):
        power_iteration_(W, torch.ones(4, dtype=W.dtype), torch.ones(3, dtype=W.dtype), -1)


# --------------------------------------------------------------------------- clipping


def numpy_clip(W, upper, lower):
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    return (U * np.clip(S, lower, upper)[..., None, :]) @ Vh


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4), (2, 3, 4, 7)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("bounds", [(1.0, 0.0), (1.5, 0.5), (float("inf"), 0.8)])
def test_clip_matches_numpy(randn, shape, dtype, bounds):
    W = randn(*shape, dtype=dtype)
    out = clip_singular_values(W, *bounds)
    assert np.abs(out.numpy() - numpy_clip(W.numpy(), *bounds)).max() < 1e-13
    S = torch.linalg.svdvals(out)
    assert S.max().item() <= bounds[0] + 1e-12 and S.min().item() >= bounds[1] - 1e-12


def test_clip_float32_matches_numpy(randn):
    W = randn(3, 5, 4).float()
    ref = numpy_clip(W.double().numpy(), 1.0, 0.2)
    assert np.abs(clip_singular_values(W, 1.0, 0.2).double().numpy() - ref).max() < 1e-5


def test_clip_is_idempotent_and_keeps_matrices_inside(randn):
    W = randn(5, 4)
    once = clip_singular_values(W, 1.0, 0.3)
    assert (clip_singular_values(once, 1.0, 0.3) - once).abs().max().item() < 1e-14
    inside = clip_singular_values(W, 100.0, 0.0)
    assert (inside - W).abs().max().item() < 1e-13


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_clip_gradcheck(randn, dtype):
    W = randn(2, 4, 3, dtype=dtype).requires_grad_()
    assert gradcheck(lambda X: clip_singular_values(X, 1.5, 0.5), (W,))


def svd_clip(W, upper, lower):
    """The formula differentiated through torch's SVD (its gradient divides by s_i^2 - s_j^2)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U * S.clamp(lower, upper).unsqueeze(-2).to(U.dtype)) @ Vh


def vjp(fn, W, G):
    W = W.detach().requires_grad_()
    (grad,) = torch.autograd.grad(fn(W), W, G)
    return grad


@pytest.mark.parametrize("shape", [(5, 3), (3, 6), (2, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("bounds", [(1.5, 0.5), (100.0, 0.0), (1.0, 1.0), (0.3, 0.0)])
def test_clip_gradient_equals_the_svd_gradient_at_distinct_values(randn, shape, dtype, bounds):
    W, G = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)
    ours = vjp(lambda X: clip_singular_values(X, *bounds), W, G)
    assert (ours - vjp(lambda X: svd_clip(X, *bounds), W, G)).abs().max().item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_clip_gradgradcheck(randn, dtype):
    W = randn(2, 4, 3, dtype=dtype).requires_grad_()
    assert gradgradcheck(lambda X: clip_singular_values(X, 1.5, 0.5), (W,))


def random_orthogonal(randn, n):
    return torch.linalg.qr(randn(n, n))[0]


@pytest.mark.parametrize("W", ["half_identity", "repeated_pair", "scaled_orthogonal"])
def test_clip_gradient_is_finite_at_repeated_values_inside(randn, W):
    # every singular value strictly inside the bounds: the map is the identity near W
    W = {"half_identity": 0.5 * torch.eye(3, dtype=torch.float64),
         "repeated_pair": torch.diag(torch.tensor([0.5, 0.5, 0.2], dtype=torch.float64)),
         "scaled_orthogonal": 0.9 * random_orthogonal(randn, 4)}[W]
    G = randn(*W.shape)
    assert (vjp(lambda X: clip_singular_values(X, 1.0, 0.1), W, G) - G).abs().max() < 1e-13
    assert vjp(lambda X: svd_clip(X, 1.0, 0.1), W, G).isnan().any()  # the generic backward


@pytest.mark.parametrize("shape", [(4, 4), (6, 3)])
def test_clip_to_one_bound_is_the_scaled_polar_factor(randn, shape):
    # all values above ``upper``, or lower == upper: the map is upper * polar(W) near W,
    # whose gradient has its own stable formula (repeated values at W = 2 Q)
    Q = torch.linalg.qr(randn(*shape))[0]
    for W, bounds in ((2 * Q, (1.0, 0.0)), (randn(*shape), (0.7, 0.7))):
        G = randn(*shape)
        ours = vjp(lambda X, b=bounds: clip_singular_values(X, *b), W, G)
        oracle = vjp(lambda X, b=bounds: b[0] * polar_factor(X), W, G)
        assert (ours - oracle).abs().max().item() < 1e-12


def test_clip_gradient_under_vmap_matches_a_loop(randn):
    W = randn(3, 5, 4)
    loss = lambda X: (clip_singular_values(X, 1.0, 0.2) ** 2).sum()  # noqa: E731
    batched = torch.func.vmap(torch.func.grad(loss))(W)
    looped = torch.stack([torch.func.grad(loss)(w) for w in W])
    assert (batched - looped).abs().max().item() < 1e-13


@pytest.mark.parametrize("lower", [0.0, 1.0])
def test_spectrally_bounded_layer_at_a_multiple_of_the_identity_trains(lower):
    # a weight with repeated singular values at registration (0.5 I; with lower == upper the
    # projected base has them all equal): the first gradient is finite
    layer = torch.nn.Linear(4, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(0.5 * torch.eye(4))
    dtriv.parametrize.spectrally_bounded(layer, "weight", upper=1.0, lower=lower)
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer(x).square().sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    if lower == 0.0:  # inside the bounds the map is the identity at the base
        W = layer.weight.detach().requires_grad_()
        torch.nn.functional.linear(x, W, layer.bias.detach()).square().sum().backward()
        assert (grad - W.grad).abs().max().item() < 1e-12


def test_spectrally_bounded_retract_at_repeated_values():
    M = SpectrallyBounded(3, 3, upper=1.0)
    B = 0.5 * torch.eye(3, dtype=torch.float64)
    V = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    G = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (M.retract(B, V) * G).sum().backward()
    assert (V.grad - G).abs().max().item() < 1e-13


def test_estimate_gradcheck_complex(randn):
    W = randn(4, 3, dtype=torch.complex128)
    u, v = power_iteration_init(W, generator=torch.Generator().manual_seed(0))
    assert gradcheck(spectral_norm_estimate, (W.requires_grad_(), u, v))


@pytest.mark.parametrize(
    "upper, lower, match",
    [(0.0, 0.0, "^upper: expected a positive"),
     (1.0, -0.1, "^lower: expected a finite non-negative bound, got -0.1"),
     (math.inf, math.inf, "^lower: expected a finite non-negative bound, got inf"),
     (1.0, 2.0, r"^lower: expected lower <= upper")],
)
def test_clip_bound_checks(upper, lower, match):
    with pytest.raises(ValueError, match=match):
        clip_singular_values(torch.eye(3), upper, lower)
