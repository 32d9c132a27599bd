"""state_dict: bit-for-bit round trips, and mismatched checkpoints raise naming the key."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from dtriv.manifolds import Orthogonal, SpecialOrthogonal, Sphere, Stiefel
from dtriv.parametrize import constrain, refresh, spectrally_bounded, sphere

F64 = torch.float64


class Model(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.square = nn.Linear(5, 5)
        self.tall = nn.Linear(3, 6)
        self.rows = nn.Linear(4, 3)
        self.bounded = nn.Linear(4, 4)
        self.conv = nn.Conv2d(2, 3, 2)
        constrain(self.square, "weight", Orthogonal(5), "cayley")
        constrain(self.tall, "weight", Stiefel(6, 3), "qr")
        sphere(self.rows, "weight", radius=2.0)
        spectrally_bounded(self.bounded, "weight", upper=0.9)
        constrain(self.conv, "weight", Stiefel(3, 8))

    def weights(self):
        return {n: m.weight.detach().clone()
                for n, m in self.named_children()}


def trained(seed):
    model = Model(seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    refresh(model)  # bases moved
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))  # and non-zero parameters
    return model


def test_keys_are_torch_keys_plus_base_and_extra_state():
    keys = set(nn.Module.state_dict(Model(0).square))
    assert keys == {
        "bias",
        "parametrizations.weight.original",
        "parametrizations.weight.0.base",
        "parametrizations.weight.0._extra_state",
    }


@pytest.mark.parametrize("through_bytes", [False, True])
def test_round_trip_is_bit_for_bit(through_bytes):
    source = trained(0)
    state = source.state_dict()
    if through_bytes:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
    target = Model(1)
    assert any(not torch.equal(a, b) for a, b in zip(source.weights().values(),
                                                     target.weights().values()))
    target.load_state_dict(state)
    for name, W in source.weights().items():
        assert torch.equal(target.weights()[name], W), name
    for (ka, a), (kb, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert ka == kb
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), ka
    # the loaded tensors are the target's own (in place): parameters keep their identity
    assert target.square.parametrizations.weight[0]._owner() is \
        target.square.parametrizations.weight


def test_shape_mismatch_names_the_key():
    a, b = nn.Linear(3, 5), nn.Linear(3, 6)
    constrain(a, "weight", Stiefel(5, 3))
    constrain(b, "weight", Stiefel(6, 3))
    with pytest.raises(RuntimeError, match=r"size mismatch for parametrizations\.weight\."):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "saved, loaded, shape",
    [
        (Orthogonal(4), SpecialOrthogonal(4), (4, 4)),
        (Sphere(4), Stiefel(3, 4), (3, 4)),
        (Stiefel(3, 4), Sphere(4), (3, 4)),
    ],
    ids=["O-vs-SO", "sphere-vs-stiefel", "stiefel-vs-sphere"],
)
def test_manifold_mismatch_names_the_key(saved, loaded, shape):
    a, b = nn.Linear(shape[1], shape[0]), nn.Linear(shape[1], shape[0])
    constrain(a, "weight", saved)
    constrain(b, "weight", loaded)
    with pytest.raises(RuntimeError, match=r"parametrizations\.weight\.0\._extra_state") as info:
        b.load_state_dict(a.state_dict())
    assert "manifold mismatch" in str(info.value)
    assert f"saved on {saved!r}, this module is constrained to {loaded!r}" in str(info.value)
    # non-strict loading does not hide it either
    with pytest.raises(RuntimeError, match="manifold mismatch"):
        b.load_state_dict(a.state_dict(), strict=False)


def test_retraction_mismatch_is_reported():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    constrain(a, "weight", Orthogonal(4), "expm")
    constrain(b, "weight", Orthogonal(4), "cayley")
    with pytest.raises(RuntimeError, match="retraction"):
        b.load_state_dict(a.state_dict())


def test_equal_manifolds_spelled_differently_load():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    constrain(a, "weight", Orthogonal(4))
    constrain(b, "weight", Stiefel(4, 4))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight, b.weight)


def test_set_extra_state_checks_directly():
    a = nn.Linear(4, 4)
    constrain(a, "weight", Orthogonal(4))
    triv = a.parametrizations.weight[0]
    triv.set_extra_state(triv.get_extra_state())
    with pytest.raises(ValueError, match="saved on Sphere"):
        triv.set_extra_state({**triv.get_extra_state(), "manifold": "Sphere(n=4, radius=1.0)",
                              "repr": "Sphere(n=4)"})


def test_flattening_dim_negative_and_positive_are_one_reading():
    # a conv weight read with dim=-1 and with dim=3 is the same matrix: checkpoints load both
    # ways (the description stored dim as given, so -1 and 3 were refused as different)
    def make(dim):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 4, 3)  # weight (4, 3, 3, 3): dim 3 first gives (3, 36)
        constrain(conv, "weight", Stiefel(3, 36), flatten=True, dim=dim)
        return conv

    for saved, loaded in ((-1, 3), (3, -1)):
        source, target = make(saved), make(loaded)
        target.load_state_dict(source.state_dict())
        torch.testing.assert_close(target.weight, source.weight)


def test_a_checkpoint_flattened_along_another_dim_is_refused(weight_holder):
    """A ``(4, 4, 2)`` tensor read as ``Stiefel(4, 8)`` along ``dim=1`` and along ``dim=0`` are
    different matrices of one manifold: loading one into the other raises, naming ``dim``."""
    a = constrain(weight_holder((4, 4, 2)), "weight", Stiefel(4, 8), flatten=True, dim=1)
    b = constrain(weight_holder((4, 4, 2), seed=1), "weight", Stiefel(4, 8), flatten=True, dim=0)
    with pytest.raises(RuntimeError, match="dim"):
        b.load_state_dict(a.state_dict())
