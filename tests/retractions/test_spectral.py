"""Power iteration against torch's spectral_norm buffers; singular-value clipping against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils import parametrizations
from torch.nn.utils.parametrizations import _SpectralNorm

from dtriv.retractions import (
    clip_singular_values,
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


def test_estimate_gradcheck_complex(randn):
    W = randn(4, 3, dtype=torch.complex128)
    u, v = power_iteration_init(W, generator=torch.Generator().manual_seed(0))
    assert gradcheck(spectral_norm_estimate, (W.requires_grad_(), u, v))


@pytest.mark.parametrize(
    "upper, lower, match",
    [(0.0, 0.0, "^upper: expected a positive"), (1.0, -0.1, "^lower: expected a non-negative"),
     (1.0, 2.0, r"^lower: expected lower <= upper")],
)
def test_clip_bound_checks(upper, lower, match):
    with pytest.raises(ValueError, match=match):
        clip_singular_values(torch.eye(3), upper, lower)
