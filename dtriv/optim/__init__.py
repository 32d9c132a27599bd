"""Training on manifolds: the dynamic-trivialization wrapper and Riemannian optimizers.

* :class:`DynamicTrivialization` wraps any :class:`torch.optim.Optimizer` and refreshes the
  bases of the trivializations it optimises every ``K`` steps (dtriv's, torch's
  ``orthogonal`` and geotorch's constraints).
* :class:`ManifoldParameter` is a parameter that carries its manifold;
  :class:`RiemannianSGD` and :class:`RiemannianAdam` optimise such parameters (and plain
  ones, with the torch update) by Riemannian gradient, retraction and vector transport.
"""

from .parameter import ManifoldParameter
from .radam import RiemannianAdam
from .rsgd import RiemannianSGD
from .targets import Target, find_targets
from .wrapper import DynamicTrivialization, NonFiniteGradientError

__all__ = [
    "DynamicTrivialization",
    "ManifoldParameter",
    "NonFiniteGradientError",
    "RiemannianAdam",
    "RiemannianSGD",
    "Target",
    "find_targets",
]
