"""Shared helpers for the parametrization tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture
def weight_holder():
    """``weight_holder(shape, seed=0)``: a module holding one float64 parameter ``weight`` of
    that shape, drawn from a standard normal with ``seed``."""

    def make(shape, seed: int = 0) -> nn.Module:
        module = nn.Module()
        g = torch.Generator().manual_seed(seed)
        module.weight = nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
        return module

    return make
