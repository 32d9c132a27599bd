"""Shared fixtures of the manifold tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator, so that every test is deterministic."""
    return torch.Generator().manual_seed(1234)
