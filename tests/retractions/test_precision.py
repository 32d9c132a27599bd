"""Half precision and batching for the Lie, Householder, sphere and spectral maps."""

from __future__ import annotations

import pytest
import torch

from dtriv.retractions import (
    cayley,
    cayley_inverse,
    clip_singular_values,
    expm,
    householder,
    householder_inverse,
    logm,
    power_iteration_,
    power_iteration_init,
    spectral_norm_estimate,
    sphere_exp,
    sphere_log,
    sphere_projective,
    sphere_projective_inverse,
)

HALF = {torch.float16: 4e-3, torch.bfloat16: 3e-2}  # a few units of the format's rounding


def _unit(x):
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _tangent(x, v, scale):
    return scale * (v - (x * v).sum(-1, keepdim=True) * x)


@pytest.fixture
def cases(randn, random_skew, random_orthogonal, random_stiefel):
    """name -> (map, float64 arguments with batch shape (2, 3))."""
    x = _unit(randn(2, 3, 5))
    v = _tangent(x, randn(2, 3, 5), 0.6)
    y = sphere_exp(x, v)
    W = randn(2, 3, 5, 4)
    u0, v0 = power_iteration_init(W, generator=torch.Generator().manual_seed(0))
    return {
        "expm": (expm, (random_skew(2, 3, 4, radius=2.0),)),
        "cayley": (cayley, (random_skew(2, 3, 4, radius=2.0),)),
        "logm": (logm, (random_orthogonal(2, 3, 4, radius=2.0),)),
        "cayley_inverse": (cayley_inverse, (random_orthogonal(2, 3, 4, radius=2.0),)),
        "householder": (householder, (randn(2, 3, 5, 3),)),
        "householder_inverse": (householder_inverse, (random_stiefel(2, 3, 5, 3),)),
        "sphere_exp": (sphere_exp, (x, v)),
        "sphere_log": (sphere_log, (x, y)),
        "sphere_projective": (sphere_projective, (x, v)),
        "sphere_projective_inverse": (sphere_projective_inverse, (x, sphere_projective(x, v))),
        "clip_singular_values": (clip_singular_values, (W,)),
        "spectral_norm_estimate": (spectral_norm_estimate, (W, u0, v0)),
    }


NAMES = ["expm", "cayley", "logm", "cayley_inverse", "householder", "householder_inverse",
         "sphere_exp", "sphere_log", "sphere_projective", "sphere_projective_inverse",
         "clip_singular_values", "spectral_norm_estimate"]


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_the_loop(cases, name):
    fn, args = cases[name]
    out = fn(*args)
    for i in range(2):
        for j in range(3):
            one = fn(*(a[i, j] for a in args))
            assert one.shape == out[i, j].shape
            assert (one - out[i, j]).abs().max().item() < 1e-13, (i, j)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", sorted(HALF, key=str))
def test_half_precision_returns_the_input_dtype_close_to_float32(cases, name, dtype):
    fn, args = cases[name]
    half = tuple(a.to(dtype) for a in args)
    out = fn(*half)
    assert out.dtype == dtype
    ref = fn(*(a.float() for a in half))  # the float32 result from the same rounded inputs
    assert ref.dtype == torch.float32
    assert (out.float() - ref).abs().max().item() <= HALF[dtype] * max(1.0, ref.abs().max())


@pytest.mark.parametrize("dtype", sorted(HALF, key=str))
def test_half_precision_power_iteration_updates_in_place(randn, dtype):
    W = randn(6, 4).to(dtype)
    u, v = power_iteration_init(W, generator=torch.Generator().manual_seed(0))
    assert u.dtype == v.dtype == dtype
    ptrs = (u.data_ptr(), v.data_ptr())
    u32, v32 = u.float(), v.float()
    power_iteration_(W, u, v, 3)
    power_iteration_(W.float(), u32, v32, 3)
    assert (u.data_ptr(), v.data_ptr()) == ptrs
    assert (u.float() - u32).abs().max().item() <= HALF[dtype]
    assert (v.float() - v32).abs().max().item() <= HALF[dtype]
