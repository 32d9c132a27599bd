"""Riemannian Adam (Bécigneul & Ganea, 2019), in geoopt's convention."""

from __future__ import annotations

import math
from typing import Any

import torch

from dtriv.retractions._common import one_point_on_cpu

from . import _stiefel
from ._riemannian import (
    Bucket,
    RiemannianMixin,
    check_lr,
    check_nonnegative,
    check_unit_interval,
    copy_rows,
    fused_path,
    stack,
)

__all__ = ["RiemannianAdam"]


def _nan_max(a: float, b: float) -> float:
    """``max(a, b)``, NaN when either is (as ``torch.maximum``)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _column(values: list[float], X: torch.Tensor, shape: tuple[int, ...]
            ) -> torch.Tensor | float:
    """One number per parameter, as a tensor of the dtype and device of ``X`` viewed
    ``shape``; the number itself when all are equal (parameters stepped as often: one
    tensor construction less, about 7 us)."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=X.dtype, device=X.device).view(shape)


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
    :mod:`dtriv.optim._stiefel`), and real :class:`~dtriv.manifolds.Sphere` buckets one of
    their own (:mod:`dtriv.optim._sphere`, a few passes per point). Both defer the transport
    of the first moment (a projection, hence linear) to the next step, where it is fused with
    the projection of the next gradient: :math:`\beta_1 P_X(m) + (1 - \beta_1) P_X(G) =
    P_X(\beta_1 m + (1 - \beta_1) G)`, the same iterates (on Stiefel three ``n x k``
    products per step instead of four); ``exp_avg`` then holds the moment at the previous
    point (its projection at the parameter is the transported moment, what
    :meth:`stabilize` stores). The iterates are the same while the parameters hold the points
    this optimizer wrote: at a point written between steps the fused paths project the stored
    moment there directly, where the generic path (and geoopt) uses the moment it transported
    to the point it wrote, as it is (float64, Stiefel (8, 4), one such write: 2e-3 apart
    after 20 more steps). The Stiefel QR retraction there runs as recursive block
    Cholesky QR when the point is the one this optimizer wrote, a randomized test of one
    pass finds it orthonormal (exact for one point of at most 64 x 64 entries; a write
    through ``p.data`` escapes the first test) and
    :math:`c^2 \|m\|_F^2 \le 2` for the step :math:`c\, m` (then :math:`\kappa(X + c
    m)^2 \le 3`), else as checked Cholesky/Householder QR. A bucket of several Stiefel
    parameters is kept in persistent stacked buffers: at its first step the parameters'
    ``.data`` and their ``exp_avg`` are re-pointed to rows of one ``(m, n, k)`` tensor each
    (same values, and the parameters' layout), so that no step copies them; a parameter
    whose ``.data`` or state is later replaced (``load_state_dict`` included) is re-stacked.
    Only parameters that own their memory are re-pointed: a bucket with a view of a larger
    tensor, parameters tied to one memory or in shared memory (``share_memory_()``) is
    stacked and written back at each step instead, which keeps the ties.
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
        self._check_hyperparameters(dict(lr=lr, betas=betas, eps=eps,
                                         weight_decay=weight_decay))
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

    @staticmethod
    def _check_hyperparameters(group: dict[str, Any]) -> None:
        """``ValueError`` naming the first of the group's ``lr``, ``betas`` (a pair in
        ``[0, 1)``), ``eps`` and ``weight_decay`` that is out of range: for the constructor's
        arguments and for each group added, whose own values torch does not check."""
        check_lr(group["lr"])
        check_nonnegative(group["eps"], "eps")
        check_nonnegative(group["weight_decay"], "weight_decay")
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        check_unit_interval(betas[0], "betas[0]")
        check_unit_interval(betas[1], "betas[1]")

    def _check_loaded_state(self, p: torch.Tensor, manifold: Any, entries: dict[str, Any],
                            index: int) -> None:
        """The second moments of a manifold parameter are one number per point: a state
        with others (``torch.optim.Adam``'s, one per entry) is refused, naming the entry,
        before anything is loaded."""
        point_dims = len(manifold.shape)
        shape = tuple(p.shape[: p.ndim - point_dims]) + (1,) * point_dims
        for name in ("exp_avg_sq", "max_exp_avg_sq"):
            value = entries.get(name)
            if isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
                raise ValueError(
                    f"state_dict: expected state[{index}][{name!r}] of shape {shape} (one "
                    f"second moment per point of {manifold!r}), got {tuple(value.shape)}: "
                    "a state saved by another optimizer?"
                )

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
        if len(steps) == 1:  # (a foreach call costs three times one op on one tensor)
            counts = [steps[0].add_(1.0).item()]
        else:
            torch._foreach_add_(steps, 1.0)
            counts = torch.stack(steps).tolist()

        fused = fused_path(manifold, p0)
        # the fused path updates a multi-parameter bucket in place in persistent buffers
        persistent = fused is not None and len(params) > 1 and self._stackable(params)
        X = self._stacked(params) if persistent else stack(params)
        G = bucket.stacked_grads()
        if group["maximize"]:
            G = -G
        if weight_decay != 0:
            G = G.add(X, alpha=weight_decay)
        exp_avgs = [s["exp_avg"] for s in states]
        bc1 = [1 - beta1**t for t in counts]
        bc2 = [1 - beta2**t for t in counts]

        if fused is not None:
            # fused path: the same formulas on a batch view of the points (Stiefel: the tall
            # batch (m, n, k); sphere: rows (m, n)), in place, with the transport of the
            # first moment deferred (see the class docstring)
            Xb, x_view = fused.batch_view(manifold, X)
            Gb = fused.as_batch(manifold, G)
            stacked_avg = self._stacked(params, "exp_avg") if persistent else stack(exp_avgs)
            mb, m_view = fused.batch_view(manifold, stacked_avg)
            # one point on CPU: the second moment and the step size are numbers on the host
            # (a dozen tensor ops on single numbers cost a fifth of a (64, 64) step)
            on_host = one_point_on_cpu(Xb)
            m, sq = fused.moment_(manifold, Xb, Gb, mb, beta1, on_host)
            if on_host:
                c = self._host_step_size(states[0], sq, group, bc1[0], bc2[0])
            else:
                c = self._step_sizes(states, sq, group, bc1, bc2, Xb.ndim)
            trusted = self._on_manifold(params)
            fused.retract_(manifold, bucket.method, Xb, m, c, trusted)
            if not m_view:
                fused.write_back(manifold, stacked_avg, m)
            if not x_view:
                fused.write_back(manifold, X, Xb)
            if len(params) > 1 and not persistent:  # stacked copies: written back
                copy_rows(exp_avgs, stacked_avg)
                copy_rows(params, X)
            self._mark_on_manifold(params)
            return
        grad = manifold.proj_tangent(X, G)
        m = stack(exp_avgs).mul(beta1).add_(grad, alpha=1 - beta1)
        sq_norm = manifold.inner(X, grad, grad).reshape((len(params),) + scalar_shape)
        v_hat = self._second_moments(states, sq_norm, group)
        col = (-1,) + (1,) * (X.ndim - 1)
        denom = v_hat.div(_column(bc2, X, col)).sqrt_().add_(eps)
        direction = m.div(_column(bc1, X, col)).div_(denom)

        X_new = _stiefel.settle_points(
            manifold, bucket.method, manifold.retract(X, direction.mul_(-lr), bucket.method))
        copy_rows(exp_avgs, manifold.transport(X, X_new, m))
        copy_rows(params, X_new)

    @staticmethod
    def _second_moments(states: list[dict[str, Any]], sq_norm: torch.Tensor,
                        group: dict[str, Any]) -> torch.Tensor:
        r"""Update the second moments ``exp_avg_sq`` (and ``max_exp_avg_sq``) of the points by
        their squared gradient norms ``sq_norm`` (stacked, of the states' shape); returns
        :math:`\hat v`, stacked."""
        beta2 = group["betas"][1]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        v = stack(exp_avg_sqs).mul(beta2).add_(sq_norm, alpha=1 - beta2)
        copy_rows(exp_avg_sqs, v)
        if not group["amsgrad"]:
            return v
        max_sqs = [s["max_exp_avg_sq"] for s in states]
        v_hat = torch.maximum(stack(max_sqs), v)
        copy_rows(max_sqs, v_hat)
        return v_hat

    def _step_sizes(self, states: list[dict[str, Any]], sq: torch.Tensor,
                    group: dict[str, Any], bc1: list[float], bc2: list[float],
                    ndim: int) -> torch.Tensor:
        r"""The fused path's step sizes :math:`c = -\eta / (b_1 (\sqrt{\hat v / b_2} +
        \epsilon))`, one per point ``(m, 1, ...)`` for a batch of ``ndim`` dimensions, after
        updating the second moments by the squared norms ``sq`` (``(m,)``; ``b_1, b_2`` the
        bias corrections of the points)."""
        shape = (len(states),) + tuple(states[0]["exp_avg_sq"].shape)
        v_hat = self._second_moments(states, sq.reshape(shape), group)
        col = (-1,) + (1,) * (v_hat.ndim - 1)
        c = v_hat.div(_column(bc2, sq, col)).sqrt_().add_(group["eps"])
        c = c.mul_(_column(bc1, sq, col)).reciprocal_().mul_(-group["lr"])
        return c.reshape((-1,) + (1,) * (ndim - 1))

    @staticmethod
    def _host_step_size(state: dict[str, Any], sq: float, group: dict[str, Any],
                        bc1: float, bc2: float) -> float:
        """:meth:`_step_sizes` for one point, on the host (one read of each stored moment and
        one write)."""
        beta2 = group["betas"][1]
        v = beta2 * state["exp_avg_sq"].item() + (1 - beta2) * sq
        state["exp_avg_sq"].fill_(v)
        if group["amsgrad"]:
            v = _nan_max(state["max_exp_avg_sq"].item(), v)
            state["max_exp_avg_sq"].fill_(v)
        denominator = bc1 * (math.sqrt(v / bc2) + group["eps"])
        lr = float(group["lr"])  # (a tensor lr would round the step to its own precision)
        if denominator == 0:  # eps = 0 and no gradient yet: the tensor path's -lr / 0
            return -math.inf if lr else math.nan
        return -lr / denominator
