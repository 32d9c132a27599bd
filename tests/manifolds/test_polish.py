"""Manifold.polish: a cheap correction that squares the constraint error of nearby points."""

import pytest
import torch

from dtriv.manifolds import SpecialOrthogonal, Sphere, Stiefel


@pytest.mark.parametrize("shape", [(30, 30), (40, 6), (6, 40)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_stiefel_polish_squares_the_error_and_stays_near_the_polar_factor(shape, dtype):
    g = torch.Generator().manual_seed(0)
    M = Stiefel(*shape)
    Q = M.sample(generator=g, dtype=dtype)
    for size in (1e-3, 1e-5):
        X = Q + size * torch.randn(shape, generator=g, dtype=dtype)
        before = float(M.distance(X))
        P = M.polish(X)
        after = float(M.distance(P))
        assert after < 10 * before**2 + 1e-13
        # one step lands next to the nearest point (the polar factor), not anywhere
        assert float((P - M.project(X)).abs().max()) < 10 * before**2 + 1e-13


def test_stiefel_polish_projects_far_points_and_keeps_so():
    g = torch.Generator().manual_seed(1)
    M = SpecialOrthogonal(5)
    X = M.sample(generator=g, dtype=torch.float64) + 0.5 * torch.randn(5, 5, generator=g,
                                                                        dtype=torch.float64)
    assert M.check(M.polish(X))
    torch.testing.assert_close(M.polish(X), M.project(X))


def test_sphere_polish_normalizes():
    x = torch.tensor([3.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(Sphere(2, radius=2.0).polish(x), torch.tensor([1.2, 1.6],
                                                                            dtype=torch.float64))


def test_stiefel_polish_empty_batch():
    X = torch.zeros(0, 3, 2)
    assert Stiefel(3, 2).polish(X).shape == (0, 3, 2)
