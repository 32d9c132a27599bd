"""Riemannian Adam (Bécigneul & Ganea, 2019), in geoopt's convention."""

from __future__ import annotations

from typing import Any

import torch

from . import _stiefel
from ._riemannian import (
    Bucket,
    RiemannianMixin,
    check_lr,
    check_nonnegative,
    check_unit_interval,
    copy_rows,
    stack,
)

__all__ = ["RiemannianAdam"]


class RiemannianAdam(RiemannianMixin, torch.optim.Adam):
    r"""Adam on manifolds, with the arguments of :class:`torch.optim.Adam` but ``fused``,
    ``capturable``, ``differentiable`` and ``decoupled_weight_decay``.

    For a :class:`~dtriv.optim.ManifoldParameter` ``X`` with Euclidean gradient :math:`G`,
    step :math:`t` is

    .. math::

        g &= P_X(G + \lambda X) \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) \langle g, g \rangle_X \\
        d &= \frac{m / (1 - \beta_1^t)}{\sqrt{\hat v / (1 - \beta_2^t)} + \epsilon},
            \qquad \hat v = v \text{ or } \max_{s \le t} v_s \text{ (amsgrad)} \\
        X' &= R_X(-\eta\, d), \qquad m \leftarrow \mathcal{T}_{X \to X'}(m)

    The second moment :math:`v` is one number per point (the squared Riemannian norm of
    the gradient, :meth:`Manifold.inner`), since coordinate-wise scaling would leave the
    tangent space; it is stored with the batch shape of the point and singleton manifold
    dimensions. This is geoopt's ``RiemannianAdam``: with the same retraction and
    transport both follow the same trajectory.

    ``stabilize``: every that many steps of a group, its manifold parameters are projected
    onto their manifold and their first moments onto the tangent space there (geoopt's option of
    the same name), so that the float drift of non-projecting retractions (``expm``,
    ``cayley``) does not accumulate; ``None`` (default): never. :meth:`stabilize` does it
    at once.

    Real :class:`~dtriv.manifolds.Stiefel` buckets take a fused path (batched products, see
    :mod:`dtriv.optim._stiefel`) that defers the transport of the first moment (a
    projection, hence linear) to the next step, where it is fused with the projection of
    the next gradient: :math:`\beta_1 P_X(m) + (1 - \beta_1) P_X(G) = P_X(\beta_1 m + (1 -
    \beta_1) G)`, the same iterates for three ``n x k`` products per step instead of four;
    ``exp_avg`` then holds the moment at the previous point (its projection at the
    parameter is the transported moment, what :meth:`stabilize` stores). The QR retraction
    there runs as recursive block Cholesky QR when the point is the one this optimizer
    wrote, a randomized test of one pass finds it orthonormal (a write through ``p.data``
    escapes the first test) and :math:`c^2 \|m\|_F^2 \le 2` for the step :math:`c\, m`
    (then :math:`\kappa(X + c m)^2 \le 3`), else as checked Cholesky/Householder QR. A
    bucket of several Stiefel parameters is kept in persistent stacked buffers: at its
    first step the parameters' ``.data`` and their ``exp_avg`` are re-pointed to rows of
    one ``(m, n, k)`` tensor each (same values), so that no step copies them; a parameter
    whose ``.data`` or state is later replaced (``load_state_dict`` included) is re-stacked.
    (A tensor of one such parameter saved on its own carries its bucket's whole storage;
    save ``p.detach().clone()`` to store it alone.)

    Plain parameters in the same groups get exactly the update of :class:`torch.optim.Adam`
    (the torch step runs on them). Manifold parameters of equal manifold, shape, dtype,
    device and retraction are stacked and updated together: per bucket one tangent
    projection, one inner product, one retraction and one transport (Stiefel ``(n, k)``:
    O(m n k^2)).
    """

    _tangent_state = ("exp_avg",)
    _torch_optimizer = torch.optim.Adam

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        retraction: Any = None,
        stabilize: int | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_lr(lr)
        check_nonnegative(eps, "eps")
        check_nonnegative(weight_decay, "weight_decay")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        check_unit_interval(betas[0], "betas[0]")
        check_unit_interval(betas[1], "betas[1]")
        self._default_retraction_spec = retraction
        self._default_stabilize = stabilize
        super().__init__(
            params,
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
        )
        # kept in ``defaults`` (which pickling and deepcopy keep) for groups added later
        self.defaults.update(retraction=retraction, stabilize=stabilize)

    def _update_bucket(self, group: dict[str, Any], bucket: Bucket) -> None:
        manifold, params = bucket.manifold, bucket.params
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        p0 = params[0]
        point_dims = len(manifold.shape)
        scalar_shape = tuple(p0.shape[: p0.ndim - point_dims]) + (1,) * point_dims

        states = [self.state[p] for p in params]
        for s in states:
            if len(s) == 0:
                s["step"] = torch.tensor(0.0, dtype=torch.float32)
                s["exp_avg"] = torch.zeros_like(p0, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = p0.new_zeros(scalar_shape)
                if amsgrad:
                    s["max_exp_avg_sq"] = p0.new_zeros(scalar_shape)
            elif amsgrad and "max_exp_avg_sq" not in s:
                s["max_exp_avg_sq"] = p0.new_zeros(scalar_shape)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        counts = torch.stack(steps).tolist() if len(steps) > 1 else [steps[0].item()]

        fast = _stiefel.fast_stiefel(manifold, p0)
        # the fused path updates a multi-parameter bucket in place in persistent buffers
        persistent = fast and len(params) > 1
        X = self._stacked(params) if persistent else stack(params)
        G = bucket.stacked_grads()
        if group["maximize"]:
            G = -G
        if weight_decay != 0:
            G = G.add(X, alpha=weight_decay)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        col = (-1,) + (1,) * (X.ndim - 1)
        bc1 = torch.tensor([1 - beta1**t for t in counts], dtype=X.dtype, device=X.device)
        bc2 = torch.tensor([1 - beta2**t for t in counts], dtype=X.dtype, device=X.device)

        if fast:
            # fused path: the same formulas on the tall batch (m, n, k), in place, with the
            # transport of the first moment deferred (see the class docstring)
            Xb, x_view = _stiefel.tall_view(manifold, X)
            Gb = _stiefel.as_batch(manifold, G)
            stacked_avg = self._stacked(params, "exp_avg") if persistent else stack(exp_avgs)
            mb, m_view = _stiefel.tall_view(manifold, stacked_avg)
            m, sq = _stiefel.moment_and_sq_norm_(Xb, Gb, mb, beta1)
            sq_norm = sq.reshape((len(params),) + scalar_shape)
        else:
            grad = manifold.proj_tangent(X, G)
            m = stack(exp_avgs).mul(beta1).add_(grad, alpha=1 - beta1)
            sq_norm = manifold.inner(X, grad, grad).reshape((len(params),) + scalar_shape)
        v = stack(exp_avg_sqs).mul(beta2).add_(sq_norm, alpha=1 - beta2)
        if amsgrad:
            max_sqs = [s["max_exp_avg_sq"] for s in states]
            v_hat = torch.maximum(stack(max_sqs), v)
            copy_rows(max_sqs, v_hat)
        else:
            v_hat = v

        if fast:
            # direction -lr m / (bc1 (sqrt(v_hat / bc2) + eps)): one scalar per point
            c = v_hat.div(bc2.view(col)).sqrt_().add_(eps).mul_(bc1.view(col)).reciprocal_()
            c = c.mul_(-lr).reshape(-1, 1, 1)
            trusted = self._on_manifold(params)
            _stiefel.retract_(manifold, bucket.method, Xb, m, c, trusted)
            if not m_view:
                _stiefel.write_back(manifold, stacked_avg, m)
            if not x_view:
                _stiefel.write_back(manifold, X, Xb)
            copy_rows(exp_avg_sqs, v)
            self._mark_on_manifold(params)
            return
        denom = v_hat.div(bc2.view(col)).sqrt_().add_(eps)
        direction = m.div(bc1.view(col)).div_(denom)

        X_new = _stiefel.settle_points(
            manifold, bucket.method, manifold.retract(X, direction.mul_(-lr), bucket.method))
        copy_rows(exp_avgs, manifold.transport(X, X_new, m))
        copy_rows(exp_avg_sqs, v)
        copy_rows(params, X_new)
