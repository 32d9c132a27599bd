"""The spectral_norm twin's fused ``W / sigma`` node against torch and the plain formula."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils import parametrizations as tp

from dtriv.parametrize import twins
from dtriv.parametrize.twins._spectral_norm import _DivideBySigma


def test_forward_is_torch_bit_for_bit_and_gradients_agree():
    for make in (lambda: nn.Linear(40, 30), lambda: nn.Conv2d(6, 8, 3)):
        mods = []
        for fn in (tp.spectral_norm, twins.spectral_norm):
            torch.manual_seed(0)
            mods.append(fn(make()))
        C = torch.randn(mods[0].parametrizations.weight.original.shape)
        for train in (True, True, False):
            for m in mods:
                m.train(train)
                m.zero_grad()
            w_t, w_d = mods[0].weight, mods[1].weight
            assert torch.equal(w_d, w_t)
            (w_t * C).sum().backward()
            (w_d * C).sum().backward()
            g_t = mods[0].parametrizations.weight.original.grad
            g_d = mods[1].parametrizations.weight.original.grad
            assert (g_d - g_t).abs().max() <= 1e-5 * g_t.abs().max()


def _plain(W, u, v):
    return W / torch.vdot(u, W.reshape(u.shape[0], -1) @ v)


def test_equals_the_formula_with_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    u = torch.randn(5, dtype=torch.float64, generator=g)
    v = torch.randn(6, dtype=torch.float64, generator=g)
    a, b = _DivideBySigma.apply(W, u, v)[0], _plain(W, u, v)
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    G = torch.randn(a.shape, dtype=torch.float64, generator=g)
    (ga,) = torch.autograd.grad(a, W, G)
    (gb,) = torch.autograd.grad(b, W, G)
    assert torch.allclose(ga, gb, atol=1e-12, rtol=0)
    f = lambda W: _DivideBySigma.apply(W, u, v)[0]  # noqa: E731
    assert gradcheck(f, (W,))
    assert gradgradcheck(f, (W,))


def test_jvp_vmap_and_forward_over_reverse_with_gradcheck_in_float64():
    # the jvp dY = (dW - (u^T dW v) Y)/sigma, the generated vmap rule (batched gradients) and
    # forward-over-reverse (hessians) against finite differences
    g = torch.Generator().manual_seed(2)
    W = torch.randn(4, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    u = torch.randn(4, dtype=torch.float64, generator=g)
    v = torch.randn(6, dtype=torch.float64, generator=g)
    f = lambda W: _DivideBySigma.apply(W, u, v)[0]  # noqa: E731
    assert gradcheck(f, (W,), check_forward_ad=True, check_batched_grad=True,
                     check_batched_forward_grad=True)
    assert gradgradcheck(f, (W,), check_fwd_over_rev=True, check_batched_grad=True)
    dW = torch.randn(W.shape, dtype=torch.float64, generator=g)
    _, tangent = torch.func.jvp(f, (W.detach(),), (dW,))
    _, expected = torch.func.jvp(lambda W: _plain(W, u, v), (W.detach(),), (dW,))
    assert torch.allclose(tangent, expected, atol=1e-12, rtol=0)


def test_reads_that_record_no_derivative_skip_the_node_and_equal_torch(monkeypatch):
    # under no_grad, inference_mode, or for a frozen weight, the value is computed by the
    # node's forward operations alone (no node, no copies of u, v), bit for bit torch's
    import dtriv.parametrize.twins._spectral_norm as sn_module

    def no_node(*args):
        raise AssertionError("the W / sigma node ran for a read that records no derivative")

    for make in (lambda: nn.Linear(40, 30), lambda: nn.Conv2d(6, 8, 3)):
        mods = []
        for fn in (tp.spectral_norm, twins.spectral_norm):
            torch.manual_seed(0)
            mods.append(fn(make()))
        for train in (True, False):
            for m in mods:
                m.train(train)
            for context in (torch.no_grad, torch.inference_mode):
                with monkeypatch.context() as patch, context():
                    patch.setattr(sn_module, "_divide_by_sigma", no_node)
                    w_d = mods[1].weight
                    w_t = mods[0].weight
                assert torch.equal(w_d, w_t) and not w_d.requires_grad
            for m in mods:
                m.parametrizations.weight.original.requires_grad_(False)
            with monkeypatch.context() as patch:
                patch.setattr(sn_module, "_divide_by_sigma", no_node)
                w_d = mods[1].weight
            assert torch.equal(w_d, mods[0].weight) and w_d.grad_fn is None
            for m in mods:
                m.parametrizations.weight.original.requires_grad_(True)
            # a read that records takes the node again (both read: a read in training mode
            # steps the buffers)
            w_d, w_t = mods[1].weight, mods[0].weight
            assert type(w_d.grad_fn).__name__ == "_DivideBySigmaBackward"
            assert torch.equal(w_d, w_t)
