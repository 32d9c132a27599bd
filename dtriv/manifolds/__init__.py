"""Manifolds: sets of tensors of one shape with their geometry (embedded metric).

Each manifold describes points, tangent projections, retractions (by name), vector
transport by projection, membership checks and uniform sampling; it holds no data.
"""

from dtriv.manifolds.base import Manifold
from dtriv.manifolds.spectral import SpectrallyBounded
from dtriv.manifolds.sphere import Sphere
from dtriv.manifolds.stiefel import Orthogonal, SpecialOrthogonal, Stiefel, generator_init

__all__ = [
    "Manifold",
    "Orthogonal",
    "SpecialOrthogonal",
    "SpectrallyBounded",
    "Sphere",
    "Stiefel",
    "generator_init",
]
