"""Name -> map registry, so that configuration files select a retraction by string.

Maps are grouped by *kind*, the signature they share:

``"lie"``
    ``f(A) -> Q``: a skew-Hermitian ``(..., n, n)`` matrix to an orthogonal/unitary one.
``"stiefel"``
    ``f(B, V) -> Q``: a point ``B`` of the Stiefel manifold and a tangent vector ``V`` at
    ``B`` (both ``(..., n, k)``, ``n >= k``) to a point of the Stiefel manifold.
``"sphere"``
    ``f(x, v) -> y``: a unit vector ``x`` and a tangent ``v`` (last dimension) to a unit vector.

Each entry holds the map and, when it has one, its inverse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Entry", "register", "get", "available", "KINDS"]

KINDS = ("lie", "stiefel", "sphere")


@dataclass(frozen=True)
class Entry:
    """A registered map: its name, kind, the map and (optionally) its inverse."""

    name: str
    kind: str
    map: Callable[..., Tensor]
    inverse: Callable[..., Tensor] | None = None


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str, fn: Callable[..., Tensor],
             inverse: Callable[..., Tensor] | None = None) -> Entry:
    """Register ``fn`` (and its ``inverse``) under ``name`` in the group ``kind``."""
    if kind not in _REGISTRY:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    entry = Entry(name=name, kind=kind, map=fn, inverse=inverse)
    _REGISTRY[kind][name] = entry
    return entry


def available(kind: str | None = None) -> tuple[str, ...]:
    """Names registered for ``kind`` (all kinds as ``"kind:name"`` when ``kind`` is None)."""
    if kind is None:
        return tuple(f"{k}:{n}" for k, group in _REGISTRY.items() for n in group)
    if kind not in _REGISTRY:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    return tuple(_REGISTRY[kind])


def get(kind: str, name: str) -> Entry:
    """The entry registered as ``name`` for ``kind``; ``ValueError`` listing the choices else."""
    names = available(kind)
    if name not in _REGISTRY[kind]:
        raise ValueError(
            f"unknown {kind} retraction {name!r}; available: {', '.join(names) or '(none)'}"
        )
    return _REGISTRY[kind][name]
