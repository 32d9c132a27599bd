"""ManifoldParameter: membership check at creation, projection, copies and pickling."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from dtriv.manifolds import Sphere, Stiefel
from dtriv.optim import ManifoldParameter


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_point_on_manifold_is_kept_exactly():
    M = Stiefel(6, 3)
    X = M.sample(generator=_gen(), dtype=torch.float64)
    p = ManifoldParameter(X, M)
    assert isinstance(p, nn.Parameter) and p.requires_grad
    assert p.manifold is M
    assert torch.equal(p.detach(), X)


def test_off_manifold_raises_with_the_constraint_error():
    M = Stiefel(6, 3)
    X = 2 * M.sample(generator=_gen(), dtype=torch.float64)
    with pytest.raises(ValueError) as err:
        ManifoldParameter(X, M)
    message = str(err.value)
    assert message.startswith("data: expected a point of Stiefel(n=6, k=3)")
    assert "exceeds atol" in message and "project=True" in message


def test_project_true_uses_the_nearest_point():
    M = Sphere(5)
    x = torch.randn(3, 5, generator=_gen(1), dtype=torch.float64)
    p = ManifoldParameter(x, M, project=True)
    torch.testing.assert_close(p.detach(), x / x.norm(dim=-1, keepdim=True), rtol=0, atol=1e-15)
    assert M.check(p.detach())


def test_wrong_shape_and_wrong_manifold_type():
    with pytest.raises(ValueError, match="data: expected a tensor of shape"):
        ManifoldParameter(torch.zeros(4, 4), Stiefel(6, 3))
    with pytest.raises(TypeError, match="manifold: expected a dtriv.manifolds.Manifold"):
        ManifoldParameter(torch.zeros(4), "sphere")


def test_deepcopy_pickle_and_module_registration():
    M = Stiefel(5, 2)
    p = ManifoldParameter(M.sample(generator=_gen(2)), M)
    q = copy.deepcopy(p)
    assert type(q) is ManifoldParameter and q.manifold is not None and torch.equal(q, p)
    r = pickle.loads(pickle.dumps(p))
    assert type(r) is ManifoldParameter and repr(r.manifold) == repr(M) and torch.equal(r, p)
    module = nn.Module()
    module.w = p
    assert list(module.parameters()) == [p]
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # plain tensors: the safe (weights_only) loader accepts it
    assert torch.equal(state["w"], p.detach())
    assert repr(p).startswith("ManifoldParameter on Stiefel(n=5, k=2) containing:")
    # results of operations are plain tensors
    assert type(p * 2) is torch.Tensor


def test_without_data_a_point_is_sampled_and_other_data_is_refused():
    """``ManifoldParameter(manifold=M)`` holds a point of ``M`` drawn by its sampler; data
    that is not a tensor is refused by name."""
    M = Stiefel(6, 3)
    torch.manual_seed(3)
    p = ManifoldParameter(manifold=M)
    torch.manual_seed(3)
    assert torch.equal(p.detach(), M.sample())
    assert p.shape == (6, 3) and M.check(p.detach()) and p.manifold is M
    with pytest.raises(TypeError, match=r"^data: expected a torch.Tensor, got list"):
        ManifoldParameter([[1.0, 0.0]], Sphere(2))


def test_is_manifold_parameter_and_a_foreign_manifold():
    """``is_manifold_parameter`` tells dtriv's parameters from plain ones; a tensor whose
    ``manifold`` is not dtriv's (a geoopt parameter's) is refused by name, not taken as
    Euclidean."""
    from dtriv.optim.parameter import is_manifold_parameter

    M = Sphere(4)
    assert is_manifold_parameter(ManifoldParameter(M.sample(generator=_gen(4)), M))
    assert not is_manifold_parameter(nn.Parameter(torch.zeros(4)))
    foreign = nn.Parameter(torch.zeros(4))
    foreign.manifold = object()
    with pytest.raises(ValueError, match=r"^params: expected plain tensors or dtriv "
                                         r"ManifoldParameters, got a tensor whose manifold is "
                                         r"a builtins.object"):
        is_manifold_parameter(foreign)


def test_deepcopy_keeps_a_parameter_shared_by_two_modules_shared():
    """A parameter reached twice in one ``deepcopy`` (two modules holding it) is copied
    once, as ``nn.Parameter`` is."""
    M = Sphere(3)
    p = ManifoldParameter(M.sample(generator=_gen(5)), M)
    a, b = nn.Module(), nn.Module()
    a.w = b.w = p
    a2, b2 = copy.deepcopy([a, b])
    assert a2.w is b2.w and a2.w is not p and torch.equal(a2.w, p)
