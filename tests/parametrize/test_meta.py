"""Models built on the ``meta`` device: registration, forward and backward give the shapes,
dtypes and ``state_dict`` of the same model on CPU, and deferred initialisation
(``to_empty`` then ``load_state_dict``) gives the CPU model's outputs.

The use case: build a large model under ``with torch.device("meta"):`` (or with
``device="meta"``) with :func:`~dtriv.parametrize.constrain` and its shortcuts, or the twins
``orthogonal``, ``spectral_norm``, ``weight_norm``; run a forward for shapes (FLOP counting,
FSDP-style sharding plans); then materialise it with ``to_empty`` and load its weights.

A meta tensor has no values, so the checks of an assigned value (is it on the manifold? is
it finite? ``strict=True``) are skipped on meta: registration keeps the (meta) weight as the
base, as it keeps any weight already on the manifold, and the weights loaded afterwards are
taken as they are (``load_state_dict`` never checks, on any device).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dtriv.parametrize as P
from dtriv.manifolds import Orthogonal, SpecialOrthogonal, SpectrallyBounded, Sphere, Stiefel

F64 = torch.float64

# (manifold, weight shape of a Linear (out, in))
CONSTRAINED = [
    (Stiefel(7, 3), (7, 3)),
    (Stiefel(3, 7), (3, 7)),
    (Orthogonal(5), (5, 5)),
    (SpecialOrthogonal(5), (5, 5)),
    (SpectrallyBounded(6, 4), (6, 4)),
    (SpectrallyBounded(4, 6, upper=2.0, lower=0.5), (4, 6)),
    (Sphere(4), (3, 4)),  # batched: each row on the sphere
]
CONSTRAIN_PARAMS = [
    pytest.param(M, shape, method, dynamic, id=f"{M!r}-{method}-{'dyn' if dynamic else 'static'}")
    for M, shape in CONSTRAINED for method in M.retractions for dynamic in (True, False)
]


def _linear(shape, device=None):
    out, inn = shape
    return nn.Linear(inn, out, dtype=F64, device=device)


def _build(register, make, seed=0, meta_how=None):
    """``make()`` with ``register`` applied: on CPU (``meta_how=None``), under
    ``with torch.device("meta")`` (``"context"``) or from a module made on meta (``"arg"``)."""
    torch.manual_seed(seed)
    if meta_how == "context":
        with torch.device("meta"):
            return register(make(None))
    return register(make("meta" if meta_how == "arg" else None))


def _inputs(model_in: int, device=None):
    return torch.randn(2, model_in, dtype=F64, generator=torch.Generator().manual_seed(7),
                       device="cpu").to(device or "cpu")


def _check_meta_model(register, make, n_in, train=True):
    """Build on CPU and on meta (both ways), compare weights, outputs, gradients and state
    dicts; then materialise the meta model and check it computes the CPU model's outputs."""
    cpu = _build(register, make)
    cpu.train(train)
    x = _inputs(n_in)
    y_cpu = cpu(x)
    y_cpu.sum().backward()
    cpu_grads = {n: p.grad for n, p in cpu.named_parameters()}
    cpu_state = cpu.state_dict()
    for how in ("context", "arg"):
        meta = _build(register, make, meta_how=how)
        meta.train(train)
        for (name, t), (name_c, t_c) in zip(meta.state_dict().items(), cpu_state.items()):
            assert name == name_c
            if isinstance(t_c, torch.Tensor):
                assert t.device.type == "meta", f"{name}: {t.device}"
                assert (t.shape, t.dtype) == (t_c.shape, t_c.dtype), name
        assert list(meta.state_dict()) == list(cpu_state), how
        assert meta.weight.device.type == "meta"
        assert (meta.weight.shape, meta.weight.dtype) == (cpu.weight.shape, cpu.weight.dtype)
        y = meta(x.to("meta"))
        assert y.device.type == "meta" and (y.shape, y.dtype) == (y_cpu.shape, y_cpu.dtype)
        y.sum().backward()
        for n, p in meta.named_parameters():
            g = cpu_grads[n]
            assert p.grad is not None and p.grad.device.type == "meta", n
            assert (p.grad.shape, p.grad.dtype) == (g.shape, g.dtype), n
        # deferred initialisation: materialise, load the CPU model's state, compute
        meta.to_empty(device="cpu")
        meta.load_state_dict(cpu_state)
        meta.train(train)
        reference = _build(register, make)  # a fresh CPU model in the state of ``cpu``
        reference.load_state_dict(cpu_state)
        reference.train(train)
        # equal up to rounding: the meta-built base keeps the layout of the weight, the CPU
        # one that of its projection (the products then round differently)
        torch.testing.assert_close(meta(x), reference(x))


# ---------------------------------------------------------------------------- constrain


@pytest.mark.parametrize("M, shape, method, dynamic", CONSTRAIN_PARAMS)
def test_constrain_on_meta(M, shape, method, dynamic):
    _check_meta_model(
        lambda m: P.constrain(m, "weight", M, method, dynamic=dynamic),
        lambda device: _linear(shape, device), shape[1])


@pytest.mark.parametrize(
    "retraction", ["exp", "projective"])
