"""Helpers of ``dtriv.retractions._common`` against the torch operations they replace."""

from __future__ import annotations

import pytest
import torch

from dtriv.retractions._common import tril_copy


@pytest.mark.parametrize("shape", [(5, 5), (7, 3), (3, 7), (2, 6, 4), (130, 129), (0, 3)])
@pytest.mark.parametrize("diagonal", [-2, -1, 0, 1])
def test_tril_copy_equals_torch_tril(shape, diagonal):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(shape, generator=g, dtype=torch.float64)
    for view in (X, X.mT, X[..., ::2, :]):  # contiguous, transposed, strided rows
        got = tril_copy(view, diagonal)
        assert torch.equal(got, torch.tril(view, diagonal))
        assert got.is_contiguous() and (view.numel() == 0 or got.data_ptr() != view.data_ptr())


def test_tril_copy_under_vmap_is_torchs():
    X = torch.randn(3, 6, 4, dtype=torch.float64)
    got = torch.func.vmap(lambda x: tril_copy(x, -1))(X)
    assert torch.equal(got, X.tril(-1))
