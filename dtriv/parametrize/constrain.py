"""Constrain a tensor of a module to a manifold, and find or refresh the trivializations.

:func:`constrain` registers a :class:`~dtriv.parametrize.Trivialization` with
:func:`torch.nn.utils.parametrize.register_parametrization`: afterwards ``module.<name>``
is computed from ``module.parametrizations.<name>.original`` (the free tensor an optimizer
trains) and always lies on the manifold. :func:`sphere` and :func:`spectrally_bounded` pick
the manifold from the tensor's shape. :func:`trivializations` finds every dynamic
trivialization of a model and :func:`refresh` refreshes them all.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import is_parametrized
from torch.nn.utils.parametrize import register_parametrization as _torch_register

from dtriv.manifolds import Manifold, SpectrallyBounded, Sphere
from dtriv.parametrize.cache import check_model, clear_memos_on_load, install_fast_read
from dtriv.parametrize.trivialization import Trivialization, _Link
from dtriv.retractions._common import without_any_autocast

__all__ = ["constrain", "sphere", "spectrally_bounded", "trivializations", "refresh"]


def _tensor(module: nn.Module, name: str) -> Tensor:
    """``module.<name>`` if it is a parameter, a buffer or a parametrized tensor.

    Otherwise the ``ValueError`` that ``register_parametrization`` raises.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if is_parametrized(module, name) or name in module._parameters or name in module._buffers:
        return getattr(module, name)
    raise ValueError(
        f"Module '{module}' does not have a parameter, a buffer, or a "
        f"parametrized element with name '{name}'"
    )


def _attach(module: nn.Module, name: str) -> None:
    """Link the first trivialization of ``module.<name>`` and its registered parameter.

    The trivialization gets a (deepcopy-aware) weak link to its ``ParametrizationList`` so
    that ``refresh()`` finds the parameter, and the parameter gets
    ``original._dtriv_trivialization``, a :class:`_Link` to the trivialization, so that an
    optimizer finds the trivialization of a parameter from its param groups (a link, not a
    ``weakref.ref``: the parameter, and an optimizer holding it, can then be pickled).
    """
    plist = module.parametrizations[name]
    first = plist[0]
    # dtriv's Trivialization, or any dynamic trivialization that follows its refresh protocol
    # (the orthogonal twin): a ``base`` buffer, ``refresh`` and a ``_owner`` link.
    follows_protocol = (
        callable(getattr(first, "refresh", None))
        and getattr(first, "base", None) is not None
        and hasattr(first, "_owner")
    )
    if isinstance(first, Trivialization) or follows_protocol:
        if first._owner() is not plist:
            first._owner = _Link(plist)
        if getattr(first, "_module", _Link())() is not module:
            first._module = _Link(module)  # to tell when it is removed (optimizer wrapper)
        if getattr(plist.original, "_dtriv_trivialization", lambda: None)() is not first:
            plist.original._dtriv_trivialization = _Link(first)


def constrain(
    module: nn.Module,
    name: str,
    manifold: Manifold,
    retraction: str | None = None,
    dynamic: bool = True,
    strict: bool = False,
    *,
    flatten: bool | None = None,
    dim: int = 0,
) -> nn.Module:
    """Constrain ``module.<name>`` to ``manifold`` by a trivialization; returns ``module``.

    The current value of the tensor is kept, projected onto the manifold when off it (it is
    never replaced by a random sample); the registered parameter
    ``module.parametrizations.<name>.original`` starts at zero and ``base`` holds the point.
    ``retraction``, ``dynamic``, ``strict``, ``flatten`` and ``dim`` are those of
    :class:`~dtriv.parametrize.Trivialization`; e.g. a conv kernel ``(out, in, kh, kw)``
    with ``Stiefel(out, in * kh * kw)`` is read as that matrix.

    Raises ``ValueError`` when the module has no such tensor (as
    ``register_parametrization`` does), when the tensor is already parametrized (a
    trivialization must be the first parametrization of its tensor), or when its shape does
    not fit the manifold (naming the expected and the actual shape).
    """
    _tensor(module, name)
    if is_parametrized(module, name):
        raise ValueError(
            f"{name}: expected a tensor that is not parametrized yet (a trivialization must be "
            f"the first parametrization of its tensor), got one parametrized by "
            f"{[type(p).__name__ for p in module.parametrizations[name]]}; call "
            "remove_parametrizations first"
        )
    trivialization = Trivialization(
        manifold, retraction, dynamic, strict, flatten=flatten, dim=dim
    )
    trivialization.tensor_name = name
    register_parametrization(module, name, trivialization)
    _attach(module, name)
    install_fast_read(module, name)  # reads served from the memo (once per forward)
    clear_memos_on_load(module, name)
    return module


