"""The spectral_norm twin against torch.nn.utils.parametrizations.spectral_norm and legacy keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as tp
from torch.nn.utils import parametrize
from torch.nn.utils import spectral_norm as legacy_spectral_norm

from dtriv.parametrize import twins


class Vector(nn.Module):
    """A module holding a 1-D parameter ``weight``."""

    def __init__(self, n=6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.weight


MODULES = {
    "linear": (lambda: nn.Linear(5, 7), (3, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5)),
    "vector": (lambda: Vector(), (2, 6)),
    "complex": (lambda: nn.Linear(5, 4, dtype=torch.complex64), (3, 5)),
}


def _pair(make, seed=0, **kw):
    out = []
    for fn in (tp.spectral_norm, twins.spectral_norm):
        torch.manual_seed(seed)
        m = make()
        fn(m, **kw)
        out.append(m)
    return out


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


@pytest.mark.parametrize("kind", list(MODULES))
def test_parity_with_torch(kind):
    for kw in [{}, {"n_power_iterations": 3}, {"dim": 1}, {"dim": -1}]:
        if not (kind == "vector" and kw.get("dim") == 1):  # no dim 1 (error tested below)
            _check_parity(kind, kw)


def _check_parity(kind, kw):
    make, in_shape = MODULES[kind]
    m_t, m_d = _pair(make, **kw)
    # same random draws: identical buffers and keys at registration
    assert m_t.state_dict().keys() == m_d.state_dict().keys()
    for key, val in m_t.state_dict().items():
        assert torch.equal(m_d.state_dict()[key], val), key
    dtype = m_t.parametrizations.weight.original.dtype
    x = torch.randn(in_shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    for step in range(4):  # several training forwards, then eval
        if step == 3:
            m_t.eval()
            m_d.eval()
        for m in (m_t, m_d):
            m.zero_grad()
            (m(x).abs() ** 2).sum().backward()
        assert _err(m_d.weight, m_t.weight) <= 1e-6
        g_t = m_t.parametrizations.weight.original.grad
        g_d = m_d.parametrizations.weight.original.grad
        assert _err(g_d, g_t) <= 1e-6
        for key, val in m_t.state_dict().items():
            assert _err(m_d.state_dict()[key], val) <= 1e-6, key


class Holder(nn.Module):
    """A module holding a parameter ``weight`` of a given value."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)


@pytest.mark.parametrize("shape", [(0, 4), (5, 0), (0, 3, 3), (3, 0, 2)])
@pytest.mark.parametrize("train", [True, False])
def test_empty_weights_as_torch(shape, train):
    """A weight with no entries (a pruned or dynamically sized layer): the same empty value
    and gradient as torch's, in training and inference reads (the twin flattened to
    ``(h, -1)``, which a zero-size tensor cannot infer)."""
    results = []
    for fn in (tp.spectral_norm, twins.spectral_norm):
        torch.manual_seed(0)
        m = fn(Holder(torch.zeros(shape)))
        m.train(train)
        w = m.weight
        (w * 2).sum().backward()
        results.append((w, m.parametrizations.weight.original.grad))
    for a, b in zip(*results):
        assert a.shape == b.shape == shape


@pytest.mark.parametrize("train", [True, False])
def test_a_zero_weight_is_not_finite_as_in_torch(train):
    """sigma = 0: the weight and its gradient are NaN as torch's (the host formula of the
    backward divided a Python number by zero)."""
    results = []
    for fn in (tp.spectral_norm, twins.spectral_norm):
        torch.manual_seed(0)
        m = fn(Holder(torch.zeros(3, 4)))
        m.train(train)
        w = m.weight
        (w * 2).sum().backward()
        results.append((w, m.parametrizations.weight.original.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, equal_nan=True)
        assert a.isnan().all()


def test_backward_through_two_forwards():
    # the GAN pattern: loss = D(real) - D(fake), u, v updated in place between the two
    m_t, m_d = _pair(lambda: nn.Linear(4, 4))
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    for m in (m_t, m_d):
        (m(x).sum() - m(y).sum()).backward()
    g_t = m_t.parametrizations.weight.original.grad
    g_d = m_d.parametrizations.weight.original.grad
    assert _err(g_d, g_t) <= 1e-6


def test_state_dicts_load_both_ways():
    src_t, src_d = _pair(lambda: nn.Conv2d(3, 4, 3), seed=0)
    dst_t, dst_d = _pair(lambda: nn.Conv2d(3, 4, 3), seed=1)
    for m in (src_t, src_d, dst_t, dst_d):
        m.eval()
    assert _err(dst_d.weight, src_t.weight) > 1e-3
    dst_d.load_state_dict(src_t.state_dict())
    dst_t.load_state_dict(src_d.state_dict())
    assert torch.equal(dst_d.weight, src_t.weight)
    assert torch.equal(dst_t.weight, src_d.weight)


@pytest.mark.parametrize("make, in_shape", [(lambda: nn.Linear(5, 7), (3, 5)),
                                            (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5))])
