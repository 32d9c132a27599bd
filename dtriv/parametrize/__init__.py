"""The engine: tensors constrained to manifolds by (dynamic) trivializations.

Built on :mod:`torch.nn.utils.parametrize` (property injection, caching and removal are
torch's), this package adds

* :class:`Trivialization`: ``X -> retract(base, tangent(base, X))`` with a ``base`` buffer,
  assignment through ``right_inverse`` and an in-place ``refresh``;
* :func:`constrain` and the shortcuts :func:`sphere`, :func:`spectrally_bounded`;
  :func:`trivializations` and :func:`refresh` over a whole model;
* once per forward by default: dtriv's parametrizations memoize their value until the
  parameter or base changes or backward consumes its graph (:class:`ForwardMemo`;
  :func:`memoize` turns it off); :func:`cache_per_forward` does the same for any
  parametrization through torch's ``cached()``;
* drop-in twins of :mod:`torch.nn.utils.parametrizations`: :func:`orthogonal`,
  :func:`spectral_norm`, :func:`weight_norm` (and :func:`weight_norm_init_`);
* torch's :func:`register_parametrization` (which names the tensor in a
  :class:`Trivialization`'s errors), :func:`remove_parametrizations`, :func:`cached` and
  :func:`is_parametrized`, so that one import serves the workflow of PyTorch's
  parametrizations tutorial.
"""

from dtriv.parametrize.cache import (
    CachePerForward,
    ForwardMemo,
    cache_per_forward,
    cached,
    is_parametrized,
    memoize,
    remove_parametrizations,
)
from dtriv.parametrize.constrain import (
    constrain,
    refresh,
    register_parametrization,
    spectrally_bounded,
    sphere,
    trivializations,
)
from dtriv.parametrize.trivialization import Trivialization
from dtriv.parametrize.twins import orthogonal, spectral_norm, weight_norm, weight_norm_init_

__all__ = [
    "CachePerForward",
    "ForwardMemo",
    "Trivialization",
    "cache_per_forward",
    "cached",
    "constrain",
    "is_parametrized",
    "memoize",
    "orthogonal",
    "refresh",
    "register_parametrization",
    "remove_parametrizations",
    "spectral_norm",
    "spectrally_bounded",
    "sphere",
    "trivializations",
    "weight_norm",
    "weight_norm_init_",
]
