"""The registry of named maps, and the public surface of dtriv.retractions."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

import dtriv.retractions as R
from dtriv.retractions import available, get, register

EXPECTED = {
    "lie": {"expm": (R.expm, R.logm), "cayley": (R.cayley, R.cayley_inverse),
            "householder": (R.householder, R.householder_inverse)},
    "sphere": {"exp": (R.sphere_exp, R.sphere_log),
               "projective": (R.sphere_projective, R.sphere_projective_inverse)},
}


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown lie retraction 'nope'; available: ") as info:
        get("lie", "nope")
    for name in ("expm", "cayley", "householder"):
        assert name in str(info.value)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match=r"^kind: expected one of lie, stiefel, sphere"):
        get("grassmann", "exp")
    with pytest.raises(ValueError, match=r"^kind: "):
        register("grassmann", "exp", R.expm)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_maps_and_inverses_are_registered(kind):
    assert set(EXPECTED[kind]) <= set(available(kind))
    for name, (fn, inverse) in EXPECTED[kind].items():
        entry = get(kind, name)
        assert (entry.name, entry.kind, entry.map, entry.inverse) == (name, kind, fn, inverse)


def test_registered_lie_inverses_invert(random_skew):
    A = random_skew(2, 4, radius=2.0)
    for name in ("expm", "cayley"):
        entry = get("lie", name)
        assert (entry.inverse(entry.map(A)) - A).abs().max().item() < 1e-12
    entry = get("lie", "householder")
    Q = R.expm(A)
    assert (entry.map(entry.inverse(Q)) - Q).abs().max().item() < 1e-13


def test_registered_sphere_inverses_invert(randn):
    x = randn(3, 5)
    x = x / x.norm(dim=-1, keepdim=True)
    v = randn(3, 5)
    v = 0.5 * (v - (x * v).sum(-1, keepdim=True) * x)
    for name in ("exp", "projective"):
        entry = get("sphere", name)
        assert (entry.inverse(x, entry.map(x, v)) - v).abs().max().item() < 1e-13


ALL_MAPS = [(kind, name) for kind in R.KINDS for name in available(kind)]


@pytest.mark.parametrize("kind,name", ALL_MAPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_registered_map_takes_an_empty_batch(kind, name, dtype):
    """A batch of no points gives no points, of the input's shape and dtype, with a backward
    (the Newton-Schulz polar map read a maximum over the empty batch and raised)."""
    shape = {"lie": (0, 4, 4), "stiefel": (0, 5, 3), "sphere": (0, 6)}[kind]
    inputs = [torch.zeros(shape, dtype=dtype, requires_grad=True)
              for _ in range(1 if kind == "lie" else 2)]
    out = get(kind, name).map(*inputs)
    assert out.shape == shape and out.dtype == dtype
    out.sum().backward()
    assert all(x.grad is not None and x.grad.shape == shape for x in inputs[-1:])


def test_importing_the_package_populates_the_registry():
    code = (
        "import dtriv.retractions as R; "
        "print(' '.join(sorted(R.available('lie') + R.available('sphere'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert {"cayley", "expm", "householder", "exp", "projective"} <= set(out)


def test_public_functions_document_formula_and_cost():
    for name in R.__all__:
        obj = getattr(R, name)
        assert obj is not None
        if inspect.isfunction(obj) and name not in ("register", "get", "available"):
            doc = inspect.getdoc(obj) or ""
            if obj.__module__.split(".")[-1] in ("lie", "householder", "sphere", "spectral"):
                assert "Cost" in doc, name
                assert ":math:" in doc, name


def test_helpers_are_exported():
    A = torch.arange(9.0).reshape(3, 3)
    assert torch.equal(R.skew(A) + R.sym(A), A)