def test_legacy_state_dict_loads(make, in_shape):
    torch.manual_seed(0)
    old = legacy_spectral_norm(make())
    x = torch.randn(in_shape)
    for _ in range(3):
        old(x)  # power iterations in training mode
    old.eval()
    expected = old(x)
    sd = old.state_dict()
    assert {"weight_orig", "weight_u", "weight_v"} <= sd.keys()
    torch.manual_seed(1)
    new = twins.spectral_norm(make()).eval()
    new.load_state_dict(sd)  # strict
    assert _err(new(x), expected) <= 1e-6
    assert _err(new.weight, old.weight) <= 1e-6


def test_oldest_legacy_format_recovers_v():
    # before version 1 the legacy state_dict held weight = weight_orig / sigma and no weight_v
    torch.manual_seed(0)
    old = legacy_spectral_norm(nn.Linear(6, 4))
    for _ in range(5):
        old(torch.randn(2, 6))
    old.eval()
    old(torch.randn(1, 6))
    sd = old.state_dict()
    sd["weight"] = old.weight.detach().clone()
    del sd["weight_v"]
    new = twins.spectral_norm(nn.Linear(6, 4)).eval()
    new.load_state_dict(sd)
    assert _err(new.weight, old.weight) <= 1e-5


def _raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize(
    "make, kw",
    [
        (lambda: nn.Linear(3, 4), {"n_power_iterations": 0}),
        (lambda: nn.Linear(3, 4), {"n_power_iterations": -2}),
        (lambda: nn.Linear(3, 4), {"dim": 2}),
        (lambda: nn.Linear(3, 4), {"dim": -3}),
        (lambda: Vector(), {"dim": 1}),
        (lambda: nn.Linear(3, 4), {"name": "nonexistent"}),
        (lambda: nn.Linear(3, 4, bias=False), {"name": "bias"}),
    ],
)
def test_errors_match_torch(make, kw):
    assert _raised(lambda: twins.spectral_norm(make(), **kw)) == _raised(
        lambda: tp.spectral_norm(make(), **kw)
    )


def test_result_has_unit_spectral_norm():
    torch.manual_seed(0)
    m = nn.Linear(20, 30, dtype=torch.float64)
    with torch.no_grad():
        m.weight[0] *= 10  # a clear gap between the two largest singular values
    twins.spectral_norm(m, n_power_iterations=20)
    W = m.weight.detach()
    sigma = torch.linalg.matrix_norm(W, 2)
    assert abs(sigma.item() - 1.0) <= 1e-8


@pytest.mark.parametrize("kind", ["linear", "conv2d", "vector"])
def test_fast_read_equals_torch_and_steps_aside_for_hooks_and_cached(kind):
    m_t, m_d = _pair(MODULES[kind][0])
    assert type(m_d).__dict__["weight"].fget._dtriv_fast_read
    for train in (True, False):
        m_t.train(train)
        m_d.train(train)
        assert torch.equal(m_d.weight, m_t.weight)
    seen = []
    handle = m_d.parametrizations.weight[0].register_forward_hook(lambda *_: seen.append(1))
    assert torch.equal(m_d.weight, m_t.weight)
    assert seen == [1]
    handle.remove()
    with parametrize.cached():
        assert m_d.weight is m_d.weight


# --- the fused W / sigma node: in-place edits, sparse gradients, torch.func transforms ---

F64 = {
    "linear": lambda: nn.Linear(4, 3, dtype=torch.float64),
    "conv2d": lambda: nn.Conv2d(2, 3, 2, dtype=torch.float64),  # W reshaped to (3, 8)
}
KEY = "parametrizations.weight.original"


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("train", [True, False])
def test_in_place_edit_of_the_read_weight_then_backward(kind, train):
    # w = m.weight; w.mul_(mask): the node must not have saved its output
    m_t, m_d = _pair(MODULES[kind][0])
    C = torch.randn(m_t.parametrizations.weight.original.shape,
                    generator=torch.Generator().manual_seed(2))
    for m in (m_t, m_d):
        m.train(train)
        w = m.weight
        w.mul_(2).clamp_(-0.1, 0.1)
        (w * C).sum().backward()
    assert _err(m_d.weight, m_t.weight) <= 1e-6
    g_t = m_t.parametrizations.weight.original.grad
    g_d = m_d.parametrizations.weight.original.grad
    assert _err(g_d, g_t) <= 1e-6


