"""Retractions: pure, batched, differentiable maps onto manifolds, selected by name.

* Lie-algebra maps (skew-Hermitian -> orthogonal/unitary): :func:`expm`, :func:`cayley`,
  :func:`householder` and their inverses :func:`logm`, :func:`cayley_inverse`,
  :func:`householder_inverse`.
* Stiefel retractions at a base point, all :math:`O(nk^2)`: :func:`stiefel_qr`,
  :func:`stiefel_polar`, :func:`stiefel_polar_newton_schulz`, :func:`stiefel_cayley`,
  :func:`stiefel_exp`, :func:`stiefel_exp_canonical`.
* Sphere: :func:`sphere_exp`, :func:`sphere_log`, :func:`sphere_projective`,
  :func:`sphere_projective_inverse`.
* Spectral: :func:`power_iteration_init`, :func:`power_iteration_`,
  :func:`spectral_norm_estimate`, :func:`clip_singular_values`.

Importing this package registers the maps: ``get(kind, name)`` returns an :class:`Entry`
with the map and its inverse, ``available(kind)`` lists the names.

The reverse passes of :func:`expm` and of the Cayley map of skew parts keep their temporary
matrices for the next call of the same thread (CPU, at most ``_scratch.MAX_BYTES`` = 64 MiB
per thread); :func:`clear_scratch` frees them.
"""

from __future__ import annotations

from ._common import skew, sym
from ._scratch import clear as clear_scratch
from .householder import householder, householder_inverse
from .lie import cayley, cayley_inverse, expm, logm
from .registry import KINDS, Entry, available, get, register
from .spectral import (
    clip_singular_values,
    power_iteration_,
    power_iteration_init,
    spectral_norm_estimate,
)
from .sphere import sphere_exp, sphere_log, sphere_projective, sphere_projective_inverse
from .stiefel import (
    polar_factor,
    special_polar_factor,
    stiefel_cayley,
    stiefel_exp,
    stiefel_exp_canonical,
    stiefel_polar,
    stiefel_polar_inverse,
    stiefel_polar_newton_schulz,
    stiefel_qr,
    stiefel_qr_inverse,
)

__all__ = [
    # registry
    "KINDS",
    "Entry",
    "available",
    "get",
    "register",
    # helpers
    "clear_scratch",
    "skew",
    "sym",
    # Lie-algebra maps
    "expm",
    "logm",
    "cayley",
    "cayley_inverse",
    "householder",
    "householder_inverse",
    # Stiefel
    "polar_factor",
    "special_polar_factor",
    "stiefel_qr",
    "stiefel_qr_inverse",
    "stiefel_polar",
    "stiefel_polar_inverse",
    "stiefel_polar_newton_schulz",
    "stiefel_cayley",
    "stiefel_exp",
    "stiefel_exp_canonical",
    # sphere
    "sphere_exp",
    "sphere_log",
    "sphere_projective",
    "sphere_projective_inverse",
    # spectral
    "power_iteration_init",
    "power_iteration_",
    "spectral_norm_estimate",
    "clip_singular_values",
]
