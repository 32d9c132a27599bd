r"""Twin of :func:`torch.nn.utils.parametrizations.spectral_norm`.

.. math::
    W_{SN} = W / \sigma(W), \qquad \sigma(W) \approx u^H W v,

with ``u, v`` the left/right singular-vector estimates kept as buffers and refined by one
(``n_power_iterations``) power-iteration step per access in training mode
(:func:`~dtriv.retractions.spectral.power_iteration_`, in place, no grad). A 1-D weight is
simply normalized. ``W`` of more than two dimensions is reshaped to ``(size(dim), -1)``.
Cost per access: ``O(n_power_iterations * h * w)``.

Same signature, defaults, buffers (``_u``, ``_v``), random-number consumption (``u`` then ``v``,
then 15 warm-up iterations), ``state_dict`` keys, errors and results as torch's. In addition,
``state_dict`` s of the legacy :func:`torch.nn.utils.spectral_norm` (keys ``weight_orig``,
``weight_u``, ``weight_v``, and the stored ``weight`` of its oldest format) load.

``torch.func`` transforms (``vmap``, ``grad``, per-sample gradients ``vmap(grad)``, ``jvp``,
``jacfwd``, ``hessian``) compose with it in evaluation mode, and in training mode as long as
the weight is not batched (``vmap`` over the inputs only): the power-iteration step writes
the buffers in place, which ``vmap`` over the weight cannot do, as with torch's; the error
then says so. Forward mode (``jvp``, ``hessian``) also works in training mode, where torch's
raises.

Under ``torch.compile`` (``fullgraph=True`` included) it is traced: the power-iteration step
and ``W / sigma`` are torch's operations there, as in torch's ``spectral_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dtriv.parametrize.cache import install_fast_read
from dtriv.retractions._common import (
    apply_function,
    backward_without_autocast,
    compute_dtype,
    eager_context,
    forward_ad_active,
    is_functorch_wrapped,
    transforms_active,
)
from dtriv.retractions.spectral import (
    _power_steps_,
    power_iteration_,
    power_iteration_init,
    spectral_norm_estimate,
)

__all__ = ["spectral_norm"]

_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


@backward_without_autocast
class _DivideBySigma(torch.autograd.Function):
    r"""``(W, u, v) -> W / sigma``, :math:`\sigma = u^T W_{mat} v`, real ``W``: one node.

    ``W_mat = W.reshape(h, w)``; ``u, v`` are constants (copies taken at the forward, so a
    later in-place power-iteration step does not change this node's backward). The forward
    is torch's ``vdot(u, mv(W_mat, v))`` then ``W / sigma``, bit for bit. With
    :math:`Y = W/\sigma` and :math:`\partial\sigma/\partial W = u v^T`, the derivative is

    .. math::
        dY = \frac{1}{\sigma}\left(dW - (u^T dW_{mat}\, v)\, Y\right)

    (``jvp``: forward mode), and its adjoint, the gradient (``backward``),

    .. math::
        \bar W = \frac{1}{\sigma}\left(G - \frac{\langle G, W\rangle}{\sigma}\, u v^T\right).

    Only ``W`` and ``sigma`` (the second output, a scalar) are saved, not ``Y``: the value a
    caller reads may be edited in place (``w = m.weight; w.mul_(mask)``) before its backward,
    as with torch's ``spectral_norm``. A sparse ``G`` (the gradient of an
    ``nn.Embedding(sparse=True)``) is made dense first: the rank-one term makes the gradient
    dense, as torch's is. Under ``torch.func`` transforms ``vmap`` uses the rule generated from
    the forward and the derivatives (``generate_vmap_rule``): ``vmap``, ``jvp``, ``jacfwd``,
    ``hessian`` and per-sample gradients (``vmap(grad)``) compose. Cost: forward one
    matrix-vector product and one scaling; backward two dot products, one rank-one update and
    one scaling, O(h w); ``jvp`` likewise. ``sigma`` is non-differentiable and its gradient is
    not materialized. Double backward recomputes ``sigma`` through differentiable torch
    operations.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(W: Tensor, u: Tensor, v: Tensor):  # type: ignore[override]
        sigma = torch.vdot(u, torch.mv(W.reshape(u.shape[0], v.shape[0]), v))
        return W / sigma, sigma

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        W, u, v = inputs
        sigma = output[1]
        ctx.set_materialize_grads(False)  # no zero gradient for ``sigma``
        ctx.mark_non_differentiable(sigma)
        ctx.save_for_backward(W, u, v, sigma)
        ctx.save_for_forward(W, u, v, sigma)

    @staticmethod
    def backward(ctx, G: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if G is None:
            return None, None, None
        W, u, v, sigma = ctx.saved_tensors
        if G.layout != torch.strided:  # sparse: the gradient is dense (rank-one term)
            G = G.to_dense()
        h = u.shape[0]
        if torch.is_grad_enabled():  # differentiable recomputation for higher orders
            sigma = torch.vdot(u, torch.mv(W.reshape(h, v.shape[0]), v))
        # <G, Y> = <G, W>/sigma; gW = (G - <G, Y> u v^T)/sigma
        if (not torch.is_grad_enabled() and sigma.device.type == "cpu" and eager_context()
                and not is_functorch_wrapped(G) and not _is_legacy_batched(G)):
            # the two numbers on the host, then one pass: gW = G/sigma - (<G, Y>/sigma) u v^T
            # (addr's beta and alpha; 18 -> 12 us at 64 x 576, 60 -> 37 us at 512 x 512).
            # Not for a batched G (``autograd.grad(..., is_grads_batched=True)`` runs the
            # backward on a legacy batched tensor with no transform active), whose numbers
            # are per batch entry. A zero sigma (a zero or empty weight) takes the tensor
            # formula below, whose non-finite values are torch's.
            s = sigma.item()
            if s != 0:
                c = torch.vdot(G.reshape(-1), W.reshape(-1)).item() / s
                gW = torch.addr(G.reshape(h, v.shape[0]), u, v, beta=1 / s, alpha=-c / s)
                return gW.reshape(W.shape), None, None
        c = torch.vdot(G.reshape(-1), W.reshape(-1)) / sigma
        gW = torch.addr(G.reshape(h, v.shape[0]), u, v * c, alpha=-1)
        # out of place under torch.func: an unbatched gW cannot take a batched sigma in place
        gW = gW / sigma if transforms_active() else gW.div_(sigma)
        return gW.reshape(W.shape), None, None

    @staticmethod
    def jvp(ctx, dW: Tensor | None, *unused: Tensor | None):  # type: ignore[override]
        W, u, v, sigma = ctx.saved_tensors
        if dW is None:
            return None, None
        dsigma = torch.vdot(u, torch.mv(dW.reshape(u.shape[0], v.shape[0]), v))
        return (dW - W * (dsigma / sigma)) / sigma, None


def _records_derivatives(W: Tensor) -> bool:
    """Whether a derivative of a value computed from ``W`` may be asked for: reverse mode
    records (grad mode on and ``W`` requires grad), a forward-mode level is open, or a
    ``torch.func`` transform is active."""
    return (torch.is_grad_enabled() and W.requires_grad) or forward_ad_active()


def _divide_by_sigma(W: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``_DivideBySigma.apply(W, u, v)[0]`` (through :func:`apply_function`: no per-call
    argument binding outside ``torch.func`` transforms and ``torch.compile``)."""
    return apply_function(_DivideBySigma, W, u, v)[0]


_TRANSFORM_TRAINING_ERROR = (
    "spectral_norm: in training mode every forward refines the buffers _u, _v in place by a "
    "power-iteration step, which failed under a torch.func transform (the error above). Under "
    "vmap over the weight it is impossible: one _u, _v cannot hold the singular vectors of a "
    "batch of weights (torch's spectral_norm fails the same way). Call module.eval() first "
    "(the buffers are then read, not written), or vmap over the inputs only."
)


class _SpectralNorm(nn.Module):
    r"""``W -> W / (u^H W_mat v)``, ``W_mat`` the weight with ``dim`` first, flattened to 2-D."""

    def __init__(
        self, weight: Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12
    ) -> None:
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError(
                "Dimension out of range (expected to be in range of "
                f"[-{ndim}, {ndim - 1}] but got {dim})"
            )
        if n_power_iterations <= 0:
            raise ValueError(
                "Expected n_power_iterations to be positive, but "
                f"got n_power_iterations={n_power_iterations}"
            )
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            with torch.no_grad():
                u, v = power_iteration_init(self._reshape_weight_to_matrix(weight), eps=eps)
            self.register_buffer("_u", u)
            self.register_buffer("_v", v)

    def _reshape_weight_to_matrix(self, weight: Tensor) -> Tensor:
        """``weight`` with ``dim`` moved first, flattened to ``(size(dim), -1)``."""
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.dim()) if d != self.dim))
        return weight.flatten(1)

    def _power_step_(self, W: Tensor) -> None:
        """``n_power_iterations`` steps on the matrix ``W`` (detached), ``_u``, ``_v`` in place."""
        # a compute dtype (no half-precision round trip), buffers checked at registration
        if compute_dtype(W.dtype) == W.dtype and self._u.dtype == W.dtype:
            _power_steps_(W, self._u, self._v, self.n_power_iterations, self.eps)
        else:
            power_iteration_(W, self._u, self._v, self.n_power_iterations, eps=self.eps)

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        if self.training:
            W = self._reshape_weight_to_matrix(weight.detach())
            if transforms_active():
                try:
                    self._power_step_(W)
                except RuntimeError as err:
                    raise RuntimeError(_TRANSFORM_TRAINING_ERROR) from err
            else:
                self._power_step_(W)
        fused = (self.dim == 0 and weight.dtype in (torch.float32, torch.float64)
                 and not torch.compiler.is_compiling())
        if fused and not _records_derivatives(weight):
            # nothing will differentiate the value (an inference read): the node's forward
            # operations alone, on the buffers themselves (no copies, no node: about 10 of
            # 25 microseconds for a 64x64x3x3 kernel), bit for bit the same value
            matrix = weight.reshape(self._u.shape[0], self._v.shape[0])
            return weight / torch.vdot(self._u, torch.mv(matrix, self._v))
        # the estimate uses clones of u, v: a backward through two forwards sees the u, v of
        # its own forward although the buffers are updated in place
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        # one node with its own derivatives, in eager code; under torch.compile the same
        # formula by torch's operations (dynamo refuses a Function with a custom jvp)
        if fused:
            return _divide_by_sigma(weight, u, v)
        return weight / spectral_norm_estimate(self._reshape_weight_to_matrix(weight), u, v)

    def right_inverse(self, value: Tensor) -> Tensor:
        return value


def _solve_v_and_rescale(weight_mat: Tensor, u: Tensor, target_sigma: Tensor) -> Tensor:
    """The ``v`` of the oldest legacy format: ``v = pinv(W^T W) W^T u``, ``u^T W v = sigma``."""
    v = torch.linalg.multi_dot(
        [weight_mat.mT.mm(weight_mat).pinverse(), weight_mat.mT, u.unsqueeze(1)]
    ).squeeze(1)
    return v.mul_(target_sigma / torch.dot(u, torch.mv(weight_mat, v)))


class _LegacyKeysHook:
    """Load-state-dict pre-hook: legacy ``{name}_orig, {name}_u, {name}_v`` -> parametrization keys.

    The oldest legacy format stored ``{name}`` (= ``{name}_orig / sigma``) instead of
    ``{name}_v``; ``v`` is then recovered as the legacy loader does.
    """

    def __init__(self, name: str, index: int, sn: _SpectralNorm) -> None:
        self.name, self.index, self.sn = name, index, sn

    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys,
                 unexpected_keys, error_msgs) -> None:
        key = prefix + self.name
        if key + "_orig" not in state_dict or key + "_u" not in state_dict:
            return
        weight_orig = state_dict.pop(key + "_orig")
        u = state_dict.pop(key + "_u")
        weight = state_dict.pop(key, None)
        v = state_dict.pop(key + "_v", None)
        if v is None and weight is not None:
            with torch.no_grad():
                sigma = (weight_orig / weight).mean()
                v = _solve_v_and_rescale(self.sn._reshape_weight_to_matrix(weight_orig), u, sigma)
        new = f"{prefix}parametrizations.{self.name}."
        state_dict[new + "original"] = weight_orig
        state_dict[f"{new}{self.index}._u"] = u
        if v is not None:
            state_dict[f"{new}{self.index}._v"] = v


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> nn.Module:
    r"""Apply spectral normalization to a parameter in the given module.

    Drop-in twin of :func:`torch.nn.utils.parametrizations.spectral_norm`:
    ``W_SN = W / sigma(W)`` with ``sigma`` estimated by power iteration (``u, v`` buffers,
    ``n_power_iterations`` steps per access in training mode); a 1-D tensor is normalized.

    Args:
        module: containing module.
        name: name of the weight parameter. Default: ``"weight"``.
        n_power_iterations: power-iteration steps per access (positive). Default: 1.
        eps: epsilon of the normalizations. Default: ``1e-12``.
        dim: dimension of the outputs. Default: 0, except 1 for ``ConvTranspose{1,2,3}d``.

    Returns:
        The module, with the parametrization registered on ``name``. Legacy
        (:func:`torch.nn.utils.spectral_norm`) ``state_dict`` keys load into it.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        dim = 1 if isinstance(module, transposed) else 0
    sn = _SpectralNorm(weight, n_power_iterations, dim, eps)
    parametrize.register_parametrization(module, name, sn)
    install_fast_read(module, name)  # reads call the parametrization directly (same value)
    index = len(module.parametrizations[name]) - 1
    module._register_load_state_dict_pre_hook(_LegacyKeysHook(name, index, sn))
    return module