@pytest.mark.parametrize("train", [True, False])
def test_sparse_embedding_gradient_is_torchs(train):
    # nn.Embedding(sparse=True) hands the node a sparse (uncoalesced) gradient
    m_t, m_d = _pair(lambda: nn.Embedding(6, 4, sparse=True))
    idx = torch.tensor([1, 3, 3, 0])
    for m in (m_t, m_d):
        m.train(train)
        m(idx).pow(2).sum().backward()
    g_t = m_t.parametrizations.weight.original.grad
    g_d = m_d.parametrizations.weight.original.grad
    assert g_d.layout == g_t.layout == torch.strided
    assert _err(g_d, g_t) <= 1e-6


def _functional(make, train, fn):
    torch.manual_seed(0)
    m = fn(make()).train(train)
    params = {k: p.detach() for k, p in m.named_parameters()}
    buffers = dict(m.named_buffers())
    x = torch.randn((5, 4) if isinstance(m, nn.Linear) else (5, 2, 3, 3),
                    dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(W, xi):
        return (torch.func.functional_call(m, {**params, **buffers, KEY: W}, (xi,)) ** 2).sum()

    return m, params[KEY] + 0.1, x, loss


def _both(make, train, transform):
    """``transform(loss, W, x)`` with torch's spectral_norm and with the twin, and the buffers."""
    out = []
    for fn in (tp.spectral_norm, twins.spectral_norm):
        m, W, x, loss = _functional(make, train, fn)
        out.append((transform(loss, W, x), dict(m.named_buffers())))
    return out


def _close(a, b):
    return all(_err(p, q) <= 1e-10 for p, q in zip(torch.utils._pytree.tree_leaves(a),
                                                    torch.utils._pytree.tree_leaves(b)))


def _per_sample_grads(loss, W, x):
    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(W, x)


@pytest.mark.parametrize("kind", list(F64))
@pytest.mark.parametrize("train", [True, False])
def test_per_sample_gradients_are_torchs(kind, train):
    (g_t, buf_t), (g_d, buf_d) = _both(F64[kind], train, _per_sample_grads)
    assert g_d.shape == (5, *F64[kind]().weight.shape)
    assert _close(g_d, g_t)
    for key, val in buf_t.items():  # in training mode both took one power step, in place
        assert _err(buf_d[key], val) <= 1e-12, key


@pytest.mark.parametrize("kind", list(F64))
def test_eval_jvp_hessian_and_vmap_over_weights_are_torchs(kind):
    def jvp(loss, W, x):
        dW = torch.randn(W.shape, dtype=W.dtype, generator=torch.Generator().manual_seed(3))
        return torch.func.jvp(lambda W: loss(W, x), (W,), (dW,))

    def hessian(loss, W, x):
        return torch.func.hessian(loss)(W, x)

    def vmap_weights(loss, W, x):
        Ws = torch.stack([W, 2 * W - 0.3])
        return torch.func.vmap(lambda W: loss(W, x))(Ws), torch.func.vmap(torch.func.grad(
            loss), in_dims=(0, None))(Ws, x)

    for transform in (jvp, hessian, vmap_weights):
        (a, _), (b, _) = _both(F64[kind], False, transform)
        assert _close(b, a), transform.__name__


def test_train_jvp_equals_torchs_eager_step_then_eval_jvp():
    # torch's forward AD fails in training mode (an out= power step); the twin takes the same
    # power step and differentiates W / sigma at the new u, v, as torch does in eval mode
    make = F64["conv2d"]
    m_d, W, x, loss_d = _functional(make, True, twins.spectral_norm)
    m_t, _, _, loss_t = _functional(make, True, tp.spectral_norm)
    dW = torch.randn(W.shape, dtype=W.dtype, generator=torch.Generator().manual_seed(3))
    value_d, tangent_d = torch.func.jvp(lambda W: loss_d(W, x), (W,), (dW,))
    loss_t(W, x)  # torch's power step, eagerly
    m_t.eval()
    value_t, tangent_t = torch.func.jvp(lambda W: loss_t(W, x), (W,), (dW,))
    assert _err(value_d, value_t) <= 1e-12
    assert _err(tangent_d, tangent_t) <= 1e-10
    for key, val in m_t.state_dict().items():
        assert _err(m_d.state_dict()[key], val) <= 1e-12, key


def test_train_vmap_over_weights_raises_a_clear_error_as_torch_raises():
    # one _u, _v cannot be refined in place for a batch of weights
    def over_weights(loss, W, x):
        return torch.func.vmap(loss, in_dims=(0, None))(torch.stack([W, 2 * W]), x)

    for fn in (tp.spectral_norm, twins.spectral_norm):
        m, W, x, loss = _functional(F64["linear"], True, fn)
        with pytest.raises(RuntimeError) as info:
            over_weights(loss, W, x)
    assert "eval()" in str(info.value) and "vmap" in str(info.value)
    m.eval()
    assert over_weights(loss, W, x).shape == (2,)  # the advice works
