"""The dynamic trivializations an optimizer owns, and how to refresh each kind.

A *target* is one parametrized tensor whose parametrization keeps a base point: the
parameter the optimizer updates (``original``) and a way to move the base to the current
weight while resetting ``original`` to the preimage of the base. Three kinds are known:

``dtriv``
    :class:`dtriv.parametrize.Trivialization` (and the dtriv twin of ``orthogonal``): the
    parameter carries ``original._dtriv_trivialization``, a weak reference to the
    parametrization, whose ``refresh(original)`` does the work.
``torch``
    :func:`torch.nn.utils.parametrizations.orthogonal` with ``use_trivialization=True``
    (buffer ``base``, ``n x n``). Its weight is ``(base @ Q(X))[:, :k]`` with ``Q`` the full
    ``n x n`` orthogonal matrix of the map (``matrix_exp``, ``cayley`` or ``householder``) of
    the free tensor ``X``. Refresh: ``base <- base @ Q(X)`` and ``X <- -I`` (torch's
    preimage of the identity, the value its ``right_inverse`` returns), in place. The full
    ``Q`` keeps the completion columns of the base continuous; assigning
    ``module.weight = module.weight`` would complete them with a random matrix.
``geotorch``
    geotorch's ``SO`` and ``Stiefel`` (buffer ``base``, ``n x n``; weight
    ``(base @ expm(skew(X)))[:, :k]``): ``base <- base @ triv(skew(X))``, ``X <- 0``.
    Other parametrizations with a ``base`` buffer and a ``right_inverse`` (geotorch's
    ``Sphere``, ...) are refreshed through the right inverse, as geotorch's
    ``update_base`` does: ``X <- right_inverse(forward(X))``, in place, with the global
    random generator forked and seeded deterministically so that random completions agree
    across processes and resumed runs.

**Finding the owners.** dtriv parameters point to their parametrization. For the others,
the ``ParametrizationList`` modules holding the parameters are located either in the
``modules`` given to the optimizer wrapper, or, without it, by one scan of the objects the
garbage collector tracks (``gc.get_objects()``, once, when the wrapper is built or a param
group is added, and for the parameters of removed parametrizations, which may have been
registered again, at the first refresh after the removal). The scan is O(number of live
Python objects) and finds parametrizations of any model, including ones the caller holds no
reference to.
"""

from __future__ import annotations

import gc
import hashlib
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList

from dtriv.retractions._lu import solve
from dtriv.retractions.stiefel import polar_factor

__all__ = ["Target", "find_targets"]


class Target:
    """One parametrized tensor with a base point, refreshed by the optimizer wrapper."""

    kind = "generic"

    def __init__(self, original: Tensor, parametrization: nn.Module,
                 owner: tuple[nn.Module, ParametrizationList] | None = None) -> None:
        self.original = original
        self.parametrization = parametrization
        #: ``(weakref(module), ParametrizationList)``: where it is registered, when known
        self._registration = None if owner is None else (weakref.ref(owner[0]), owner[1])

    def attached(self) -> bool:
        """Whether the parametrization is still registered on its module (``False`` after
        ``remove_parametrizations``: its parameter is then a plain weight, which a refresh
        would overwrite); ``True`` when the module is not known."""
        if self._registration is None:
            return True
        ref, plist = self._registration
        return _registered(ref(), plist)

    @property
    def base(self) -> Tensor:
        """The base point buffer."""
        return self.parametrization.base

    def refresh(self, index: int, count: int) -> None:
        """Move the base to the current weight and reset ``original``; in place, no grad.

        ``index`` (the target's position) and ``count`` (the number of refreshes so far)
        seed the generator for parametrizations whose right inverse is random.
        """
        p = self.parametrization
        seed = _seed(index, count)
        devices = [self.original.device] if self.original.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            value = p.right_inverse(p(self.original))
            self.original.copy_(value)

    def reproject(self) -> None:
        """Project the base back onto its manifold (where the kind knows how)."""

    def describe(self) -> str:
        return f"{type(self.parametrization).__name__} of shape {tuple(self.original.shape)}"


