"""The shared interface of every manifold (base class behaviour)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtriv.manifolds import (
    Manifold,
    Orthogonal,
    SpecialOrthogonal,
    SpectrallyBounded,
    Sphere,
    Stiefel,
)

F64 = torch.float64
CATALOGUE = [Sphere(5), Sphere(3, radius=2.0), Stiefel(6, 2), Stiefel(2, 6), Orthogonal(4),
             SpecialOrthogonal(3), SpectrallyBounded(4, 3, upper=2.0, lower=0.5)]


class Hyperplane(Manifold):
    """{x in R^n : sum(x) = 1}, a minimal concrete manifold for the shared machinery."""

    def __init__(self, n: int) -> None:
        self.n = n

    shape = property(lambda self: (self.n,))
    dim = property(lambda self: self.n - 1)
    retractions = property(lambda self: ("add",))

    def _constraints(self, X):
        return [("|sum(X) - 1|", (X.sum(-1) - 1).abs())]

    def project(self, X):
        return X - (X.sum(-1, keepdim=True) - 1) / self.n

    def proj_tangent(self, B, V):
        return V - V.mean(-1, keepdim=True)

    def _retract(self, B, V, method):
        return B + V

    def _sample(self, batch, generator, dtype, device, init):
        if init != "haar":
            raise self._bad_init(init, ("haar",))
        Z = torch.randn(*batch, self.n, generator=generator, dtype=dtype, device=device)
        return self.project(Z)


def test_manifold_is_abstract():
    with pytest.raises(TypeError):
        Manifold()


def test_shared_machinery(gen):
    M = Hyperplane(4)
    assert repr(M) == "Hyperplane()" and M.default_retraction == "add"
    X = M.sample(2, 3, generator=gen, dtype=F64)
    assert X.shape == (2, 3, 4) and M.check(X)
    torch.testing.assert_close(M.sample((2, 3), generator=torch.Generator().manual_seed(5)),
                               M.sample(2, 3, generator=torch.Generator().manual_seed(5)))
    assert M.sample(generator=gen).dtype == torch.get_default_dtype()
    X[1, 0, 2] += 0.25
    ok, reason = M.check(X, explain=True)
    assert reason == ("X[1, 0] is not on Hyperplane(): |sum(X) - 1| is 2.500e-01, exceeds "
                      f"atol = {M.tolerance(F64):.3e}")
    assert M.check(X, atol=0.3)
    torch.testing.assert_close(M.distance(X)[1, 0], torch.tensor(0.25, dtype=F64))
    V = M.random_tangent(X, generator=gen)
    torch.testing.assert_close(V.sum(-1), torch.zeros(2, 3, dtype=F64))
    torch.testing.assert_close(M.tangent(X, V), V)
    with pytest.raises(NotImplementedError, match="'add' has no implemented inverse"):
        M.retract_inverse(X, X)
    with pytest.raises(ValueError, match=r"batch: expected non-negative integer sizes"):
        M.sample(-1)
    with pytest.raises(ValueError, match=r"dtype: expected a floating point .*torch.int32"):
        M.sample(2, dtype=torch.int32)
    with pytest.raises(TypeError, match="X: expected a torch.Tensor, got list"):
        M.check([1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("M", CATALOGUE, ids=repr)
def test_interface(M, gen):
    assert M.default_retraction == M.retractions[0]
    assert len(M.retractions) == len(set(M.retractions)) >= 1
    B = M.sample(3, generator=gen, dtype=F64)
    assert B.shape == (3, *M.shape) and M.check(B)
    torch.testing.assert_close(M.sample(3, generator=torch.Generator().manual_seed(9)),
                               M.sample(3, generator=torch.Generator().manual_seed(9)))
    U, V = M.random_tangent(B, generator=gen), M.random_tangent(B, generator=gen)
    torch.testing.assert_close(M.proj_tangent(B, U), U)
    expected = [np.vdot(u.numpy().ravel(), v.numpy().ravel()).real for u, v in zip(U, V)]
    np.testing.assert_allclose(M.inner(B, U, V).numpy(), expected, rtol=1e-12)
    for method in M.retractions:
        B_new = M.retract(B, U, method)
        assert M.check(B_new), method
        T = M.transport(B, B_new, V)
        torch.testing.assert_close(M.proj_tangent(B_new, T), T)
    with pytest.raises(ValueError, match="method: expected one of"):
        M.retract(B, U, "nope")
    with pytest.raises(ValueError, match=r"init: expected one of"):
        M.sample(init="nope")
    bad = torch.zeros(*M.shape[:-1], M.shape[-1] + 1, dtype=F64)
    with pytest.raises(ValueError, match=r"X: expected a tensor of shape .* got shape"):
        M.validate(bad)
    with pytest.raises(ValueError, match=r"W: expected a tensor of shape"):
        M.validate(bad, "W")
    e32, e64 = torch.finfo(torch.float32).eps, torch.finfo(F64).eps
    assert M.tolerance(torch.float32) / M.tolerance(F64) == pytest.approx(e32 / e64)


@pytest.mark.parametrize("M", CATALOGUE, ids=repr)
def test_maps_are_differentiable(M, gen):
    """gradcheck (float64) of X -> retract(B, tangent(B, X)) and of project; the gradient of
    project is finite on the manifold itself (repeated singular values for Stiefel)."""
    B = M.sample(generator=gen, dtype=F64)
    X = 0.1 * torch.randn(M.shape, generator=gen, dtype=F64)
    assert torch.autograd.gradcheck(lambda X: M.retract(B, M.tangent(B, X)),
                                    (X.requires_grad_(),))
    Y = B + 0.05 * torch.randn(M.shape, generator=gen, dtype=F64)
    assert torch.autograd.gradcheck(M.project, (Y.requires_grad_(),))
    B0 = B.clone().requires_grad_()
    (M.project(B0) * torch.randn(M.shape, generator=gen, dtype=F64)).sum().backward()
    assert torch.isfinite(B0.grad).all()


def test_empty_batch():
    M = Stiefel(4, 2)
    X = M.sample(0, dtype=F64)
    assert X.shape == (0, 4, 2) and M.check(X) and M.check(X, explain=True)[0]


@pytest.mark.parametrize("M", CATALOGUE, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sample_check_and_project(M, dtype, gen):
    # drawn and checked through float32 (CPU LAPACK has no half QR, SVD or LU)
    X = M.sample(3, generator=gen, dtype=dtype)
    assert X.dtype == dtype and X.shape == (3, *M.shape)
    assert M.check(X), M.check(X, explain=True)[1]
    P = M.project(X.float().mul(1.01).to(dtype))
    assert P.dtype == dtype and M.check(P)
    assert M.distance(X).dtype == torch.float32


@pytest.mark.parametrize("M", CATALOGUE, ids=repr)
def test_samples_are_contiguous(M, gen):
    # a QR factor is column-major; a parameter made from it would not have its gradient's
    # layout (torch's "gradient layout contract" warning in optimizers)
    assert M.sample(generator=gen).is_contiguous()
    assert M.sample(2, 3, generator=gen).is_contiguous()


def test_retract_checks_the_pair_of_arguments():
    # the square group's maps met mismatched batches and dtypes as raw torch errors
    from dtriv.manifolds import Orthogonal

    O = Orthogonal(3)
    B = O.sample(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^V: expected a shape that broadcasts with that of B"):
        O.retract(B.expand(2, 3, 3), torch.zeros(3, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^V: expected the dtype of B, torch.float64, got "):
        O.retract(B, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"^X: expected the dtype of B"):
        O.retract_inverse(B, B.float())
    assert O.retract(B, torch.zeros(2, 3, 3, dtype=torch.float64)).shape == (2, 3, 3)


@pytest.mark.parametrize("M", CATALOGUE, ids=repr)
def test_one_base_with_a_batch_of_tangents(M, gen):
    """retract(B, V) and retract_inverse(B, X) for one point B and a batch: every retraction
    equals the loop over the batch, and B's gradient is the sum of the loop's. Before, the tall
    Stiefel maps (and qr/polar/polar_ns of the group) refused the shapes that the pair check
    had just admitted."""
    B = M.sample(generator=gen, dtype=F64)
    V = M.random_tangent(B.expand(3, *M.shape).clone(), generator=gen) * 0.3
    C = torch.randn(3, *M.shape, generator=gen, dtype=F64)
    for method in M.retractions:
        Bg = B.clone().requires_grad_()
        Y = M.retract(Bg, V, method)
        (Y * C).sum().backward()
        loop_grad = torch.zeros_like(B)
        for i in range(3):
            Bi = B.clone().requires_grad_()
            Yi = M.retract(Bi, V[i], method)
            torch.testing.assert_close(Y[i].detach(), Yi.detach(), atol=1e-12, rtol=0)
            (Yi * C[i]).sum().backward()
            loop_grad += Bi.grad
        torch.testing.assert_close(Bg.grad, loop_grad, atol=1e-10, rtol=0)
        try:
            W = M.retract_inverse(B, Y.detach(), method)
        except NotImplementedError:
            continue
        assert W.shape == V.shape  # a right inverse (the clip's is not a left one)
        torch.testing.assert_close(M.retract(B, W, method), Y.detach(), atol=1e-9, rtol=0)