def sphere(
    module: nn.Module,
    name: str = "weight",
    radius: float = 1.0,
    retraction: str | None = None,
    dynamic: bool = True,
    strict: bool = False,
    *,
    flatten: bool = False,
) -> nn.Module:
    """Constrain ``module.<name>`` to spheres of radius ``radius``; returns ``module``.

    By default each vector along the last dimension lies on the sphere (a ``Linear``
    weight ``(out, in)`` has unit-norm rows, ``Sphere(in)`` batched over ``out``); with
    ``flatten=True`` the whole tensor is one point of ``Sphere(numel)``.
    """
    tensor = _tensor(module, name)
    if tensor.ndim == 0:
        raise ValueError(f"{name}: expected a tensor with at least one dimension, got a scalar")
    n = tensor.numel() if flatten else tensor.shape[-1]
    return constrain(
        module, name, Sphere(n, radius), retraction, dynamic, strict, flatten=flatten
    )


_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def spectrally_bounded(
    module: nn.Module,
    name: str = "weight",
    upper: float = 1.0,
    lower: float = 0.0,
    retraction: str | None = None,
    dynamic: bool = True,
    strict: bool = False,
    *,
    flatten: bool | None = None,
    dim: int | None = None,
) -> nn.Module:
    """Keep the singular values of ``module.<name>`` in ``[lower, upper]``; returns ``module``.

    A matrix ``(..., n, k)`` is read batched (``flatten=False``); by default
    (``flatten=None``) a tensor of more than two dimensions is read, like ``spectral_norm``
    does, as the matrix ``size(dim) x (numel / size(dim))``, with ``spectral_norm``'s default
    ``dim``: 1 for a ``ConvTranspose`` module (its output channels), else 0.
    """
    tensor = _tensor(module, name)
    if dim is None:
        dim = 1 if isinstance(module, _CONV_TRANSPOSE) else 0
    if flatten is None:
        flatten = tensor.ndim > 2
    if flatten:
        if tensor.ndim == 0:
            raise ValueError(f"{name}: expected a tensor with at least one dimension, got a scalar")
        if isinstance(dim, bool) or not isinstance(dim, int) or not (
                -tensor.ndim <= dim < tensor.ndim):
            raise ValueError(
                f"dim: expected an integer in [{-tensor.ndim}, {tensor.ndim - 1}] for {name} of "
                f"shape {tuple(tensor.shape)}, got {dim!r}")
        n = tensor.shape[dim]
        k = tensor.numel() // n if n else 0
    else:
        if tensor.ndim < 2:
            raise ValueError(
                f"{name}: expected a matrix (..., n, k), got shape {tuple(tensor.shape)}"
            )
        n, k = tensor.shape[-2], tensor.shape[-1]
    if n == 0 or k == 0:
        raise ValueError(f"{name}: expected a tensor without zero-size dimensions, got shape "
                         f"{tuple(tensor.shape)}")
    manifold = SpectrallyBounded(n, k, upper=upper, lower=lower)
    return constrain(
        module, name, manifold, retraction, dynamic, strict, flatten=flatten, dim=dim
    )


def register_parametrization(module: nn.Module, tensor_name: str, parametrization: nn.Module,
                             *, unsafe: bool = False) -> nn.Module:
    """torch's :func:`~torch.nn.utils.parametrize.register_parametrization` (the workflow of
    PyTorch's parametrizations tutorial); a :class:`~dtriv.parametrize.Trivialization`
    registered through it names ``tensor_name`` in its errors, as with :func:`constrain`
    (rather than ``value``)."""
    if isinstance(parametrization, Trivialization) and parametrization.tensor_name == "value":
        parametrization.tensor_name = tensor_name
    return _torch_register(module, tensor_name, parametrization, unsafe=unsafe)


def trivializations(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """Yield ``(module, name, parametrization)`` for every dynamic trivialization of ``model``.

    A dynamic trivialization is a parametrization with a ``base`` and a ``refresh`` method:
    dtriv's :class:`~dtriv.parametrize.Trivialization` with ``dynamic=True`` and the
    ``orthogonal`` twin with ``use_trivialization=True``; static ones are skipped. Each
    submodule is visited once (``model.modules()``). It also restores the links between a
    first-in-list :class:`~dtriv.parametrize.Trivialization` and its parameter, which a
    ``deepcopy`` of the model or a direct ``register_parametrization`` does not set.
    """
    check_model(model)
    return _trivializations(model)


def _trivializations(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    for module in model.modules():
        if not is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            _attach(module, name)
            for parametrization in plist:
                if (
                    callable(getattr(parametrization, "refresh", None))
                    and getattr(parametrization, "base", None) is not None
                    and getattr(parametrization, "dynamic", True)
                ):
                    yield module, name, parametrization


@without_any_autocast
@torch.no_grad()
def refresh(model: nn.Module) -> int:
    """Refresh every dynamic trivialization of ``model`` in place; returns how many.

    For each one ``base <- current point`` and its parameter ``<- 0`` (see
    :meth:`~dtriv.parametrize.Trivialization.refresh`); the weights do not change.
    Cost: one evaluation of each parametrization.
    """
    count = 0
    for module, name, parametrization in list(trivializations(model)):
        plist = module.parametrizations[name]
        if plist[0] is parametrization and hasattr(plist, "original"):
            parametrization.refresh(plist.original)
        else:
            parametrization.refresh()
        count += 1
    return count
