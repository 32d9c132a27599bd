"""Riemannian stochastic gradient descent with momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _stiefel
from ._riemannian import (
    Bucket,
    RiemannianMixin,
    check_lr,
    check_nonnegative,
    copy_rows,
    fused_path,
    stack,
)

__all__ = ["RiemannianSGD"]


def _momentum_buffers_of(state, params: list[Tensor]) -> tuple[list[bool], list[Tensor]]:
    """Each parameter's momentum buffer (zeros where none exists yet), and which are new.

    A buffer of another dtype or device than its parameter (the module was converted after
    some steps: ``model.double()``, ``model.to(device)``) is converted to the parameter's, as
    ``load_state_dict`` converts the state it loads; torch's SGD, whose in-place updates
    promote, steps such a parameter too."""
    states = [state[p] for p in params]
    fresh = [("momentum_buffer" not in s or s["momentum_buffer"] is None) for s in states]
    for p, s, new in zip(params, states, fresh):
        if new:
            s["momentum_buffer"] = torch.zeros_like(params[0])
        elif s["momentum_buffer"].dtype != p.dtype or s["momentum_buffer"].device != p.device:
            s["momentum_buffer"] = s["momentum_buffer"].to(p)
    return fresh, [s["momentum_buffer"] for s in states]


class RiemannianSGD(RiemannianMixin, torch.optim.SGD):
    r"""SGD on manifolds, with the arguments of :class:`torch.optim.SGD` but ``fused`` and
    ``differentiable``.

    For a :class:`~dtriv.optim.ManifoldParameter` ``X`` on a manifold :math:`M` with
    Euclidean gradient :math:`G`, one step is

    .. math::

        g &= P_X(G + \lambda X) \qquad\text{(Riemannian gradient, } P_X
              = \texttt{manifold.proj\_tangent)} \\
        b &\leftarrow \mu\, b + (1 - \tau)\, g \qquad (b = g \text{ at the first step}) \\
        d &= g + \mu b \text{ (nesterov) or } b \text{ (else; } d = g \text{ without momentum)} \\
        X' &= R_X(-\eta\, d), \qquad b \leftarrow \mathcal{T}_{X \to X'}(b)

    with :math:`\eta` = ``lr``, :math:`\mu` = ``momentum``, :math:`\tau` = ``dampening``,
    :math:`\lambda` = ``weight_decay``, :math:`R` the retraction of the group (``retraction``:
    ``None`` for the manifold's default, a name, or a mapping from manifold classes to names)
    and :math:`\mathcal{T}` the manifold's vector transport (projection onto the new tangent
    space). The momentum buffer is initialised with the first Riemannian gradient, as
    :class:`torch.optim.SGD` does (geoopt initialises it with the Euclidean gradient).

    ``stabilize``: every that many steps of a group, its manifold parameters are projected
    onto their manifold and their momentum buffers onto the tangent space there (geoopt's option of
    the same name), so that the float drift of non-projecting retractions (``expm``,
    ``cayley``) does not accumulate; ``None`` (default): never. :meth:`stabilize` does it
    at once.

    Plain (Euclidean) parameters in the same groups get exactly the update of
    :class:`torch.optim.SGD`: the torch step itself runs on them. Manifold parameters of
    the same manifold, shape, dtype, device and retraction are stacked and updated by one
    batched call of the manifold maps. Cost per bucket of ``m`` Stiefel ``(n, k)``
    parameters: one tangent projection, one retraction and one transport, each
    O(m n k^2).

    Real :class:`~dtriv.manifolds.Stiefel` buckets take a fused path (batched products, see
    :mod:`dtriv.optim._stiefel`), and so do real :class:`~dtriv.manifolds.Sphere` buckets
    without nesterov (:mod:`dtriv.optim._sphere`); with momentum and without nesterov they
    defer the transport (a projection, hence linear) to the next step, where it is fused
    with the projection of the next gradient: the same iterates (on Stiefel two ``n x k``
    products per step instead of four), and ``momentum_buffer`` holds the buffer at the
    previous point (its projection at the parameter is the transported buffer). The iterates
    are the same while the parameters hold the points this optimizer wrote and the momentum
    stays on: after a point written between steps, or steps with ``momentum=0``, the fused
    paths project the stored buffer at the current point directly, where the generic path
    (and geoopt) continues from the buffer it transported to the point it last wrote. On that
    path, and without momentum (where the step :math:`X \leftarrow R_X(-\eta\, P_X(G))` is
    in place too), the Stiefel QR retraction and the storage of multi-parameter buckets are
    those of :class:`RiemannianAdam` (block Cholesky QR when provably safe; the parameters'
    ``.data`` and ``momentum_buffer`` re-pointed once to rows of persistent stacked
    buffers when the parameters own their memory).
    """

    _tangent_state = ("momentum_buffer",)
    _torch_optimizer = torch.optim.SGD

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        retraction: Any = None,
        stabilize: int | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        self._check_hyperparameters(dict(lr=lr, momentum=momentum, dampening=dampening,
                                         weight_decay=weight_decay, nesterov=nesterov))
        self._default_retraction_spec = retraction
        self._default_stabilize = stabilize
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
        )
        # kept in ``defaults`` (which pickling and deepcopy keep) for groups added later
        self.defaults.update(retraction=retraction, stabilize=stabilize)

    @staticmethod
    def _check_hyperparameters(group: dict[str, Any]) -> None:
        """``ValueError`` naming the first of the group's ``lr``, ``momentum``,
        ``dampening`` (in ``[0, 1]``), ``weight_decay`` and ``nesterov`` (momentum > 0 and
        no dampening) that is out of range: for the constructor's arguments and for each
        group added, whose own values torch does not check."""
        check_lr(group["lr"])
        check_nonnegative(group["momentum"], "momentum")
        check_nonnegative(group["dampening"], "dampening")
        if not float(group["dampening"]) <= 1.0:
            raise ValueError(f"dampening: expected a number in [0, 1], got {group['dampening']!r}")
        check_nonnegative(group["weight_decay"], "weight_decay")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "nesterov: expected momentum > 0 and dampening = 0 with nesterov=True, "
                f"got momentum={group['momentum']}, dampening={group['dampening']}"
            )

    def _update_bucket(self, group: dict[str, Any], bucket: Bucket) -> None:
        manifold, params = bucket.manifold, bucket.params
        lr, momentum = group["lr"], group["momentum"]
        dampening, weight_decay = group["dampening"], group["weight_decay"]

        path = fused_path(manifold, params[0])
        # a fused bucket without Nesterov momentum (plain or lazy momentum step) is updated in
        # place, a multi-parameter one in persistent buffers; with Nesterov momentum a
        # Stiefel bucket takes the fused maps out of place, a sphere one the generic path
        in_place = path is not None and not group["nesterov"]
        stiefel_maps = path is _stiefel
        # several parameters that own their memory: persistent stacked buffers (else stacked
        # copies, written back)
        persistent = in_place and len(params) > 1 and self._stackable(params)
        X = self._stacked(params) if persistent else stack(params)
        G = bucket.stacked_grads()
        if group["maximize"]:
            G = -G
        if weight_decay != 0:
            G = G.add(X, alpha=weight_decay)
        if in_place:
            # fused path: the same formulas on a batch view of the points, in place
            Gb = path.as_batch(manifold, G)
            if momentum == 0:
                self._plain_step(group, bucket, path, X, Gb)
            else:
                self._lazy_momentum_step(group, bucket, path, X, Gb, persistent)
            if len(params) > 1 and not persistent:  # a stacked copy: written back
                copy_rows(params, X)
                self._mark_on_manifold(params)
            return
        if stiefel_maps:
            # the fused Stiefel maps on the tall batch (m, n, k)
            Xb = _stiefel.as_batch(manifold, X)
            Gb = _stiefel.as_batch(manifold, G)
            grad = _stiefel.riemannian_grad(Xb, Gb)
        else:
            grad = manifold.proj_tangent(X, G)

        def move(direction: Tensor) -> Tensor:
            if not stiefel_maps:
                return _stiefel.settle_points(
                    manifold, bucket.method,
                    manifold.retract(X, direction.mul(-lr), bucket.method))
            Q = _stiefel.retract(manifold, bucket.method, Xb, direction, -lr)
            return (Q.mT if manifold.wide else Q).reshape(X.shape)

        if momentum == 0:
            copy_rows(params, move(grad))
            return

        fresh, buffers = _momentum_buffers_of(self.state, params)
        buf = stack(buffers)
        if stiefel_maps:
            # the lazy momentum step leaves buffers at the previous point (see
            # _lazy_momentum_step): project them, in case that step wrote them (nesterov
            # turned on mid-run, or a state dict saved without it); idempotent otherwise
            buf = _stiefel.transport(Xb, _stiefel.as_batch(manifold, buf))
        elif path is not None:  # a sphere bucket: the same, by the manifold's map
            buf = manifold.proj_tangent(X, buf)
        buf = buf.mul(momentum).add_(grad, alpha=1 - dampening)
        if any(fresh):
            mask = torch.tensor(fresh, device=X.device)
            if stiefel_maps:  # one row per point of the tall batch
                mask = mask.repeat_interleave(buf.shape[0] // len(params))
            mask = mask.view((-1,) + (1,) * (buf.ndim - 1))
            buf = torch.where(mask, grad, buf)
        direction = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        X_new = move(direction)
        if stiefel_maps:
            Q = _stiefel.as_batch(manifold, X_new)
            moved = _stiefel.transport(Q, buf)
            moved = (moved.mT if manifold.wide else moved).reshape(X.shape)
        else:
            moved = manifold.transport(X, X_new, buf)
        copy_rows(buffers, moved)
        copy_rows(params, X_new)

    def _plain_step(self, group, bucket, path, X, Gb) -> None:
        r"""Step without momentum of a fused bucket (``path``: its module, see
        :func:`~dtriv.optim._riemannian.fused_path`), in place: :math:`X \leftarrow
        R_X(-\eta\, P_X(G))` (on Stiefel, for ``qr`` with a trusted point, the block Cholesky
        QR of :func:`~dtriv.optim._stiefel.retract_`)."""
        manifold, params = bucket.manifold, bucket.params
        Xb, x_view = path.batch_view(manifold, X)
        grad = path.gradient(manifold, Xb, Gb)
        path.retract_(manifold, bucket.method, Xb, grad, -group["lr"], self._on_manifold(params))
        if not x_view:
            path.write_back(manifold, X, Xb)
        self._mark_on_manifold(params)

    def _lazy_momentum_step(self, group, bucket, path, X, Gb, persistent: bool) -> None:
        r"""Momentum step of a fused bucket (Stiefel or sphere) with the transport deferred.

        The transport is the projection onto the tangent space at the new point, which is
        linear, so :math:`\mu\, P_X(b) + (1 - \tau) P_X(G) = P_X(\mu b + (1 - \tau) G)`: the
        buffer is stored where it was used (tangent at the previous point) and moved by
        the projection that also turns the next gradient into a Riemannian one. The
        iterates are those of the eager formula (two products per step fewer: 2 instead
        of 4). ``momentum_buffer`` thus holds the buffer at the previous point; its
        projection onto the tangent space at the parameter is the transported buffer
        (what :meth:`stabilize` stores).
        """
        manifold, params = bucket.manifold, bucket.params
        momentum, dampening, lr = group["momentum"], group["dampening"], group["lr"]
        fresh, buffers = _momentum_buffers_of(self.state, params)
        stacked = self._stacked(params, "momentum_buffer") if persistent else stack(buffers)
        raw, raw_view = path.batch_view(manifold, stacked)
        Xb, x_view = path.batch_view(manifold, X)
        if dampening == 1 or any(fresh):
            # the first buffer is the Riemannian gradient itself (torch's convention)
            column = (-1,) + (1,) * (Xb.ndim - 1)
            scale = torch.tensor(
                [0.0 if new else momentum for new in fresh], dtype=Xb.dtype, device=Xb.device
            ).repeat_interleave(Xb.shape[0] // len(params)).view(column)
            lead = torch.tensor(
                [1.0 if new else 1 - dampening for new in fresh],
                dtype=Xb.dtype, device=Xb.device,
            ).repeat_interleave(Xb.shape[0] // len(params)).view(column)
            raw.copy_(path.gradient(manifold, Xb, torch.addcmul(Gb * lead, raw, scale)))
        else:
            # in place: raw <- M = G + mu/(1 - tau) raw, then (1 - tau) P_X(M)
            torch.add(Gb, raw, alpha=momentum / (1 - dampening), out=raw)
            path.project_(manifold, Xb, raw, 1 - dampening)
        path.retract_(manifold, bucket.method, Xb, raw, -lr, self._on_manifold(params))
        if not raw_view:
            path.write_back(manifold, stacked, raw)
        if not x_view:
            path.write_back(manifold, X, Xb)
        if len(params) > 1 and not persistent:  # a stacked copy: written back
            copy_rows(buffers, stacked)
        self._mark_on_manifold(params)
