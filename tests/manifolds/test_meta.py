"""Every manifold on ``meta`` tensors: sampling, projection, tangent maps, every retraction and
its inverse give the shapes and dtypes of the same calls on CPU, gradients included.

A meta tensor has no values: membership checks (:meth:`Manifold.check`) cannot measure a
constraint error and accept it (``True``, with the reason "not checked"), rather than
raise, so a model built on ``torch.device("meta")`` registers and runs its
parametrizations; :meth:`Manifold.distance` is a meta tensor of the batch shape.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dtriv.manifolds import Orthogonal, SpecialOrthogonal, SpectrallyBounded, Sphere, Stiefel

F64 = torch.float64

MANIFOLDS = [
    Stiefel(7, 3),
    Stiefel(3, 7),
    Orthogonal(5),
    SpecialOrthogonal(5),
    Sphere(5),
    Sphere(4, radius=2.0),
    SpectrallyBounded(6, 4),
    SpectrallyBounded(4, 6, upper=2.0, lower=0.5),
]
IDS = [repr(M) for M in MANIFOLDS]


def _meta(t: torch.Tensor, grad: bool = False) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                               device="meta").requires_grad_(grad)


def _like(meta, cpu, what=""):
    assert meta.device.type == "meta", f"{what}: expected a meta tensor, got {meta.device}"
    assert meta.shape == cpu.shape, f"{what}: shape {tuple(meta.shape)} != {tuple(cpu.shape)}"
    assert meta.dtype == cpu.dtype, f"{what}: dtype {meta.dtype} != {cpu.dtype}"


def _both(fn, inputs, diff=()):
    """``fn`` on CPU copies and on meta copies of ``inputs``; outputs and gradients alike."""
    results = []
    for device in ("cpu", "meta"):
        args = [t.detach().clone().requires_grad_(i in diff) if device == "cpu"
                else _meta(t, i in diff) for i, t in enumerate(inputs)]
        out = fn(*args)
        grads = ()
        if diff:
            grads = torch.autograd.grad(out.sum(), [args[i] for i in diff], allow_unused=True)
        results.append((out, grads))
    (cpu, cpu_grads), (meta, meta_grads) = results
    _like(meta, cpu, "output")
    for m, c in zip(meta_grads, cpu_grads):
        if c is not None:
            _like(m, c, "gradient")
    return meta


def _point_and_tangent(M, gen):
    B = M.sample(2, generator=gen, dtype=F64)
    return B, M.random_tangent(B, generator=gen) * 0.2


@pytest.mark.parametrize("M", MANIFOLDS, ids=IDS)
def test_sample_on_meta(M, gen):
    cpu = M.sample(2, 3, generator=gen, dtype=F64)
    _like(M.sample(2, 3, dtype=F64, device="meta"), cpu, "sample")
    with torch.device("meta"):
        _like(M.sample(2, 3, dtype=F64), cpu, "sample under the meta device")


@pytest.mark.parametrize("init", ["henaff", "cayley"])
def test_rnn_initialisations_on_meta(init):
    M = Orthogonal(6)
    _like(M.sample(2, dtype=F64, init=init, device="meta"), M.sample(2, dtype=F64, init=init))


@pytest.mark.parametrize("M", MANIFOLDS, ids=IDS)
def test_projections_and_tangent_maps_on_meta(M, gen):
    B, V = _point_and_tangent(M, gen)
    X = B + V
    _both(M.project, (X,), diff=(0,))
    _both(M.polish, (X,), diff=(0,))
    _both(M.proj_tangent, (B, X), diff=(0, 1))
    _both(M.tangent, (B, X), diff=(0, 1))
    _both(M.transport, (B, B, V), diff=(2,))
    _both(M.chart, (X,), diff=(0,))
    _both(lambda B, U, V: M.inner(B, U, V), (B, V, V), diff=(1, 2))
    _both(M.random_tangent, (B,))


@pytest.mark.parametrize("M", MANIFOLDS, ids=IDS)
def test_membership_on_meta_is_not_checked(M, gen):
    B, _ = _point_and_tangent(M, gen)
    _both(M.distance, (B,))
    X = _meta(B)
    assert M.check(X) is True
    ok, reason = M.check(X, explain=True)
    assert ok is True and "meta" in reason and "not checked" in reason
    # a wrong shape is still an error: shapes are known on meta
    with pytest.raises(ValueError, match="shape"):
        M.check(torch.empty(3, device="meta", dtype=F64).expand(2, 3))


@pytest.mark.parametrize("M", MANIFOLDS, ids=IDS)
def test_every_retraction_and_inverse_on_meta(M, gen):
    B, V = _point_and_tangent(M, gen)
    for method in M.retractions:
        _both(functools.partial(M.retract, method=method), (B, V), diff=(0, 1))
        _both(functools.partial(M.trivialize, method=method), (B, V), diff=(0, 1))
        if M._inverse(method) is not None:
            Y = M.retract(B, V, method).detach()
            _both(functools.partial(M.retract_inverse, method=method), (B, Y))
