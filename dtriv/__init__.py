"""dtriv: optimization on manifolds for PyTorch.

Layers, each importing only those before it:

* :mod:`dtriv.retractions` -- pure batched maps (``expm``, ``cayley``, Stiefel retractions, ...);
* :mod:`dtriv.manifolds` -- ``Sphere``, ``Stiefel`` (orthogonal/unitary group),
  ``SpectrallyBounded``;
* :mod:`dtriv.parametrize` -- ``constrain`` any module parameter through a (dynamic)
  trivialization; drop-in ``orthogonal``, ``spectral_norm``, ``weight_norm``;
* :mod:`dtriv.optim` -- ``DynamicTrivialization`` (refresh the bases every K steps),
  ``RiemannianSGD``, ``RiemannianAdam``.

The most used names are re-exported here.
"""

from dtriv import manifolds, optim, parametrize, retractions
from dtriv.manifolds import (
    Manifold,
    Orthogonal,
    SpecialOrthogonal,
    SpectrallyBounded,
    Sphere,
    Stiefel,
)
from dtriv.optim import (
    DynamicTrivialization,
    ManifoldParameter,
    RiemannianAdam,
    RiemannianSGD,
)
from dtriv.parametrize import (
    Trivialization,
    cache_per_forward,
    cached,
    constrain,
    is_parametrized,
    orthogonal,
    refresh,
    register_parametrization,
    remove_parametrizations,
    spectral_norm,
    spectrally_bounded,
    sphere,
    trivializations,
    weight_norm,
    weight_norm_init_,
)

__version__ = "0.1.0"

__all__ = [
    "DynamicTrivialization",
    "Manifold",
    "ManifoldParameter",
    "Orthogonal",
    "RiemannianAdam",
    "RiemannianSGD",
    "SpecialOrthogonal",
    "SpectrallyBounded",
    "Sphere",
    "Stiefel",
    "Trivialization",
    "cache_per_forward",
    "cached",
    "constrain",
    "is_parametrized",
    "manifolds",
    "optim",
    "orthogonal",
    "parametrize",
    "refresh",
    "register_parametrization",
    "remove_parametrizations",
    "retractions",
    "spectral_norm",
    "spectrally_bounded",
    "sphere",
    "trivializations",
    "weight_norm",
    "weight_norm_init_",
]
