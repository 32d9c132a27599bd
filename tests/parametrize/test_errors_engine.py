"""Bad input to the engine: each error names the argument, what was expected and what it got."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtriv.manifolds import Orthogonal, Sphere, Stiefel
from dtriv.parametrize import (
    Trivialization,
    constrain,
    register_parametrization,
    spectrally_bounded,
    sphere,
)

F64 = torch.float64


def constrained(manifold=None, strict=False, shape=(4, 4), seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0]).double()
    return constrain(layer, "weight", manifold or Orthogonal(4), strict=strict)


def test_strict_assignment_off_the_manifold_raises_with_the_constraint_error():
    layer = constrained(strict=True)
    weight = layer.weight.detach().clone()
    base = layer.parametrizations.weight[0].base.clone()
    with pytest.raises(ValueError, match=r"weight: expected a point of Orthogonal\(n=4\) "
                                         r"\(strict=True\).*orthonormality error"):
        layer.weight = 2 * torch.eye(4, dtype=F64)
    # nothing changed
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.parametrizations.weight[0].base, base)
    # a point on the manifold is accepted
    Q = Orthogonal(4).sample(dtype=F64, generator=torch.Generator().manual_seed(1))
    layer.weight = Q
    assert torch.allclose(layer.weight, Q, atol=1e-12)


def test_non_strict_assignment_projects():
    layer = constrained()
    A = torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    layer.weight = A
    assert torch.allclose(layer.weight, Orthogonal(4).project(A), atol=1e-12)
    layer.weight = 3 * torch.eye(4, dtype=F64)
    assert torch.allclose(layer.weight, torch.eye(4, dtype=F64), atol=1e-12)


def test_non_finite_assignment_raises():
    layer = constrained()
    bad = torch.full((4, 4), float("nan"), dtype=F64)
    with pytest.raises(ValueError, match="weight: expected finite entries"):
        layer.weight = bad


def torch_error_type(module, name):
    try:
        register_parametrization(module, name, nn.Identity())
    except Exception as e:
        return type(e)
    raise AssertionError("register_parametrization accepted a missing tensor")


@pytest.mark.parametrize("call", [
    lambda m: constrain(m, "kernel", Orthogonal(4)),
    lambda m: sphere(m, "kernel"),
    lambda m: spectrally_bounded(m, "kernel"),
])
def test_missing_tensor_raises_like_register_parametrization(call):
    expected = torch_error_type(nn.Linear(4, 4), "kernel")
    with pytest.raises(expected, match="kernel"):
        call(nn.Linear(4, 4))


def test_shape_mismatch_names_expected_and_got():
    with pytest.raises(ValueError, match=r"weight: expected a tensor of shape \(\.\.\., 5, 3\)"
                                         r".*Stiefel\(n=5, k=3\), got shape \(3, 4\)"):
        constrain(nn.Linear(4, 3), "weight", Stiefel(5, 3))
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(\.\.\., 6\).*got shape"):
        constrain(nn.Linear(4, 3), "weight", Sphere(6), flatten=False)
    # assignment of another shape
    layer = constrained()
    with pytest.raises(ValueError, match=r"weight: expected a tensor of shape \(4, 4\).*"
                                         r"got shape \(4, 5\)"):
        layer.weight = torch.zeros(4, 5, dtype=F64)


def test_a_trivialization_registered_directly_names_its_tensor():
    """Registered through ``register_parametrization`` (the tutorial's workflow), as through
    ``constrain``: the errors name the tensor, not ``value``."""
    import dtriv

    for register in (dtriv.register_parametrization, dtriv.parametrize.register_parametrization):
        layer = nn.Linear(3, 5)
        register(layer, "weight", Trivialization(Stiefel(5, 3)))
        with pytest.raises(ValueError, match=r"^weight: expected a tensor of shape \(5, 3\)"):
            layer.weight = torch.zeros(5, 4)


@pytest.mark.parametrize("name", ["refresh", "trivializations", "memoize"])
def test_model_functions_refuse_what_is_not_a_module(name):
    import dtriv

    fn = getattr(dtriv.parametrize, name)
    with pytest.raises(ValueError, match=r"^model: expected a torch.nn.Module, got list"):
        fn([nn.Linear(2, 2)])


def test_dtype_mismatch_on_assignment():
    layer = constrained()
    with pytest.raises(ValueError, match="weight: expected dtype torch.float64, got torch.float32"):
        layer.weight = torch.eye(4)


def test_bad_arguments_of_the_trivialization():
    with pytest.raises(ValueError, match=r"retraction: expected one of expm, cayley.*got 'nope'"):
        Trivialization(Orthogonal(4), "nope")
    with pytest.raises(ValueError, match="manifold: expected a dtriv.manifolds.Manifold"):
        Trivialization("orthogonal")
    with pytest.raises(ValueError, match="flatten: expected None, True or False"):
        Trivialization(Orthogonal(4), flatten="yes")
    for value in (1, 0, 1.0):  # equal to True or False, but not flags
        with pytest.raises(ValueError, match=rf"flatten: expected None, True or False, "
                                             rf"got {value}"):
            Trivialization(Orthogonal(4), flatten=value)


def test_already_parametrized_tensor_is_refused():
    layer = constrained()
    with pytest.raises(ValueError, match="weight: expected a tensor that is not parametrized"):
        constrain(layer, "weight", Orthogonal(4))


def test_refresh_without_a_known_parameter():
    triv = Trivialization(Orthogonal(3))
    with pytest.raises(RuntimeError, match="does not know its parameter"):
        triv.refresh()
    with pytest.raises(RuntimeError, match="no base point"):
        triv(torch.zeros(3, 3))


def test_sphere_and_spectral_shortcut_errors():
    module = nn.Module()
    module.scalar = nn.Parameter(torch.tensor(1.0))
    module.vector = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="scalar: expected a tensor with at least one dimension"):
        sphere(module, "scalar")
    with pytest.raises(ValueError, match=r"vector: expected a matrix \(\.\.\., n, k\), got shape"):
        spectrally_bounded(module, "vector", flatten=False)
    with pytest.raises(ValueError, match="upper"):
        spectrally_bounded(nn.Linear(3, 3), "weight", upper=-1.0)
    for dim in (4, -5):  # a conv kernel is read flattened at dim
        with pytest.raises(ValueError, match=rf"^dim: expected an integer in \[-4, 3\] for "
                                             rf"weight of shape \(5, 3, 3, 3\), got {dim}$"):
            spectrally_bounded(nn.Conv2d(3, 5, 3), dim=dim)
    with pytest.raises(ValueError, match=r"^dim: expected an integer in \[-2, 1\]"):
        spectrally_bounded(nn.Linear(3, 5), flatten=True, dim=2)
    for manifold in (Sphere(72), Stiefel(4, 18)):  # the dim of a flattened read, checked
        for flatten in (True, None):
            with pytest.raises(ValueError, match=r"^dim: expected an integer in \[-4, 3\] \(a "
                                                 r"dimension of weight, of shape \(4, 2, 3, 3\)"
                                                 r".*got 9$"):
                constrain(nn.Conv2d(2, 4, 3), "weight", manifold, flatten=flatten, dim=9)
    empty = nn.Module()
    empty.weight = nn.Parameter(torch.ones(5, 0))
    with pytest.raises(ValueError, match=r"^weight: expected a tensor without zero-size "
                                         r"dimensions, got shape \(5, 0\)"):
        spectrally_bounded(empty)


def test_static_assignment_out_of_reach_names_the_tensor():
    layer = constrain(nn.Linear(4, 4, dtype=torch.float64), "weight", Orthogonal(4),
                      retraction="expm", dynamic=False)
    base = layer.parametrizations.weight[0].base
    flip = torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64))
    reflection = base @ flip  # relative to the reference point: det -1, no logarithm
    with pytest.raises(ValueError, match=r"^weight: the assigned value is not reached by the "
                                         r"static 'expm' map.*: Q: expected a matrix without "
                                         r"eigenvalue -1"):
        layer.weight = reflection


def test_refresh_checks_the_shape_of_original():
    triv = sphere(nn.Linear(3, 5)).parametrizations.weight[0]
    base = triv.base.clone()
    with pytest.raises(ValueError, match=r"^refresh: expected original of shape \(5, 3\), "
                                         r"got \(2, 5, 3\)"):
        triv.refresh(torch.zeros(2, 5, 3))
    with pytest.raises(TypeError, match="refresh: expected original a torch.Tensor, got list"):
        triv.refresh([0.0])
    assert torch.equal(triv.base, base)  # nothing changed


@pytest.mark.parametrize("flag", ["dynamic", "strict"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_flags_must_be_booleans(flag, value):
    # bool("no") is True: a string would silently mean the opposite
    with pytest.raises(ValueError, match=rf"^{flag}: expected True or False, got {value!r}"):
        constrain(nn.Linear(3, 5), "weight", Stiefel(5, 3), **{flag: value})


def test_more_bad_input_to_the_trivialization():
    """The checks no other test reached: ``dim`` that is not an integer, an assigned value
    that is not a tensor or has an integer dtype, ``refresh`` of a trivialization that is not
    its tensor's first parametrization or has no base yet, and extra state that is not the
    description ``get_extra_state`` writes."""
    for dim in (1.0, True, "0"):
        with pytest.raises(ValueError, match=rf"^dim: expected an integer, got {dim!r}$"):
            Trivialization(Orthogonal(4), flatten=True, dim=dim)
    layer = constrained()
    with pytest.raises(TypeError, match=r"^weight: expected a torch.Tensor, got list$"):
        layer.parametrizations.weight[0].right_inverse([[1.0]])
    with pytest.raises(ValueError, match=r"^value: expected a floating point or complex "
                                         r"tensor, got dtype torch.int64"):  # before a base
        Trivialization(Orthogonal(4)).right_inverse(torch.eye(4, dtype=torch.int64))
    # a trivialization linked to a tensor's list at a later position (as when one is
    # registered after another) does not receive the parameter
    from dtriv.parametrize.trivialization import _Link

    later = Trivialization(Orthogonal(4))
    register_parametrization(layer, "weight", later, unsafe=True)
    later._owner = _Link(layer.parametrizations.weight)
    with pytest.raises(RuntimeError, match=r"^refresh: the trivialization must be the first "
                                           r"parametrization of its tensor"):
        later.refresh()
    with pytest.raises(RuntimeError, match=r"^refresh: the trivialization has no base point yet"):
        Trivialization(Orthogonal(3)).refresh(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"^state: expected a dict describing the "
                                         r"trivialization, got list$"):
        layer.parametrizations.weight[0].set_extra_state([1, 2])


@pytest.mark.parametrize("memoize", [True, False])
def test_a_read_without_a_base_names_the_missing_base(memoize):
    """A trivialization whose base buffer was set to ``None`` says so at the next read of the
    tensor, through the module's fast read and through the parametrization itself."""
    layer = constrain(nn.Linear(4, 4), "weight", Orthogonal(4))
    triv = layer.parametrizations.weight[0]
    triv.memoize = memoize
    layer.weight  # a memoized value, which a missing base must not serve
    triv.base = None
    message = r"^Trivialization has no base point yet: it is set by right_inverse"
    with pytest.raises(RuntimeError, match=message):
        layer.weight
    with pytest.raises(RuntimeError, match=message):
        triv(layer.parametrizations.weight.original)


def test_the_repr_shows_the_options_that_differ_from_the_defaults():
    assert repr(Trivialization(Sphere(3))) == (
        "Trivialization(manifold=Sphere(n=3), retraction='exp')")
    assert repr(Trivialization(Orthogonal(4), "cayley", dynamic=False, strict=True)) == (
        "Trivialization(manifold=Orthogonal(n=4), retraction='cayley', dynamic=False, "
        "strict=True)")
    # how the tensor is read is known once it is registered
    layer = sphere(nn.Linear(4, 4), flatten=True)
    assert repr(layer.parametrizations.weight[0]) == (
        "Trivialization(manifold=Sphere(n=16), retraction='exp', flatten=True, dim=0)")