def _registered(module: nn.Module | None, plist: ParametrizationList | None) -> bool:
    """Whether ``plist`` is one of the parametrizations of ``module`` (both still alive)."""
    if module is None or plist is None:
        return False
    registered = module._modules.get("parametrizations")
    return registered is not None and any(v is plist for v in registered._modules.values())


def _seed(index: int, count: int) -> int:
    digest = hashlib.sha256(f"dtriv-refresh-{index}-{count}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class DtrivTarget(Target):
    """A :class:`dtriv.parametrize.Trivialization`: its own ``refresh(original)``."""

    kind = "dtriv"

    def attached(self) -> bool:
        p = self.parametrization
        module_link, plist_link = getattr(p, "_module", None), getattr(p, "_owner", None)
        if module_link is None or plist_link is None:  # links not set: the generic test
            return super().attached()
        return _registered(module_link(), plist_link())

    def refresh(self, index: int, count: int) -> None:
        self.parametrization.refresh(self.original)

    def reproject(self) -> None:
        p = self.parametrization
        manifold = getattr(p, "manifold", None)
        with torch.no_grad():
            if manifold is not None:
                p.base.copy_(manifold.project(p.base))
            else:  # the orthogonal twin: an orthogonal (n x n) base
                p.base.copy_(polar_factor(p.base))


class TorchOrthogonalTarget(Target):
    """torch's ``orthogonal(..., use_trivialization=True)``: ``base <- base @ Q(X)``, ``X <- -I``.

    Cost: one ``n x n`` matrix exponential, solve or Householder product and one ``n x n``
    product (the same order as one forward of the parametrization).
    """

    kind = "torch"

    def _full(self, X: Tensor) -> Tensor:
        """The full ``n x n`` orthogonal matrix whose first ``k`` columns the map returns."""
        from torch.nn.utils.parametrizations import _OrthMaps

        p = self.parametrization
        n, k = X.size(-2), X.size(-1)
        pad = X.new_zeros(*X.shape[:-2], n, n - k)
        if p.orthogonal_map in (_OrthMaps.matrix_exp, _OrthMaps.cayley):
            Y = torch.cat([X.tril(), pad], dim=-1)
            A = Y - Y.mH
            if p.orthogonal_map == _OrthMaps.matrix_exp:
                return torch.linalg.matrix_exp(A)
            Id = torch.eye(n, dtype=A.dtype, device=A.device)
            return solve(torch.add(Id, A, alpha=-0.5), torch.add(Id, A, alpha=0.5))
        A = X.tril(diagonal=-1)
        tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
        A_full = torch.cat([A, pad], dim=-1)
        tau_full = torch.cat([tau, tau.new_zeros(*tau.shape[:-1], n - k)], dim=-1)
        Q = torch.linalg.householder_product(A_full, tau_full)
        signs = torch.cat(
            [X.diagonal(dim1=-2, dim2=-1).int().to(Q.dtype), Q.new_ones(*tau.shape[:-1], n - k)],
            dim=-1,
        )
        return Q * signs.unsqueeze(-2)

    def refresh(self, index: int, count: int) -> None:
        p, original = self.parametrization, self.original
        with torch.no_grad():
            X = original.mT if original.size(-2) < original.size(-1) else original
            p.base.copy_(p.base @ self._full(X))
            original.zero_()
            original.diagonal(dim1=-2, dim2=-1).fill_(-1.0)

    def reproject(self) -> None:
        with torch.no_grad():
            self.base.copy_(polar_factor(self.base))


class GeotorchSOTarget(Target):
    """geotorch's ``SO``/``Stiefel``: ``base <- base @ triv(skew(X))`` (full ``n x n``), X <- 0.

    Cost: one forward of the parametrization on the square frame (an ``n x n`` exponential).
    """

    kind = "geotorch"

    def refresh(self, index: int, count: int) -> None:
        from geotorch.so import SO
        from geotorch.stiefel import Stiefel

        p, original = self.parametrization, self.original
        with torch.no_grad():
            if isinstance(p, Stiefel):
                X = original.transpose(-2, -1) if p.transposed else original
                full = SO.forward(p, p.frame(X))
            else:
                full = p(original)
            p.base.copy_(full)
            original.zero_()

    def reproject(self) -> None:
        with torch.no_grad():
            self.base.copy_(polar_factor(self.base))


class GeotorchSphereTarget(Target):
    """geotorch's ``Sphere``: refreshed through its right inverse, re-projected by normalising."""

    kind = "geotorch"

    def reproject(self) -> None:
        with torch.no_grad():
            b = self.base
            b.copy_(b / torch.linalg.vector_norm(b, dim=-1, keepdim=True))


def _classify(original: Tensor, plist: ParametrizationList,
              module: nn.Module | None = None) -> Target | None:
    """The target for the first parametrization of ``plist``, or None when it has no base
    (``module``: the one ``plist`` is registered on, to tell when it is removed)."""
    owner = None if module is None else (module, plist)
    first = plist[0]
    if hasattr(first, "refresh") and getattr(first, "dynamic", True) and callable(first.refresh):
        if getattr(first, "base", None) is not None:
            return DtrivTarget(original, first, owner)
        return None
    base = getattr(first, "base", None)
    if not isinstance(base, Tensor):
        return None
    try:
        from torch.nn.utils.parametrizations import _Orthogonal
    except ImportError:  # pragma: no cover - torch without the private class
        _Orthogonal = None
    if _Orthogonal is not None and isinstance(first, _Orthogonal):
        return TorchOrthogonalTarget(original, first, owner)
    try:
        from geotorch.so import SO
        from geotorch.sphere import Sphere
    except ImportError:
        SO = Sphere = None
    if SO is not None and isinstance(first, SO):
        return GeotorchSOTarget(original, first, owner)
    if Sphere is not None and isinstance(first, Sphere):
        return GeotorchSphereTarget(original, first, owner)
    if hasattr(first, "right_inverse"):
        return Target(original, first, owner)
    return None


def _has_base(triv: nn.Module) -> bool:
    """Whether a dtriv trivialization is dynamic with a base (a target, while registered)."""
    return getattr(triv, "dynamic", True) and getattr(triv, "base", None) is not None


def _dtriv_link(p: Tensor) -> nn.Module | None:
    ref = getattr(p, "_dtriv_trivialization", None)
    if ref is None:
        return None
    try:
        return ref()
    except TypeError:
        return None


def _owners(params: list[Tensor], modules: Iterable[nn.Module] | None) -> dict[int, Any]:
    """``id(parameter) -> (module, ParametrizationList)`` for the parameters registered as
    ``original`` of a parametrization of ``modules`` (or of any live module)."""
    wanted = {id(p) for p in params}
    if modules is None:
        candidates: Iterable[Any] = (
            # type() rather than isinstance: isinstance reads ``__class__``, which some
            # module proxies override (with deprecation warnings)
            o for o in gc.get_objects()
            if issubclass(type(o), nn.Module) and "parametrizations" in o.__dict__.get(
                "_modules", ())
        )
    else:
        candidates = (m for module in modules for m in module.modules())
    owners: dict[int, Any] = {}
    for module in candidates:
        registered = module._modules.get("parametrizations")
        if registered is None:
            continue
        for plist in registered._modules.values():
            original = plist._parameters.get("original")
            if original is not None and id(original) in wanted:
                owners[id(original)] = (module, plist)
    return owners


def find_targets(
    params: list[Tensor], modules: Iterable[nn.Module] | None = None
) -> tuple[list[Target], int]:
    """The targets among ``params`` (in their order) and the number of static ones.

    A parameter of a dtriv trivialization is found through its weak reference; the others
    through their ``ParametrizationList`` (see the module docstring). Static
    trivializations (no base to move) are counted but not returned.
    """
    found: dict[int, Target] = {}
    static = 0
    remaining = []
    for p in params:
        triv = _dtriv_link(p)
        if triv is None:
            remaining.append(p)
        elif _has_base(triv):
            target = DtrivTarget(p, triv)
            if target.attached():
                found[id(p)] = target
            else:  # removed since (the link on the parameter stays): registered again?
                remaining.append(p)
        else:
            static += 1
    if remaining:
        owners = _owners(remaining, modules)
        for p in remaining:
            owner = owners.get(id(p))
            if owner is None:
                continue
            module, plist = owner
            target = _classify(p, plist, module)
            if target is None:
                static += 1
            else:
                found[id(p)] = target
    return [found[id(p)] for p in params if id(p) in found], static