def test_sphere_shortcut_on_meta(retraction):
    _check_meta_model(lambda m: P.sphere(m, retraction=retraction, radius=2.0),
                      lambda device: _linear((3, 5), device), 5)


def test_spectrally_bounded_shortcut_on_a_conv_on_meta():
    def make(device):
        return nn.Sequential(nn.Unflatten(1, (2, 3, 3)),
                             nn.Conv2d(2, 4, 2, dtype=F64, device=device), nn.Flatten())

    def register(m):
        P.spectrally_bounded(m[1], upper=1.5, lower=0.1)
        return m

    # Sequential has no .weight: compare the conv's through a view
    class Wrap(nn.Module):
        def __init__(self, device):
            super().__init__()
            self.net = make(device)

        @property
        def weight(self):
            return self.net[1].weight

        def forward(self, x):
            return self.net(x)

    _check_meta_model(lambda w: (register(w.net), w)[1], Wrap, 18)


def test_strict_assignment_on_meta_is_not_checked():
    """``strict=True`` rejects points off the manifold; a meta tensor has no values to reject."""
    with torch.device("meta"):
        m = _linear((7, 3))
        P.constrain(m, "weight", Stiefel(7, 3), strict=True)
        m.weight = torch.randn(7, 3, dtype=F64)
        assert m.weight.device.type == "meta" and m.weight.shape == (7, 3)


@pytest.mark.parametrize("M, shape, method", [
    (Orthogonal(5), (5, 5), "expm"), (Orthogonal(5), (5, 5), "cayley"),
    (Stiefel(7, 3), (7, 3), "qr"), (Stiefel(7, 3), (7, 3), "polar"),
    (SpectrallyBounded(6, 4), (6, 4), "clip"),
])
def test_static_assignment_on_meta_uses_the_inverse(M, shape, method):
    with torch.device("meta"):
        m = _linear(shape)
        P.constrain(m, "weight", M, method, dynamic=False)
        m.weight = torch.randn(*shape, dtype=F64)  # through retract_inverse, unchecked
        original = m.parametrizations.weight.original
        assert original.device.type == "meta" and original.shape == shape
        assert m.weight.shape == shape


@pytest.mark.parametrize("M, shape, method", [
    (Orthogonal(5), (5, 5), "expm"), (Stiefel(7, 3), (7, 3), "qr"),
    (SpectrallyBounded(6, 4), (6, 4), "clip"), (Sphere(4), (3, 4), "exp"),
])
def test_refresh_on_meta(M, shape, method):
    with torch.device("meta"):
        m = _linear(shape)
        P.constrain(m, "weight", M, method)
        assert P.refresh(m) == 1
    assert m.parametrizations.weight[0].base.device.type == "meta"


# ---------------------------------------------------------------------------- the twins


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
@pytest.mark.parametrize("use_trivialization", [True, False])
@pytest.mark.parametrize("shape", [(5, 5), (7, 3), (3, 7)], ids=["square", "tall", "wide"])
def test_orthogonal_twin_on_meta(orthogonal_map, use_trivialization, shape):
    _check_meta_model(
        lambda m: P.orthogonal(m, orthogonal_map=orthogonal_map,
                               use_trivialization=use_trivialization),
        lambda device: _linear(shape, device), shape[1])


@pytest.mark.parametrize("shape", [(5, 5), (7, 3)], ids=["square", "tall"])
def test_orthogonal_twin_refresh_on_meta(shape):
    with torch.device("meta"):
        m = _linear(shape)
        P.orthogonal(m, orthogonal_map="cayley")
        assert P.refresh(m) == 1
    n = max(shape)
    assert m.parametrizations.weight[0].base.shape == (n, n)


@pytest.mark.parametrize("map_", ["matrix_exp", "cayley", "householder"])
def test_orthogonal_twin_assignment_without_trivialization_on_meta(map_):
    """Assignment through the true inverse (logm, cayley_inverse, Householder QR) on meta."""
    with torch.device("meta"):
        m = _linear((5, 5))
        P.orthogonal(m, orthogonal_map=map_, use_trivialization=False)
        m.weight = torch.randn(5, 5, dtype=F64)
        assert m.weight.shape == (5, 5) and m.weight.device.type == "meta"


@pytest.mark.parametrize("train", [True, False])
def test_spectral_norm_twin_on_meta(train):
    _check_meta_model(lambda m: P.spectral_norm(m), lambda device: _linear((6, 4), device), 4,
                      train=train)


def test_weight_norm_twin_on_meta():
    _check_meta_model(lambda m: P.weight_norm(m), lambda device: _linear((6, 4), device), 4)


# ---------------------------------------------------------------------------- the use case


def test_flop_counting_a_model_built_on_meta():
    """A model built on meta runs under ``FlopCounterMode`` (forward and backward). The count
    is that of the data-independent paths the maps take there (e.g. ``matrix_exp``, which the
    counter does not see, instead of the Taylor products of the eager ``expm``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 16))
        P.orthogonal(model[0])
        P.constrain(model[1], "weight", Stiefel(32, 64), "qr")
        P.spectral_norm(model[2])
        x = torch.randn(8, 64)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert counter.get_total_flops() > 0
    assert all(p.grad.device.type == "meta" for p in model.parameters())
