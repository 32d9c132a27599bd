"""The weight_norm twin against torch.nn.utils.parametrizations.weight_norm; its init."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as tp
from torch.nn.utils import parametrize

from dtriv.parametrize import twins

MODULES = {
    "linear": (lambda: nn.Linear(5, 7), (3, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
}


def _pair(make, seed=0, **kw):
    out = []
    for fn in (tp.weight_norm, twins.weight_norm):
        torch.manual_seed(seed)
        m = make()
        fn(m, **kw)
        out.append(m)
    return out


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


@pytest.mark.parametrize("kind", list(MODULES))
def test_parity_with_torch(kind):
    for dim in [0, 1, None, -1]:
        _check_parity(kind, dim)


def _check_parity(kind, dim):
    make, in_shape = MODULES[kind]
    m_t, m_d = _pair(make, dim=dim)
    assert m_t.state_dict().keys() == m_d.state_dict().keys()
    for key, val in m_t.state_dict().items():
        assert torch.equal(m_d.state_dict()[key], val), key
    assert torch.equal(m_d.weight, m_t.weight)
    x = torch.randn(in_shape, generator=torch.Generator().manual_seed(1))
    for m in (m_t, m_d):
        for _ in range(2):
            m.zero_grad()
            (m(x) ** 2).mean().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
    for i in (0, 1):
        g_t = getattr(m_t.parametrizations.weight, f"original{i}").grad
        g_d = getattr(m_d.parametrizations.weight, f"original{i}").grad
        assert _err(g_d, g_t) <= 1e-6
    assert _err(m_d.weight, m_t.weight) <= 1e-6


def test_weight_is_g_times_direction():
    torch.manual_seed(0)
    m = twins.weight_norm(nn.Linear(4, 3, dtype=torch.float64), dim=0)
    g = m.parametrizations.weight.original0
    v = m.parametrizations.weight.original1
    with torch.no_grad():
        g.mul_(2.0)
    expected = g * v / v.norm(dim=1, keepdim=True)
    assert torch.allclose(m.weight, expected, atol=1e-14)


@pytest.mark.parametrize("dim", [0, None])
def test_state_dicts_load_both_ways(dim):
    src_t, src_d = _pair(lambda: nn.Conv2d(3, 4, 3), seed=0, dim=dim)
    dst_t, dst_d = _pair(lambda: nn.Conv2d(3, 4, 3), seed=1, dim=dim)
    assert _err(dst_d.weight, src_t.weight) > 1e-3
    dst_d.load_state_dict(src_t.state_dict())
    dst_t.load_state_dict(src_d.state_dict())
    assert torch.equal(dst_d.weight, src_t.weight)
    assert torch.equal(dst_t.weight, src_d.weight)


@pytest.mark.parametrize("dim", [0, 1])
def test_legacy_g_v_keys_load(dim):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = nn.utils.weight_norm(nn.Linear(5, 7), dim=dim)
    with torch.no_grad():
        old.weight_g.mul_(1.5)
    x = torch.randn(3, 5)
    expected = old(x)
    sd = old.state_dict()
    assert {"weight_g", "weight_v"} <= sd.keys()
    torch.manual_seed(1)
    new = twins.weight_norm(nn.Linear(5, 7), dim=dim)
    new.load_state_dict(sd)  # strict
    assert _err(new(x), expected) <= 1e-6


def test_legacy_keys_of_a_submodule_load():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = nn.Sequential(nn.Linear(3, 3), nn.utils.weight_norm(nn.Linear(3, 2)))
    new = nn.Sequential(nn.Linear(3, 3), twins.weight_norm(nn.Linear(3, 2)))
    new.load_state_dict(old.state_dict())
    x = torch.randn(4, 3)
    assert _err(new(x), old(x)) <= 1e-6


def _raised(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("kw", [{"name": "nonexistent"}, {"dim": 5}])
def test_errors_match_torch(kw):
    assert _raised(lambda: twins.weight_norm(nn.Linear(3, 4), **kw)) == _raised(
        lambda: tp.weight_norm(nn.Linear(3, 4), **kw)
    )


@pytest.mark.parametrize(
    "make, in_shape",
    [
        (lambda: nn.Linear(10, 6), (256, 10)),
        (lambda: nn.Linear(10, 6), (16, 8, 10)),
        (lambda: nn.Conv2d(3, 5, 3), (32, 3, 8, 8)),
        (lambda: nn.Conv1d(2, 4, 3, bias=False), (16, 2, 20)),
    ],
)
def test_weight_norm_init_standardizes_outputs(make, in_shape):
    torch.manual_seed(0)
    m = twins.weight_norm(make())
    x = 3.0 * torch.randn(in_shape) + 1.0
    twins.weight_norm_init_(m, x)
    unit_dim = -1 if isinstance(m, nn.Linear) else 1
    y = m(x).detach().movedim(unit_dim, -1)
    y = y.reshape(-1, y.size(-1))
    assert torch.allclose(y.std(0, correction=0), torch.ones(y.size(-1)), atol=1e-4)
    if m.bias is not None:
        assert y.mean(0).abs().max() <= 1e-4
    # the weight direction is untouched, the norms are 1/std of the pre-activations
    assert torch.allclose(m.weight.flatten(1).norm(dim=1),
                          m.parametrizations.weight.original0.flatten().abs(), atol=1e-6)


def test_weight_norm_init_errors():
    with pytest.raises(ValueError, match="weight_norm"):
        twins.weight_norm_init_(nn.Linear(3, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match="weight_norm"):
        twins.weight_norm_init_(twins.weight_norm(nn.Linear(3, 2), dim=1), torch.randn(4, 3))
    with pytest.raises(ValueError, match="nn.Linear"):
        twins.weight_norm_init_(twins.weight_norm(nn.GRUCell(3, 2), name="weight_ih"),
                                torch.randn(4, 3))


def test_fast_read_equals_torch_and_steps_aside_for_hooks_and_cached():
    m_t, m_d = _pair(MODULES["conv2d"][0])
    assert type(m_d).__dict__["weight"].fget._dtriv_fast_read
    assert torch.equal(m_d.weight, m_t.weight)
    seen = []
    handle = m_d.parametrizations.weight[0].register_forward_hook(lambda *_: seen.append(1))
    assert torch.equal(m_d.weight, m_t.weight)
    assert seen == [1]
    handle.remove()
    with parametrize.cached():  # torch's cache: one value per block
        assert m_d.weight is m_d.weight
    parametrize.remove_parametrizations(m_d, "weight")
    assert torch.equal(m_d.weight, m_t.weight.detach())
