"""constrain and its shortcuts; trivializations(model) and refresh(model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as TP

import dtriv.parametrize as P
from dtriv.manifolds import Orthogonal, SpectrallyBounded, Stiefel
from dtriv.parametrize import (
    constrain,
    orthogonal,
    refresh,
    register_parametrization,
    spectrally_bounded,
    sphere,
    trivializations,
)

F64 = torch.float64


def perturb(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_constrain_returns_the_module_and_keeps_its_class_behaviour():
    torch.manual_seed(0)
    layer = nn.Linear(3, 5).double()
    x = torch.randn(2, 3, dtype=F64)
    assert constrain(layer, "weight", Stiefel(5, 3)) is layer
    assert isinstance(layer, nn.Linear)
    assert torch.allclose(layer(x), x @ layer.weight.T + layer.bias)


def test_sphere_rows_and_radius():
    torch.manual_seed(1)
    layer = nn.Linear(4, 3).double()
    W0 = layer.weight.detach().clone()
    sphere(layer, radius=2.0)
    triv = layer.parametrizations.weight[0]
    assert repr(triv.manifold) == "Sphere(n=4, radius=2.0)"
    assert torch.allclose(layer.weight, 2 * W0 / W0.norm(dim=-1, keepdim=True), atol=1e-12)
    perturb(layer)
    assert torch.allclose(layer.weight.norm(dim=-1), torch.full((3,), 2.0, dtype=F64))


def test_sphere_flattened_whole_tensor():
    torch.manual_seed(2)
    conv = nn.Conv1d(2, 3, 2).double()
    sphere(conv, flatten=True)
    perturb(conv)
    assert conv.parametrizations.weight[0].manifold.shape == (12,)
    assert float(conv.weight.detach().norm()) == pytest.approx(1.0, abs=1e-12)


def test_spectrally_bounded_matrix_and_conv():
    torch.manual_seed(3)
    layer = nn.Linear(6, 4).double()
    with torch.no_grad():
        layer.weight.mul_(10)
    spectrally_bounded(layer, upper=0.8, lower=0.1)
    assert isinstance(layer.parametrizations.weight[0].manifold, SpectrallyBounded)
    perturb(layer, scale=2.0)
    s = torch.linalg.svdvals(layer.weight.detach())
    assert float(s.max()) <= 0.8 + 1e-12 and float(s.min()) >= 0.1 - 1e-12

    conv = nn.Conv2d(3, 5, 3).double()
    with torch.no_grad():
        conv.weight.mul_(10)
    spectrally_bounded(conv, upper=1.0)  # read as 5 x 27, like spectral_norm
    assert conv.parametrizations.weight[0].base.shape == (5, 27)
    perturb(conv, scale=2.0)
    assert float(torch.linalg.matrix_norm(conv.weight.detach().reshape(5, 27), ord=2)) <= 1 + 1e-12

    # a transposed conv's kernel (in, out, ...) is read at its output channels, dim 1, as
    # spectral_norm reads it (by default, and as torch's spectral_norm picks for it)
    for make in (lambda: nn.ConvTranspose1d(2, 6, 3), lambda: nn.ConvTranspose2d(2, 6, 3)):
        convt = make().double()
        with torch.no_grad():
            convt.weight.mul_(10)
        assert TP.spectral_norm(make()).parametrizations.weight[0].dim == 1
        spectrally_bounded(convt, upper=1.0)
        rest = convt.weight[0, 0].numel() * 2
        assert convt.parametrizations.weight[0].base.shape == (6, rest)
        perturb(convt, scale=2.0)
        matrix = convt.weight.detach().movedim(1, 0).reshape(6, rest)
        assert float(torch.linalg.matrix_norm(matrix, ord=2)) <= 1 + 1e-12
    convt = nn.ConvTranspose2d(2, 6, 3).double()
    spectrally_bounded(convt, upper=1.0, dim=0)  # the other reading, asked for
    assert convt.parametrizations.weight[0].base.shape == (2, 54)


def test_trivializations_and_refresh_over_a_model():
    class Identity(nn.Module):
        def forward(self, X):
            return X

    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 5), nn.Linear(5, 5),
        nn.Linear(5, 3),
    ).double()
    constrain(model[0], "weight", Orthogonal(4))
    constrain(model[1], "weight", Stiefel(6, 4), "cayley")
    constrain(model[2], "weight", Orthogonal(6), dynamic=False)  # static: not listed
    orthogonal(model[3])  # the torch twin with use_trivialization=True: listed
    register_parametrization(model[4], "weight", Identity())  # not a trivialization
    sphere(model[5])
    found = [(module, name, type(p).__name__) for module, name, p in trivializations(model)]
    assert [(m, n) for m, n, _ in found] == [
        (model[0], "weight"), (model[1], "weight"), (model[3], "weight"), (model[5], "weight"),
    ]
    perturb(model, scale=0.1)
    weights = [m.weight.detach().clone() for m in model]
    assert refresh(model) == 4
    for m, W in zip(model, weights):
        assert torch.allclose(m.weight, W, atol=1e-10)
    for i in (0, 1, 5):
        assert torch.equal(model[i].parametrizations.weight.original,
                           torch.zeros_like(model[i].parametrizations.weight.original))
    # static and plain parametrizations are untouched
    assert not torch.equal(model[2].parametrizations.weight.original,
                           torch.zeros_like(model[2].parametrizations.weight.original))


def test_refresh_then_training_step_moves_on_the_manifold():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    constrain(model[0], "weight", Orthogonal(5))
    constrain(model[2], "weight", Stiefel(2, 5))
    x, y = torch.randn(16, 5, dtype=F64), torch.randn(16, 2, dtype=F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 5 == 4:
            refresh(model)
    assert losses[-1] < losses[0]
    assert Orthogonal(5).check(model[0].weight.detach())
    assert Stiefel(2, 5).check(model[2].weight.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256)])
def test_half_precision_weight_is_projected_at_registration(shape, dtype):
    # the default tolerance in half precision was above 1 (bfloat16: 8.8), so the
    # initialization passed as a point of the manifold and was kept as the base
    torch.manual_seed(0)
    m = nn.Linear(shape[1], shape[0]).to(dtype)
    P.constrain(m, "weight", Stiefel(*shape))
    W = m.weight.detach().double()
    gram = W.mT @ W if shape[0] >= shape[1] else W @ W.mT
    assert m.weight.dtype == dtype
    assert (gram - torch.eye(min(shape), dtype=torch.float64)).abs().max() < 50 * (
        torch.finfo(dtype).eps)
    P.sphere(m, "bias")
    assert abs(m.bias.detach().double().norm() - 1) < 10 * torch.finfo(dtype).eps


def test_public_names():
    for name in ("Trivialization", "constrain", "sphere", "spectrally_bounded",
                 "trivializations", "refresh", "cache_per_forward", "cached",
                 "register_parametrization", "remove_parametrizations", "is_parametrized",
                 "orthogonal", "spectral_norm", "weight_norm", "weight_norm_init_"):
        assert name in P.__all__ and hasattr(P, name), name


AUTOCAST_CASES = {
    "orthogonal-expm": lambda m: constrain(m, "weight", Orthogonal(6), "expm"),
    "orthogonal-polar": lambda m: constrain(m, "weight", Orthogonal(6), "polar"),
    "stiefel-exp": lambda m: constrain(m, "weight", Stiefel(8, 6), "exp"),
    "spectral-clip": lambda m: P.spectrally_bounded(m, "weight"),
    "twin-matrix_exp": lambda m: P.orthogonal(m),
    "twin-tall": lambda m: P.orthogonal(m, orthogonal_map="matrix_exp"),
}


@pytest.mark.parametrize("case", list(AUTOCAST_CASES))
def test_maps_under_autocast_compute_in_float32(case):
    # inside torch.autocast the maps' products ran in bfloat16 and met their float32 tensors
    # (a crash once the parameter was not tiny); the weight is now the float32 one
    torch.manual_seed(0)
    shape = (8, 6) if case in ("stiefel-exp", "twin-tall") else (6, 6)
    m = torch.nn.Linear(6, 6, bias=False)
    m.weight = torch.nn.Parameter(torch.randn(*shape))
    AUTOCAST_CASES[case](m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    reference = m.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        W = m.weight
        y = torch.nn.functional.linear(torch.randn(3, 6), W)
    assert W.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.equal(W.detach(), reference)
    y.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_public_maps_under_autocast_compute_in_float32():
    from dtriv.retractions import expm, polar_factor

    A = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    A = A - A.mT
    X = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = (expm(A), polar_factor(X))
    for a, b in zip(inside, (expm(A), polar_factor(X))):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("retraction", ["exp", "projective"])
@pytest.mark.parametrize("scale", [1e-3, 0.5])  # near the base (series) and away from it
def test_sphere_per_sample_gradients_under_vmap(retraction, scale):
    # the sphere's nodes had no vmap rule (and read an angle on the host in their backward)
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    lin = nn.Linear(4, 3, dtype=torch.float64)
    P.sphere(lin, retraction=retraction)
    with torch.no_grad():
        lin.parametrizations.weight.original.normal_(0, scale)
    params = {k: v.detach() for k, v in lin.named_parameters()}
    buffers = dict(lin.named_buffers())

    def loss(p, x):
        return functional_call(lin, (p, buffers), (x[None],)).square().sum()

    x = torch.randn(5, 4, dtype=torch.float64)
    batched = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(5):
        single = grad(loss)(params, x[i])
        for key in params:
            torch.testing.assert_close(batched[key][i], single[key], rtol=1e-12, atol=1e-12)


TRACE_CASES = {
    "twin": lambda m: P.orthogonal(m),
    "expm": lambda m: constrain(m, "weight", Orthogonal(6), "expm"),
    "polar_ns": lambda m: constrain(m, "weight", Orthogonal(6), "polar_ns"),
}


@pytest.mark.parametrize("case", list(TRACE_CASES))
def test_a_trace_follows_a_later_checkpoint(case):
    # degrees and iteration counts chosen from host-read norms were frozen into the trace:
    # a trace loaded with a later checkpoint gave a weight 3.0 off the orthogonal group
    import warnings

    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    m = nn.Linear(6, 6, bias=False)
    TRACE_CASES[case](m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the checks
        traced = torch.jit.trace(m, (x,))
    torch.manual_seed(1)
    later = nn.Linear(6, 6, bias=False)
    TRACE_CASES[case](later)
    with torch.no_grad():
        later.parametrizations.weight.original.add_(0.5 * torch.randn(6, 6))
    state = {k: v for k, v in later.state_dict().items() if not k.endswith("_extra_state")}
    traced.load_state_dict(state)  # a traced module keeps no extra state
    torch.testing.assert_close(traced(x), later(x), rtol=1e-5, atol=1e-5)


def test_autocast_of_another_device_type_leaves_cpu_maps_alone():
    # autocast on for "cuda" only: turning it off for the tensors' "cpu" left autocast on
    # somewhere, and the check recursed without end
    from dtriv.retractions import expm

    m = nn.Linear(6, 6)
    P.orthogonal(m)
    lin = nn.Linear(3, 5)
    constrain(lin, "weight", Stiefel(5, 3))
    A = torch.randn(6, 6)
    previous = torch.is_autocast_enabled("cuda")
    torch.set_autocast_enabled("cuda", True)
    try:
        assert m.weight.dtype == torch.float32 and lin.weight.dtype == torch.float32
        assert expm(A - A.mT).dtype == torch.float32
    finally:
        torch.set_autocast_enabled("cuda", previous)


def test_spectrally_bounded_reads_a_matrix_unflattened():
    """``spectrally_bounded`` reads a 2-D weight as the matrix itself (flattening only tensors of
    more than two dimensions), as ``constrain`` with ``SpectrallyBounded(4, 3)`` does: their
    checkpoints load into each other with equal weights."""
    torch.manual_seed(0)
    source = constrain(nn.Linear(3, 4).double(), "weight", SpectrallyBounded(4, 3))
    target = spectrally_bounded(nn.Linear(3, 4).double())
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target.weight, source.weight, atol=0, rtol=0)
