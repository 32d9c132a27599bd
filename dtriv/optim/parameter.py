"""A parameter that lives on a manifold.

:class:`ManifoldParameter` is an :class:`torch.nn.Parameter` that carries the
:class:`~dtriv.manifolds.Manifold` it belongs to. Modules register it like any parameter;
:class:`~dtriv.optim.RiemannianSGD` and :class:`~dtriv.optim.RiemannianAdam` read its
``manifold`` to take Riemannian steps (tangent projection of the gradient, retraction,
vector transport of the momentum), while plain parameters in the same groups get the
Euclidean update.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dtriv.manifolds.base import Manifold

__all__ = ["ManifoldParameter", "is_manifold_parameter", "manifold_of"]


def _rebuild_manifold_parameter(data: Tensor, manifold: Manifold, requires_grad: bool):
    return ManifoldParameter(data, manifold, requires_grad=requires_grad, check=False)


class ManifoldParameter(nn.Parameter):
    r"""An :class:`torch.nn.Parameter` constrained to ``manifold``.

    Args:
        data: the initial value, of shape ``(*batch, *manifold.shape)`` (leading batch
            dimensions are independent points of the manifold).
        manifold: a :class:`~dtriv.manifolds.Manifold`.
        requires_grad: as for :class:`torch.nn.Parameter`. Default: ``True``.
        project: replace ``data`` by its nearest point ``manifold.project(data)`` instead of
            rejecting it when it is off the manifold. Default: ``False``.
        atol: the tolerance of the membership check (default ``manifold.tolerance``).
        check: check membership at all. Default: ``True``.

    Raises:
        ValueError: when ``data`` has the wrong shape, or is off the manifold (constraint
            error above ``atol``) and ``project`` is false; the message states the
            constraint and its error.

    The check costs one evaluation of the constraints (``X^H X - I`` for Stiefel:
    O(n k^2)); the projection, when asked for, one polar decomposition or normalisation.

    The manifold lives on this object. Operations that replace a module's parameters by new
    plain ``Parameter`` objects drop it (as they drop geoopt's): ``module.to("meta")`` then
    ``to_empty``, ``load_state_dict(..., assign=True)``, and module conversions under
    ``torch.__future__.set_swap_module_params_on_conversion(True)``; the Riemannian
    optimizers then treat the new parameter as Euclidean. Wrap it again afterwards
    (``module.weight = ManifoldParameter(module.weight.data, manifold)``), or load values
    in place (``load_state_dict`` without ``assign``).
    """

    manifold: Manifold

    def __new__(
        cls,
        data: Tensor | None = None,
        manifold: Manifold | None = None,
        requires_grad: bool = True,
        *,
        project: bool = False,
        atol: float | None = None,
        check: bool = True,
    ):
        if not isinstance(manifold, Manifold):
            raise TypeError(
                "manifold: expected a dtriv.manifolds.Manifold, "
                f"got {type(manifold).__name__}"
            )
        if data is None:
            data = manifold.sample()
        if not isinstance(data, Tensor):
            raise TypeError(f"data: expected a torch.Tensor, got {type(data).__name__}")
        data = data.detach()
        manifold.validate(data, "data")
        if check:
            ok, reason = manifold.check(data, atol=atol, explain=True)
            if not ok:
                if not project:
                    raise ValueError(
                        f"data: expected a point of {manifold!r}, got one off it ({reason}); "
                        "pass project=True to use its nearest point instead"
                    )
                with torch.no_grad():
                    data = manifold.project(data)
        instance = torch.Tensor._make_subclass(cls, data, requires_grad)
        instance.manifold = manifold
        return instance

    def __init__(self, *args, **kwargs) -> None:  # arguments are consumed by __new__
        pass

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = type(self)(
            self.data.clone(memory_format=torch.preserve_format),
            self.manifold,
            self.requires_grad,
            check=False,
        )
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto):
        return (_rebuild_manifold_parameter, (self.data, self.manifold, self.requires_grad))

    def __repr__(self) -> str:
        return f"ManifoldParameter on {self.manifold!r} containing:\n" + torch.Tensor.__repr__(
            self.data
        )


def manifold_of(p: Tensor) -> Manifold | None:
    """The dtriv manifold a parameter lives on, or ``None`` for a Euclidean one.

    A tensor with a ``manifold`` attribute that is not a dtriv manifold (e.g. a geoopt
    parameter) raises ``ValueError`` rather than being silently treated as Euclidean.
    """
    manifold = getattr(p, "manifold", None)
    if manifold is None:
        return None
    if not isinstance(manifold, Manifold):
        raise ValueError(
            "params: expected plain tensors or dtriv ManifoldParameters, got a tensor whose "
            f"manifold is a {type(manifold).__module__}.{type(manifold).__name__}"
        )
    return manifold


def is_manifold_parameter(p: Tensor) -> bool:
    """Whether ``p`` carries a dtriv manifold."""
    return manifold_of(p) is not None
