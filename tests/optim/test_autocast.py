"""Optimizer steps and base refreshes called inside ``torch.autocast``: they run with autocast
off, so they equal the same calls outside it, bit for bit (they crashed, or computed the new
points in bfloat16: an orthonormality error of 1e-2, a refresh that moved the weight)."""

from __future__ import annotations

import pytest
import torch

import dtriv
from dtriv.manifolds import Stiefel
from dtriv.optim import DynamicTrivialization, ManifoldParameter, RiemannianAdam, RiemannianSGD
from dtriv.parametrize import twins


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


@pytest.mark.parametrize("cls", [RiemannianAdam, RiemannianSGD])
def test_riemannian_step_inside_autocast(cls):
    points = {}
    for inside in (False, True):
        torch.manual_seed(0)
        p = ManifoldParameter(torch.linalg.qr(torch.randn(32, 16))[0], Stiefel(32, 16))
        opt = cls([p], lr=1e-2, **({"momentum": 0.9} if cls is RiemannianSGD else {}))
        for _ in range(5):
            opt.zero_grad()
            (torch.randn(4, 32) @ p).pow(2).sum().backward()
            with _autocast(inside):
                opt.step()
        points[inside] = p.detach().clone()
    assert torch.equal(points[True], points[False])


@pytest.mark.parametrize("setup", ["constrain", "twin", "torch"])
def test_wrapper_refresh_inside_autocast(setup):
    make = {"constrain": lambda m: dtriv.constrain(m, "weight", Stiefel(16, 16)),
            "twin": lambda m: twins.orthogonal(m),
            "torch": lambda m: torch.nn.utils.parametrizations.orthogonal(m)}[setup]
    weights = {}
    for inside in (False, True):
        torch.manual_seed(0)
        lin = torch.nn.Linear(16, 16)
        make(lin)
        opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=0.05), K=1, modules=lin)
        for _ in range(5):
            opt.zero_grad()
            lin(torch.randn(8, 16)).pow(2).sum().backward()
            with _autocast(inside):
                opt.step()
        weights[inside] = lin.weight.detach().clone()
    assert torch.equal(weights[True], weights[False])
    W = weights[True]
    assert (W.T @ W - torch.eye(16)).abs().max() < 1e-5


def test_refresh_inside_autocast_keeps_the_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    twins.orthogonal(lin)
    with torch.no_grad():
        lin.parametrizations.weight.original.normal_(0, 0.1)
    before = lin.weight.detach().clone()
    with _autocast(True):
        dtriv.refresh(lin)
    assert (lin.weight.detach() - before).abs().max() < 1e-6
