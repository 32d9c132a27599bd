r"""Retractions of the unit sphere :math:`S^{n-1} = \{x : \|x\| = 1\}` (last dimension).

A point ``x`` and a tangent vector ``v`` (:math:`\operatorname{Re}\langle x, v\rangle = 0`)
have shape ``(..., n)``; leading dimensions are a batch. Complex vectors are treated as real
vectors of :math:`\mathbb{R}^{2n}` (inner product :math:`\operatorname{Re}\, x^H v`).

* :func:`sphere_exp` -- the exponential map (geodesic) :math:`\cos\|v\|\,x + \sin\|v\|\,v/\|v\|`,
  evaluated through even power series near :math:`v = 0`, so that it and its gradient are
  finite and exact there;
* :func:`sphere_log` -- its inverse, the tangent at ``x`` pointing to ``y`` with length the
  angle between them;
* :func:`sphere_projective` -- the projective retraction :math:`(x + v)/\|x + v\|`;
* :func:`sphere_projective_inverse` -- :math:`y/\langle x, y\rangle - x`.

Registered as kind ``"sphere"``: ``"exp"`` (inverse :func:`sphere_log`) and ``"projective"``
(inverse :func:`sphere_projective_inverse`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from ._common import (
    backward_without_autocast,
    check_floating,
    check_same_shape,
    compute_dtype,
    eager_context,
    eps,
    forward_ad_active,
    jvp_differentiated,
    nested_forward_ad,
    no_host_reads,
    raw_apply,
    reports_backward,
    transforms_active,
    unwrap_if_dead,
    upcast_half,
    values_checkable,
)
from .registry import register

__all__ = ["sphere_exp", "sphere_log", "sphere_projective", "sphere_projective_inverse"]

# Below this value of the squared argument the maps use their power series (the truncation
# error of the series kept is below float64 rounding there).
_SERIES = 1e-2
# From this many entries on, the projective trivialization forms x + P_x(X) in one pass with an
# in-place ``c - 1`` on the per-vector coefficient; below it the extra pass over the vectors
# costs less than that scalar-tensor op (a few microseconds of dispatch).
_ONE_PASS_NUMEL = 1 << 15
# cos(t) = sum_j (-1)^j t^(2j) / (2j)!, sin(t)/t = sum_j (-1)^j t^(2j) / (2j+1)!, j = 0..4.
_COS = tuple((-1) ** j / math.factorial(2 * j) for j in range(5))
_SINC = tuple((-1) ** j / math.factorial(2 * j + 1) for j in range(5))
# arctan(z)/z = sum_j (-1)^j z^(2j) / (2j+1), j = 0..7.
_ATANC = tuple((-1) ** j / (2 * j + 1) for j in range(8))
# d/dz [sin(sqrt z)/sqrt z] = sum_j (-1)^j j z^(j-1) / (2j+1)!, j = 1..6.
_DSINC = tuple((-1) ** j * j / math.factorial(2 * j + 1) for j in range(1, 7))
_TWO_DSINC = tuple(2 * c for c in _DSINC)


def _horner(coeffs: tuple[float, ...], z: Tensor | float) -> Tensor | float:
    r""":math:`\sum_j c_j z^j` (``coeffs`` from :math:`c_0`, at least two) by Horner's rule,
    out of place (it may be differentiated); ``z`` a tensor or a number."""
    out = z * coeffs[-1] + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        out = out * z + c
    return out


def _check_vectors(x: Tensor, other: Tensor, name_x: str, name_other: str) -> None:
    if (type(x) in _PLAIN and type(other) in _PLAIN and x.shape == other.shape and x.ndim
            and x.is_floating_point() and other.is_floating_point()):
        return  # the common case, in fewer reads than the checks below
    for t, name in ((x, name_x), (other, name_other)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.ndim < 1:
            raise ValueError(f"{name}: expected a vector or a batch of vectors, got a scalar")
        check_floating(t, name)
    check_same_shape(x, other, name_x, name_other)


def _promoted(x: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` and ``other`` in their promoted dtype, as the public maps' results are (a real
    point with a complex tangent: the point of the complex sphere)."""
    if x.dtype == other.dtype:
        return x, other
    dtype = torch.promote_types(x.dtype, other.dtype)
    return x.to(dtype), other.to(dtype)


def _sqnorm(v: Tensor) -> Tensor:
    """:math:`\\|v\\|^2` over the last dimension, real, keepdim."""
    return (v.real**2 + v.imag**2 if v.is_complex() else v * v).sum(dim=-1, keepdim=True)


def _rdot(x: Tensor, y: Tensor) -> Tensor:
    """:math:`\\operatorname{Re}\\langle x, y\\rangle` over the last dimension, keepdim."""
    return (x.conj() * y).real.sum(dim=-1, keepdim=True) if x.is_complex() else (
        (x * y).sum(dim=-1, keepdim=True))


def _cos_sinc(t2: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\cos t` and :math:`\sin t / t` as functions of :math:`t^2`, smooth at 0."""
    small = t2 < _SERIES
    t = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    cos = torch.where(small, _horner(_COS, t2), torch.cos(t))
    sinc = torch.where(small, _horner(_SINC, t2), torch.sin(t) / t)
    return cos, sinc


# ---------------------------------------------------------------- fused autograd functions
def _rdot_fast(x: Tensor, y: Tensor) -> Tensor:
    """:math:`\\operatorname{Re}\\langle x, y\\rangle` over the last dimension, keepdim. ``x``
    and ``y`` may broadcast (one point and a batch of vectors). Real tensors: one product and
    one sum (``vecdot`` dispatches to the same product and sum through two more calls, and
    its result needs an ``unsqueeze``: the exponential trivialization of 64 vectors of 1024,
    forward and backward, went from 268 to 242 us with its three dot products so)."""
    if x.is_complex() or y.is_complex():
        d = torch.linalg.vecdot(x, y, dim=-1).real
        return d if d.dim() == 0 else d.unsqueeze(-1)
    return (x * y).sum(-1, keepdim=True)


#: the angle below which :func:`_cos_sinc_values` takes :math:`\sin t/t` at this angle (1
#: to rounding in float32 and float64 alike): :math:`0/0` at :math:`t = 0`
_TINY_ANGLE = 1e-30


def _cos_sinc_values(t: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\cos t` and :math:`\sin t/t` (values, not differentiable at 0), both of the
    same angle, so that :math:`\cos^2 t + (t \operatorname{sinc} t)^2 = 1` to rounding at
    every angle. (``torch.sinc(t / pi)`` rounds the angle :math:`t/\pi`: an error of
    :math:`\epsilon t` in the sine against the cosine, a constraint error of 1e-5 at
    :math:`t = 100` and 2e-3 at :math:`10^4` in float32.)"""
    tc = t.clamp_min(_TINY_ANGLE)
    return torch.cos(t), torch.sin(tc).div_(tc)


def _dsinc(z: Tensor, cos: Tensor, sinc: Tensor) -> Tensor:
    r"""The derivative of :math:`\operatorname{sinc}(z) = \sin\sqrt z/\sqrt z` in :math:`z`.

    :math:`\frac{\cos\sqrt z - \operatorname{sinc}(z)}{2z}`, or its power series for
    :math:`z < 10^{-2}`, where the difference cancels.
    """
    small = z < _SERIES
    direct = (cos - sinc) / (2 * torch.where(small, torch.ones_like(z), z))
    return torch.where(small, _horner(_DSINC, z), direct)


def _two_dsinc_of(t: float) -> float:
    r""":math:`2\operatorname{sinc}'(t^2)` for one angle ``t``, in double precision on the host:
    the power series below :math:`t^2 = 10^{-2}`, else :math:`(\cos t - \sin t/t)/t^2`; NaN
    for a non-finite angle, as the tensor formulas give (``math.cos`` raises there)."""
    if not math.isfinite(t):
        return math.nan
    z = t * t
    if z < _SERIES:
        return _horner(_TWO_DSINC, z)
    return (math.cos(t) - math.sin(t) / t) / z


def _two_dsinc(t: Tensor, cos: Tensor, sinc: Tensor) -> Tensor | float:
    r""":math:`2\operatorname{sinc}'(z)` at :math:`z = t^2` from saved values (no graph), for
    the exponential nodes, where it multiplies :math:`\operatorname{Re}\langle V, g\rangle V
    / r^2`, a vector of norm at most :math:`z \|g\|`.

    For one vector on the CPU, a number computed on the host from the angle
    (:func:`_two_dsinc_of`: one read of ``t`` instead of tensor ops on one entry; on an
    accelerator that read would synchronise the device). Otherwise, the direct formula
    :math:`(\cos t - \operatorname{sinc} t)/z`, ``z`` clamped to the smallest normal number:
    no host read and no selection. For small ``t`` the difference cancels (absolute error
    about :math:`2\epsilon`, so the coefficient's is :math:`2\epsilon/z`; 0 for :math:`z <
    \epsilon`, where both values round to 1), but what reaches the gradient is the coefficient
    times :math:`z`: an error of about :math:`2\epsilon\,\|g\|` at every angle, rounding.
    """
    if t.numel() == 1 and t.is_cpu and not (transforms_active() or no_host_reads(t)):
        return _two_dsinc_of(t.item())
    return (cos - sinc).div_((t * t).clamp_min_(torch.finfo(t.dtype).tiny))


def _tangent_reference(x: Tensor, X: Tensor, radius: float) -> Tensor:
    """``X - x Re<x, X>/r^2`` by differentiable torch operations (the nodes' recomputation
    for higher derivatives, and the reference composition)."""
    return X - x * (_rdot(x, X) / (radius * radius))


def _normalized(w: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """``(r w/|w|, r/|w|)`` by differentiable torch operations (out of place)."""
    scale = radius / torch.sqrt(_sqnorm(w))
    return w * scale, scale


def _exp_reference(x: Tensor, V: Tensor, radius: float) -> Tensor:
    cos, sinc = _cos_sinc(_sqnorm(V) / (radius * radius))
    return cos * x + sinc * V


def _projective_reference(x: Tensor, V: Tensor, radius: float) -> Tensor:
    return _normalized(x + V, radius)[0]


def _add_product(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out + a b``: written into ``out`` (a fresh tensor of the caller) in eager code, out
    of place under ``torch.func``, where ``out`` may come from a ZeroTensor (which cannot be
    written in place) and vmap has no batching rule for ``addcmul_`` (it warns and loops over
    the batch)."""
    return torch.addcmul(out, a, b) if transforms_active() else out.addcmul_(a, b)


def _sinc_g_plus(g: Tensor, sinc: Tensor, coef: Tensor, v: Tensor) -> Tensor:
    """``sinc g + coef v`` (:func:`_add_product`)."""
    return _add_product(torch.mul(g, sinc), coef, v)


def _exp_coefficients(V: Tensor, t: Tensor, cos: Tensor, sinc: Tensor, r2: float,
                      recompute: bool) -> tuple[Tensor, Tensor, Tensor | float]:
    r"""``(cos, sinc, d2)`` of the exponential nodes at :math:`z = \|V\|^2/r^2`, with ``d2``
    :math:`= 2\operatorname{sinc}'(z)`: recomputed from ``V`` by differentiable operations
    when ``recompute`` (a derivative of the jvp or backward is taken), else from the saved
    values (no graph)."""
    if recompute:
        return _recorded_coefficients(V, r2)
    return cos, sinc, _two_dsinc(t, cos, sinc)


def _recorded_coefficients(V: Tensor, r2: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(cos, sinc, d2)`` at :math:`z = \|V\|^2/r^2` by differentiable operations (power
    series near 0), ``d2`` :math:`= 2\operatorname{sinc}'(z)`."""
    z = _sqnorm(V) / r2
    cos, sinc = _cos_sinc(z)
    return cos, sinc, 2 * _dsinc(z, cos, sinc)


def _exp_grad_v(x: Tensor, V: Tensor, g: Tensor, sinc: Tensor, d2: Tensor | float,
                r2: float) -> Tensor:
    r""":math:`\bar V = \operatorname{sinc}\,g + (d_2 \operatorname{Re}\langle V, g\rangle -
    \operatorname{sinc} \operatorname{Re}\langle x, g\rangle)\,V/r^2`, the gradient in ``V``
    of ``cos(t) x + sinc(t) V`` (``d2`` :math:`= 2\operatorname{sinc}'(z)`)."""
    coef = torch.addcmul(d2 * _rdot_fast(V, g), sinc, _rdot_fast(x, g), value=-1)
    if r2 != 1.0:
        coef = coef / r2
    return _sinc_g_plus(g, sinc, coef, V)


def _normalize_(w: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    r"""``(r w/|w|, r/|w|)``, the first written into ``w`` (a fresh tensor of the caller)."""
    scale = torch.linalg.vector_norm(w, dim=-1, keepdim=True).reciprocal_()
    if radius != 1.0:
        scale.mul_(radius)
    return w.mul_(scale), scale


def _normalize_backward(y: Tensor, scale: Tensor, g: Tensor, r2: float) -> Tensor:
    r""":math:`\bar w = s\,(g - y\,\operatorname{Re}\langle y, g\rangle/r^2)`, the gradient of
    ``w -> y = r w/|w|`` (``s = r/|w|``): the projection of ``g`` orthogonal to ``y``, scaled."""
    a = _rdot_fast(y, g)
    if r2 != 1.0:
        a = a / r2
    return torch.addcmul(g, y, a, value=-1).mul_(scale)


def _tangent_backward(x: Tensor, X: Tensor, gV: Tensor, b: Tensor, r2: float,
                      needs: tuple[bool, ...], owned: bool = False
                      ) -> tuple[Tensor | None, Tensor | None]:
    r"""Gradients of ``(x, X) -> V = P_x(X) = X - x Re<x, X>/r^2`` given :math:`\bar V` and
    :math:`b = \operatorname{Re}\langle x, \bar V\rangle/r^2`: :math:`\bar X = \bar V - b\,x`
    and the part of :math:`\bar x` through ``V``, :math:`-c\,\bar V - b\,X`
    (:math:`c = \operatorname{Re}\langle x, X\rangle/r^2`). ``owned``: ``gV`` is a
    temporary of the caller, which :math:`\bar X` may overwrite (one fresh vector less)."""
    gx = None
    if needs[0]:
        c = _rdot_fast(x, X)
        if r2 != 1.0:
            c = c / r2
        gx = -(c * gV + b * X)
    gX = None
    if needs[1]:
        gX = gV.addcmul_(x, b, value=-1) if owned else torch.addcmul(gV, x, b, value=-1)
    return gx, gX


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b`` where a missing tangent (``None``) is zero."""
    if a is None:
        return b
    return a if b is None else a + b


def _tangent_jvp(x: Tensor, X: Tensor, dx: Tensor | None, dX: Tensor | None,
                 r2: float) -> Tensor | None:
    r"""The derivative of ``(x, X) -> P_x(X) = X - x Re<x, X>/r^2`` along ``(dx, dX)``:
    :math:`dX - c\,dx - x\,(\operatorname{Re}\langle dx, X\rangle + \operatorname{Re}
    \langle x, dX\rangle)/r^2`, :math:`c = \operatorname{Re}\langle x, X\rangle/r^2`
    (``None`` when both tangents are)."""
    if dx is None and dX is None:
        return None
    dc = _add(None if dx is None else _rdot_fast(dx, X),
              None if dX is None else _rdot_fast(x, dX))
    if r2 != 1.0:
        dc = dc / r2
    out = -x * dc
    if dX is not None:
        out = out + dX
    if dx is not None:
        c = _rdot_fast(x, X)
        out = out - (c / r2 if r2 != 1.0 else c) * dx
    return out


def _exp_jvp(x: Tensor, V: Tensor, dx: Tensor | None, dV: Tensor | None, cos: Tensor,
             sinc: Tensor, d2: Tensor | float, r2: float) -> Tensor | None:
    r"""The derivative of ``(x, V) -> cos(t) x + sinc(t) V`` (:math:`z = t^2 = \|V\|^2/r^2`)
    along ``(dx, dV)``, given ``d2`` :math:`= 2\operatorname{sinc}'(z)`:
    :math:`\cos(t)\,dx + \operatorname{sinc}(t)\,dV + \frac{\operatorname{Re}\langle V,
    dV\rangle}{r^2}\,(d_2 V - \operatorname{sinc}(t)\,x)` (with
    :math:`\frac{d}{dz}\cos\sqrt z = -\operatorname{sinc}/2`)."""
    out = None
    if dV is not None:
        a = _rdot_fast(V, dV)
        if r2 != 1.0:
            a = a / r2
        out = sinc * dV + a * (d2 * V - sinc * x)
    if dx is not None:
        out = _add(out, cos * dx)
    return out


@backward_without_autocast
@reports_backward
class _SphereExp(torch.autograd.Function):
    r"""``(x, v, r) -> cos(t) x + sinc(t) v`` with :math:`z = t^2 = \|v\|^2/r^2`: one node.

    With radius ``r`` this is the exponential map of the sphere of radius ``r`` (``x`` of
    norm ``r``): :math:`\cos(\|v\|/r)\,x + r\sin(\|v\|/r)\,v/\|v\|`. Backward, with
    :math:`a = \operatorname{Re}\langle x, g\rangle`, :math:`b = \operatorname{Re}\langle v,
    g\rangle` and :math:`\frac{d}{dz}\cos\sqrt z = -\operatorname{sinc}/2`:

    .. math::
        \bar x = \cos(t)\,g, \qquad
        \bar v = \operatorname{sinc}(t)\,g
                 + \frac{2\,b\,\operatorname{sinc}'(z) - a\,\operatorname{sinc}(t)}{r^2}\,v.

    Cost: forward one norm and two scaled passes; backward two dot products and two scaled
    passes, O(n) per vector. ``apply`` returns ``(y, t, cos, sinc)`` (the last three
    non-differentiable, kept for the backward; ``torch.func`` requires ``setup_context``;
    their gradients are not materialized). When the backward is differentiated
    (``create_graph=True``) the coefficients are recomputed differentiably from ``x, v``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, v: Tensor, radius: float):  # type: ignore[override]
        t = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        if radius != 1.0:
            t.div_(radius)
        cos, sinc = _cos_sinc_values(t)
        return _add_product(torch.mul(x, cos), sinc, v), t, cos, sinc

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, v, radius = inputs
        ctx.radius = radius
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, v, *output[1:])
        if forward_ad_active():  # (a microsecond per tensor otherwise)
            ctx.save_for_forward(x, v, *output[1:])

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dv: Tensor | None, _dr):  # type: ignore[override]
        x, v, t, cos, sinc = ctx.saved_tensors
        r2 = ctx.radius * ctx.radius
        # reverse over forward: differentiable in x, v
        cos, sinc, d2 = _exp_coefficients(v, t, cos, sinc, r2, jvp_differentiated(v))
        return _exp_jvp(x, v, dx, dv, cos, sinc, d2, r2), None, None, None

    @staticmethod
    def backward(ctx, g: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if g is None:
            return None, None, None
        x, v, t, cos, sinc = ctx.saved_tensors
        r2 = ctx.radius * ctx.radius
        # differentiable recomputation for higher orders
        recompute = torch.is_grad_enabled()
        gx = gv = None
        if ctx.needs_input_grad[1]:
            cos, sinc, d2 = _exp_coefficients(v, t, cos, sinc, r2, recompute)
            gv = _exp_grad_v(x, v, g, sinc, d2, r2)
        if ctx.needs_input_grad[0]:
            if recompute and gv is None:
                cos = _cos_sinc(_sqnorm(v) / r2)[0]
            gx = cos * g
        return gx, gv, None


@backward_without_autocast
@reports_backward
class _SphereProjective(torch.autograd.Function):
    r"""``(x, v, r) -> r (x + v)/\|x + v\|``: one node.

    Backward, with :math:`w = x + v`, :math:`y` the result:
    :math:`\bar x = \bar v = \frac{r}{\|w\|}\left(g - y\,\frac{\operatorname{Re}\langle y,
    g\rangle}{r^2}\right)` (the projection of ``g`` orthogonal to ``y``, scaled).
    Cost: forward one sum, one norm, one scaling; backward one dot product and two passes.
    ``apply`` returns ``(y, r/|w|)``, the second non-differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, v: Tensor, radius: float):  # type: ignore[override]
        return _normalize_(x + v, radius)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, v, radius = inputs
        ctx.radius = radius
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, v, *output)
        if forward_ad_active():  # (a microsecond per tensor otherwise)
            ctx.save_for_forward(x, v, *output)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dv: Tensor | None, _dr):  # type: ignore[override]
        x, v, y, scale = ctx.saved_tensors
        dw = _add(dx, dv)
        if dw is None:
            return None, None
        if jvp_differentiated(v):  # reverse over forward: differentiable in x, v
            y, scale = _normalized(x + v, ctx.radius)
        return _normalize_backward(y, scale, dw, ctx.radius * ctx.radius), None

    @staticmethod
    def backward(ctx, g: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if g is None:
            return None, None, None
        x, v, y, scale = ctx.saved_tensors
        if torch.is_grad_enabled():  # differentiable recomputation for higher orders
            y, scale = _normalized(x + v, ctx.radius)
        gw = _normalize_backward(y, scale, g, ctx.radius * ctx.radius)
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (gw if need_x else None,
                (gw.clone() if need_x else gw) if need_v else None, None)


@backward_without_autocast
@reports_backward
class _SphereTangent(torch.autograd.Function):
    r"""``(x, v, r) -> v - x Re<x, v>/r^2``, the tangent projection at ``x``: one node.

    Backward: :math:`\bar v = g - x\,\operatorname{Re}\langle x, g\rangle/r^2` (the
    projection is self-adjoint) and :math:`\bar x = -(\operatorname{Re}\langle x, v\rangle\,g
    + \operatorname{Re}\langle x, g\rangle\,v)/r^2`. Cost: one dot product and one pass each
    way (two for :math:`\bar x`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, v: Tensor, radius: float) -> Tensor:  # type: ignore[override]
        c = _rdot_fast(x, v)
        if radius != 1.0:
            c.div_(radius * radius)
        return torch.addcmul(v, x, c, value=-1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, v, radius = inputs
        ctx.radius = radius
        ctx.save_for_backward(x, v)
        if forward_ad_active():  # (a microsecond per tensor otherwise)
            ctx.save_for_forward(x, v)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dv: Tensor | None, _dr):  # type: ignore[override]
        x, v = ctx.saved_tensors
        return _tangent_jvp(x, v, dx, dv, ctx.radius * ctx.radius)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, v = ctx.saved_tensors
        r2 = ctx.radius * ctx.radius
        cg = _rdot_fast(x, g)
        if r2 != 1.0:
            cg = cg / r2
        gx, gv = _tangent_backward(x, v, g, cg, r2, ctx.needs_input_grad)
        return gx, gv, None


@backward_without_autocast
@reports_backward
class _TrivializeProjective(torch.autograd.Function):
    r"""``(x, X, r) -> r w/|w|`` with ``w = x + P_x(X)``, :math:`P_x(X) = X - x\,c`,
    :math:`c = \operatorname{Re}\langle x, X\rangle/r^2`: tangent projection and projective
    retraction in one node.

    Backward, with ``y`` the result, :math:`s = r/\|w\|` and
    :math:`\bar w = s\,(g - y\,\operatorname{Re}\langle y, g\rangle/r^2)`:
    :math:`\bar X = P_x(\bar w)` and
    :math:`\bar x = \bar w - c\,\bar w - X\,\operatorname{Re}\langle x, \bar w\rangle/r^2`.
    Cost: forward two reductions and three passes, backward two dot products and three
    passes (four for :math:`\bar x`), O(n) per vector. When the backward is differentiated
    (``create_graph=True``) the intermediates are recomputed differentiably from ``x, X``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, X: Tensor, radius: float):  # type: ignore[override]
        c = _rdot_fast(x, X)
        if radius != 1.0:
            c.div_(radius * radius)
        if X.numel() >= _ONE_PASS_NUMEL:  # w = X - x (c - 1): one pass over the vectors
            w = torch.addcmul(X, x, c.sub_(1), value=-1)
        else:  # x + X - x c: no scalar-tensor op on c
            w = torch.addcmul(X + x, x, c, value=-1)
        return _normalize_(w, radius)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, X, radius = inputs
        ctx.radius = radius
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, X, *output)
        if forward_ad_active():  # (a microsecond per tensor otherwise)
            ctx.save_for_forward(x, X, *output)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dX: Tensor | None, _dr):  # type: ignore[override]
        x, X, y, scale = ctx.saved_tensors
        r2 = ctx.radius * ctx.radius
        dw = _add(dx, _tangent_jvp(x, X, dx, dX, r2))
        if dw is None:
            return None, None
        if jvp_differentiated(X):  # reverse over forward: differentiable in x, X
            y, scale = _normalized(x + _tangent_reference(x, X, ctx.radius), ctx.radius)
        return _normalize_backward(y, scale, dw, r2), None

    @staticmethod
    def backward(ctx, g: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if g is None:
            return None, None, None
        x, X, y, scale = ctx.saved_tensors
        if torch.is_grad_enabled():  # differentiable recomputation for higher orders
            y, scale = _normalized(x + _tangent_reference(x, X, ctx.radius), ctx.radius)
        return (*_trivialize_projective_grads(x, X, y, scale, g, ctx.radius,
                                              ctx.needs_input_grad), None)


def _trivialize_projective_grads(x: Tensor, X: Tensor, y: Tensor, scale: Tensor | float,
                                 g: Tensor, radius: float, needs: tuple[bool, ...]
                                 ) -> tuple[Tensor | None, Tensor | None]:
    r"""The gradients in ``x`` and ``X`` of :class:`_TrivializeProjective`, given its result
    ``y`` and :math:`s = r/\|w\|`: :math:`\bar w = s\,(g - y\,\operatorname{Re}\langle y,
    g\rangle/r^2)`, :math:`\bar X = P_x(\bar w)`, :math:`\bar x = \bar w - c\,\bar w -
    X\,\operatorname{Re}\langle x, \bar w\rangle/r^2`. Differentiable when ``y`` and
    ``scale`` are (recomputed from ``x, X``) and grad mode is on."""
    r2 = radius * radius
    gw = _normalize_backward(y, scale, g, r2)
    b = _rdot_fast(x, gw)
    if r2 != 1.0:
        b = b / r2
    gx, gX = _tangent_backward(x, X, gw, b, r2, needs,
                               owned=not (needs[0] or torch.is_grad_enabled()))
    if gx is not None:
        gx = gx + gw
    return gx, gX


@backward_without_autocast
@reports_backward
class _TrivializeExp(torch.autograd.Function):
    r"""``(x, X, r) -> cos(t) x + sinc(t) V`` with ``V = P_x(X) = X - c x``, :math:`c =
    \operatorname{Re}\langle x, X\rangle/r^2`, :math:`t^2 = z = \|V\|^2/r^2`: tangent
    projection and exponential map in one node, for a point ``x`` of the sphere (as a
    trivialization's base is), :math:`\|x\| = r`.

    Backward, with :math:`a = \operatorname{Re}\langle x, g\rangle`, :math:`b =
    \operatorname{Re}\langle V, g\rangle = \operatorname{Re}\langle X, g\rangle - c\,a`:
    the exponential map's :math:`\bar V = \operatorname{sinc}\,g + k_V V`, :math:`k_V =
    (2 b \operatorname{sinc}'(z) - a \operatorname{sinc})/r^2`, then the projection's
    :math:`\bar X = P_x(\bar V) = \bar V - e\,x` and :math:`\bar x = \cos(t)\,g - c\,\bar V
    - e\,X` with :math:`e = \operatorname{Re}\langle x, \bar V\rangle/r^2 =
    a \operatorname{sinc}/r^2` (``V`` is orthogonal to ``x`` when :math:`\|x\| = r`). Written in
    ``X`` and ``x`` (``V`` is not kept), with :math:`k = c\,k_V + e`:

    .. math::
        \bar X = \operatorname{sinc}\,g + k_V X - k\,x, \qquad
        \bar x = (\cos t - c \operatorname{sinc})\,g - k\,X + c^2 k_V\,x.

    Smooth at ``V = 0``. For a parameter with a large normal component (:math:`|c| \gg 1`)
    the terms in ``X`` and ``x`` cancel to :math:`k_V V - e\,x`, and the rounding grows with
    :math:`|c|`, as it does where ``V`` is formed (measured, float32, 64 x 1024 with a tangent
    part of 1e-2 per entry: relative gradient error 2e-7 at :math:`c = 10` and 6e-7 at 100,
    against 1e-7 and 3e-7 for the formulas in ``V``). Cost: forward two reductions and three
    passes (the result written over ``V``), backward two dot products and three passes
    (three more for :math:`\bar x`), O(n) per vector. ``apply`` returns ``(y, c, t, cos,
    sinc)``, the last four non-differentiable. When the backward is differentiated
    (``create_graph=True``) ``V`` and the coefficients are recomputed differentiably from
    ``x, X`` (the general formulas).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, X: Tensor, radius: float):  # type: ignore[override]
        r2 = radius * radius
        c = _rdot_fast(x, X)
        if r2 != 1.0:
            c.div_(r2)
        V = torch.addcmul(X, x, c, value=-1)
        t = torch.linalg.vector_norm(V, dim=-1, keepdim=True)
        if r2 != 1.0:
            t.div_(radius)
        cos, sinc = _cos_sinc_values(t)
        return _add_product(V.mul_(sinc), x, cos), c, t, cos, sinc

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, X, radius = inputs
        ctx.radius = radius
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, X, *output[1:])
        if forward_ad_active():  # (a microsecond per tensor otherwise)
            ctx.save_for_forward(x, X, *output[1:])

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dX: Tensor | None, _dr):  # type: ignore[override]
        x, X, c, t, cos, sinc = ctx.saved_tensors
        r2 = ctx.radius * ctx.radius
        recompute = jvp_differentiated(X)  # reverse over forward: differentiable in x, X
        if recompute:
            V = _tangent_reference(x, X, ctx.radius)
        else:
            V = torch.addcmul(X, x, c, value=-1)
        cos, sinc, d2 = _exp_coefficients(V, t, cos, sinc, r2, recompute)
        dV = _tangent_jvp(x, X, dx, dX, r2)
        return _exp_jvp(x, V, dx, dV, cos, sinc, d2, r2), None, None, None, None

    @staticmethod
    def backward(ctx, g: Tensor | None, *unused: Tensor):  # type: ignore[override]
        if g is None:
            return None, None, None
        x, X, c, t, cos, sinc = ctx.saved_tensors
        # differentiable recomputation for higher orders; out of place under torch.func
        # (``g`` may be a ZeroTensor there, whose products cannot be written in place)
        if torch.is_grad_enabled() or transforms_active():
            return (*_trivialize_exp_backward_recorded(ctx, x, X, g), None)
        return (*_trivialize_exp_grads(x, X, c, t, cos, sinc, g, ctx.radius,
                                       ctx.needs_input_grad), None)


def _trivialize_exp_grads(x: Tensor, X: Tensor, c: Tensor, t: Tensor, cos: Tensor,
                          sinc: Tensor, g: Tensor, radius: float, needs: tuple[bool, ...]
                          ) -> tuple[Tensor | None, Tensor | None]:
    r"""The gradients in ``x`` and ``X`` of :class:`_TrivializeExp` from its saved
    coefficients (see there): :math:`\bar X = \operatorname{sinc}\,g + k_V X - k\,x`,
    :math:`\bar x = (\cos t - c \operatorname{sinc})\,g - k\,X + c^2 k_V\,x`; not recorded."""
    r2 = radius * radius
    a = _rdot_fast(x, g)
    e = sinc * a
    kV = _two_dsinc(t, cos, sinc) * torch.addcmul(_rdot_fast(X, g), c, a, value=-1) - e
    if r2 != 1.0:
        kV.div_(r2)
        e.div_(r2)
    k = e.addcmul_(c, kV)
    gx = gX = None
    if needs[1]:
        gX = torch.mul(g, sinc).addcmul_(X, kV).addcmul_(x, k, value=-1)
    if needs[0]:
        gx = torch.mul(g, torch.addcmul(cos, c, sinc, value=-1)).addcmul_(X, k, value=-1)
        gx.addcmul_(x, c * c * kV)
    return gx, gX


def _trivialize_exp_backward_recorded(ctx, x: Tensor, X: Tensor, g: Tensor
                                      ) -> tuple[Tensor | None, Tensor | None]:
    r"""The gradients of :class:`_TrivializeExp` by the general formulas on ``V``, which
    is recomputed with its coefficients by differentiable operations from ``x, X`` (for a
    differentiated backward, and under ``torch.func``), all out of place."""
    r2 = ctx.radius * ctx.radius
    V = _tangent_reference(x, X, ctx.radius)
    cos, sinc, d2 = _recorded_coefficients(V, r2)
    gV = _exp_grad_v(x, V, g, sinc, d2, r2)
    b = _rdot_fast(x, gV)
    if r2 != 1.0:
        b = b / r2
    gx, gX = _tangent_backward(x, X, gV, b, r2, ctx.needs_input_grad)
    if gx is not None:
        gx = gx + cos * g
    return gx, gX


def _values_only(x: Tensor, v: Tensor) -> bool:
    """Whether a map of ``x`` and ``v`` records no derivative (called where grad mode is
    off): plain tensors in eager code without forward-mode AD."""
    return (type(x) in _PLAIN and type(v) in _PLAIN and eager_context()
            and not forward_ad_active())


def _apply(fn: type[torch.autograd.Function], x: Tensor, v: Tensor, radius: float) -> Tensor:
    """``fn.apply(x, v, radius)[0]``, or for one real CPU vector its one-vector node
    (:func:`_vector_case`). In eager code, as :func:`apply_function`, through the C++
    ``apply`` on the arguments as given (``Function.apply`` binds them to ``forward``'s
    signature, which costs more than a small sphere map), written out for these three
    arguments: the generic argument list cost 1 us of a 4096-vector map's 17."""
    if not torch.is_grad_enabled() and _values_only(x, v):
        out = fn.forward(x, v, radius)  # no node: the map's values
        return out[0] if isinstance(out, tuple) else out
    vector_apply = _VECTOR_APPLY.get(fn)
    if vector_apply is not None and _vector_case(x, v):  # plain eager tensors: no unwrapping
        return vector_apply(x, v, radius)
    if transforms_active() or torch.compiler.is_compiling():
        out = fn.apply(x, v, radius)
    else:
        out = raw_apply(fn)(unwrap_if_dead(x), unwrap_if_dead(v), radius)
    return out[0] if isinstance(out, tuple) else out


#: each node's map composed of differentiable torch operations (the power series of
#: :func:`_cos_sinc` keep it smooth at ``V = 0``): under nested forward mode
#: (``jacfwd(jacfwd(f))``) torch 2.13 does not differentiate a custom ``jvp``
_REFERENCE = {
    _SphereExp: _exp_reference,
    _SphereProjective: _projective_reference,
    _SphereTangent: _tangent_reference,
    _TrivializeExp: lambda x, X, r: _exp_reference(x, _tangent_reference(x, X, r), r),
    _TrivializeProjective: lambda x, X, r: _projective_reference(
        x, _tangent_reference(x, X, r), r),
}


# ---------------------------------------------------------------- one vector: lean nodes
# For one real vector on the CPU (where the cost of a map is dispatch, not arithmetic) the
# exponential and projective maps have nodes of their own, used in eager code: a ``forward``
# that takes ``ctx`` (one Python call; a node with ``setup_context``, which ``torch.func``
# requires, makes two), one output and fewer saved tensors. The exponential map's
# coefficients (a norm, cos, sinc and sinc') are numbers there: read on the host, they
# replace the tensor ops on 0-d coefficients. Forward and backward of a vector of 4096, loss
# included: exp 120 -> 103 microseconds, tangent projection and exp 135 -> 116; the projective
# maps keep their coefficients in 0-d tensors (a number as an argument costs a torch op as
# much as a 0-d tensor does; host reads measured slower, 103 against 93) and take ``dot``
# for ``vecdot`` (one dispatch instead of three): the projective trivialization 102 -> 88.
#: Whether one real CPU vector takes the one-vector nodes (a switch for the tests, which run
#: the same cases through both).
VECTOR_NODES = True
_HOST_DTYPES = (torch.float32, torch.float64)
_PLAIN = (Tensor, torch.nn.Parameter)


def _vector_case(x: Tensor, v: Tensor) -> bool:
    """Whether ``(x, v)`` takes a one-vector node: two plain real single-precision or
    double vectors of one shape on the CPU (a host read costs no device synchronisation), in
    eager code (no ``torch.func`` transform, forward-mode derivative, tracing or compiling:
    the reads would be frozen or refused there). The cheap tests first (``is_cpu`` rather
    than ``device.type``, which builds a device object): it runs at every call of a map."""
    return (VECTOR_NODES and type(x) in _PLAIN and type(v) in _PLAIN and x.ndim == 1
            and x.shape == v.shape and x.is_cpu and v.is_cpu and x.dtype in _HOST_DTYPES
            and v.dtype == x.dtype and eager_context() and not forward_ad_active())


#: Whether eager code takes the eager nodes (a switch for the tests, which run the same cases
#: through the fused nodes).
EAGER_NODES = True
_HALF = (torch.float16, torch.bfloat16)


def _eager_case(x: Tensor, v: Tensor) -> bool:
    """Whether ``(x, v)`` takes an eager node: tensors of one dtype (not half precision,
    which the fused path computes in float32), no ``torch.func`` transform (which requires
    ``setup_context``) and no forward-mode derivative (:func:`forward_ad_active` tests both).
    Shapes that broadcast are summed back by autograd; ``torch.jit.trace`` and
    ``torch.compile`` record the node as they do the fused one."""
    return (EAGER_NODES and v.dtype == x.dtype and x.dtype not in _HALF
            and not forward_ad_active())


def _cos_sinc_of(t: float) -> tuple[float, float]:
    r""":math:`\cos t` and :math:`\sin t/t` for one angle, in double precision on the host
    (the power series of ``sinc`` below :math:`t^2 = 10^{-2}`; NaN for a non-finite angle,
    as the tensor functions give)."""
    if not math.isfinite(t):
        return math.nan, math.nan
    z = t * t
    return math.cos(t), (_horner(_SINC, z) if z < _SERIES else math.sin(t) / t)


def _dot(a: Tensor, b: Tensor) -> float:
    return torch.dot(a, b).item()


#: ``id(x) -> (weakref to x, x._version, x.data_ptr(), |x|^2)`` for the bases of the one-vector
#: exponential trivialization (:func:`_sqnorm_of_base`)
_BASE_SQNORMS: dict[int, tuple] = {}
_BASE_SQNORMS_MAX = 64


def _sqnorm_of_base(x: Tensor) -> float:
    r""":math:`\|x\|^2` of a one-vector base. For a constant base (not requiring grad: a
    parametrization's ``base`` buffer, written only in place by a refresh, which bumps its
    version), remembered while ``x`` is the same tensor with the same version and memory: the
    dot product and its host read cost 3 of the 100 us of a vector of 4096's forward and
    backward, at every forward. A base that requires grad is read every time
    (``gradcheck`` perturbs it through ``.data``, which bumps no version)."""
    if x.requires_grad or x.is_inference():  # (an inference tensor has no version counter)
        return _dot(x, x)
    entry = _BASE_SQNORMS.get(id(x))
    if entry is not None and entry[0]() is x and entry[1] == x._version and (
            entry[2] == x.data_ptr()):
        return entry[3]
    value = _dot(x, x)
    if len(_BASE_SQNORMS) >= _BASE_SQNORMS_MAX:
        _BASE_SQNORMS.clear()
    _BASE_SQNORMS[id(x)] = (weakref.ref(x), x._version, x.data_ptr(), value)
    return value


#: :func:`_scaled_sum` adds ``(s - 1) a`` for a scale ``s`` this close to 1
_NEAR_ONE = 0.5


def _scaled_sum(a: Tensor, s: float, b: Tensor, beta: float) -> Tensor:
    r""":math:`s\,a + \beta\,b` (a fresh tensor) for numbers ``s`` and ``beta``.

    For :math:`|s - 1| \le 1/2` as :math:`(a + \beta b) + (s - 1)\,a`: two ``add`` ops,
    whose coefficient is an argument of the kernel, where ``torch.mul(a, s)`` first wraps the
    number in a tensor (a vector of 4096: 1.9 against 3.1 us for the scaling). The coefficient
    :math:`s - 1` is exact in double (Sterbenz) and its rounding to the tensor's precision
    is at most half a unit of :math:`s`; the result carries a few roundings of :math:`|a| +
    |\beta b|`, as the product does. Further from 1 (where :math:`s - 1` rounded to float32
    would lose the small :math:`s`): ``a * s + beta b``."""
    if abs(s - 1.0) <= _NEAR_ONE:
        return torch.add(a, b, alpha=beta).add_(a, alpha=s - 1.0)
    return torch.mul(a, s).add_(b, alpha=beta)


def _scaled(a: Tensor, s: float) -> Tensor:
    r""":math:`s\,a` (a fresh tensor), as :func:`_scaled_sum`: :math:`a + (s - 1)\,a` for
    :math:`|s - 1| \le 1/2`."""
    if abs(s - 1.0) <= _NEAR_ONE:
        return torch.add(a, a, alpha=s - 1.0)
    return torch.mul(a, s)


def _scale_(a: Tensor, s: float) -> Tensor:
    r"""``a <- s a`` in place, as :func:`_scaled`: :math:`a + (s - 1)\,a` for
    :math:`|s - 1| \le 1/2` (a vector of 4096: 1.4 against 2.7 us); returns ``a``."""
    if abs(s - 1.0) <= _NEAR_ONE:
        return a.add_(a, alpha=s - 1.0)
    return a.mul_(s)


def _keep_angle(ctx, t: float, radius: float) -> tuple[float, float, float]:
    r"""``(t, cos t, sinc t)`` for the angle ``t``, kept in ``ctx.coefficients`` (and the
    radius in ``ctx.radius``)."""
    ctx.radius, ctx.coefficients = radius, (t, *_cos_sinc_of(t))
    return ctx.coefficients


def _angle_of_vector(ctx, V: Tensor, radius: float) -> tuple[float, float, float]:
    r"""``(t, cos t, sinc t)`` with :math:`t = \|V\|/r`, kept in ``ctx.coefficients``."""
    return _keep_angle(ctx, torch.linalg.vector_norm(V).item() / radius, radius)


def _exp_of_vector(ctx, x: Tensor, V: Tensor, radius: float) -> Tensor:
    r""":math:`\cos t\,x + \operatorname{sinc} t\,V` with :math:`t = \|V\|/r`; the angle and
    its coefficients are kept in ``ctx.coefficients`` as ``(t, cos, sinc)``."""
    _, cos, sinc = _angle_of_vector(ctx, V, radius)
    return _scaled_sum(x, cos, V, sinc)


def _exp_of_vector_backward(ctx, x: Tensor, V: Tensor, g: Tensor) -> Tensor:
    r""":math:`\bar V = \operatorname{sinc} t\,g + (2 b \operatorname{sinc}'(t^2) - a
    \operatorname{sinc} t)\,V/r^2` with :math:`a = \langle x, g\rangle`, :math:`b = \langle V,
    g\rangle`: the gradient in ``V`` of :func:`_exp_of_vector`."""
    t, _, sinc = ctx.coefficients
    coef = (_two_dsinc_of(t) * _dot(V, g) - sinc * _dot(x, g)) / ctx.radius**2
    return _scaled_sum(g, sinc, V, coef)


def _differentiated_backward(ctx, g: Tensor, reference) -> tuple:
    """The gradients of ``reference(x, v, r)`` at the saved inputs, recorded (the backward of a
    one-vector node is itself differentiated: ``create_graph=True``)."""
    x, v = ctx.saved_tensors[:2]
    wanted = [t for t, need in zip((x, v), ctx.needs_input_grad[:2]) if need]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(reference(x, v, ctx.radius), wanted, g,
                                         create_graph=True, allow_unused=True))
    return (*(next(grads) if need else None for need in ctx.needs_input_grad[:2]), None)


@backward_without_autocast
@reports_backward
class _VectorExp(torch.autograd.Function):
    r""":class:`_SphereExp` for one real CPU vector, the coefficients on the host:
    :math:`t = \|v\|/r`, :math:`y = \cos t\,x + \operatorname{sinc} t\,v`;
    :math:`\bar x = \cos t\,g`, :math:`\bar v = \operatorname{sinc} t\,g + (2 b
    \operatorname{sinc}'(t^2) - a \operatorname{sinc} t)\,v/r^2` with :math:`a = \langle x,
    g\rangle`, :math:`b = \langle v, g\rangle`. Forward one norm and two passes, backward two
    dot products and two passes."""

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, radius: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, v)
        return _exp_of_vector(ctx, x, v, radius)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            return _differentiated_backward(ctx, g, _exp_reference)
        x, v = ctx.saved_tensors
        gv = _exp_of_vector_backward(ctx, x, v, g) if ctx.needs_input_grad[1] else None
        gx = _scaled(g, ctx.coefficients[1]) if ctx.needs_input_grad[0] else None
        return gx, gv, None


@backward_without_autocast
@reports_backward
class _VectorTrivializeExp(torch.autograd.Function):
    r""":class:`_TrivializeExp` for one real CPU vector, the coefficients on the host:
    :math:`c = \langle x, X\rangle/r^2`, :math:`V = X - c\,x`, :math:`t = \|V\|/r`, then
    :math:`\cos t\,x + \operatorname{sinc} t\,V`.

    With :math:`q = \|X\|^2/r^2` and :math:`p = \|x\|^2/r^2` (1 on the sphere; kept, so that
    the value and its derivative are the composition's for any ``x``), :math:`t^2 = q -
    c^2(2 - p)`. While :math:`c^2(2 - p) \le q/2` (on the sphere: the normal part of ``X`` is
    at most half of it; the common case, as the gradient in ``X`` is tangent and Adam's
    elementwise scaling of it added a normal part below 1% of :math:`\|X\|^2` in 100 steps,
    measured at n = 64 and 4096) ``V`` is not formed: :math:`y = \operatorname{sinc} t\,X +
    (\cos t - c \operatorname{sinc} t)\,x` from three dot products and two passes, and
    :math:`t^2 \ge q/2`, so its relative error stays within twice that of the dot products.
    Otherwise ``V`` is formed and its norm taken (one pass more, and one norm), and the result
    written over it. A vector of 4096 in float32, forward and backward with the loss: 94.6 ->
    86.5 us (this route, then with two dot products, and :func:`_scaled_sum`).

    Backward as there, in ``X`` and ``x``: with :math:`a = \langle x, g\rangle`, :math:`b =
    \langle X, g\rangle - c\,a`, :math:`k_V = (2 b \operatorname{sinc}'(t^2) - a
    \operatorname{sinc} t)/r^2` and :math:`k = (2 - p)\,c\,k_V + a \operatorname{sinc}
    t/r^2` (:math:`\langle x, V\rangle = c\,r^2 (1 - p)`):
    :math:`\bar X = \operatorname{sinc} t\,g + k_V X - k\,x` and :math:`\bar x = (\cos t - c
    \operatorname{sinc} t)\,g - k\,X + c^2 k_V\,x`. Backward two dot products and three
    passes (three more for :math:`\bar x`)."""

    @staticmethod
    def forward(ctx, x: Tensor, X: Tensor, radius: float) -> Tensor:  # type: ignore[override]
        r2 = radius * radius
        ctx.c = c = _dot(x, X) / r2
        ctx.save_for_backward(x, X)
        q = _dot(X, X) / r2
        ctx.two_minus_p = 2.0 - _sqnorm_of_base(x) / r2  # p = |x|^2 / r^2, 1 on the sphere
        normal = c * c * ctx.two_minus_p
        if normal <= 0.5 * q:
            # t^2 = |X - c x|^2 / r^2 = q - c^2 (2 - p), y = sinc X + (cos - c sinc) x
            _, cos, sinc = _keep_angle(ctx, math.sqrt(q - normal), radius)
            return _scaled_sum(X, sinc, x, cos - c * sinc)
        V = torch.add(X, x, alpha=-c)
        _, cos, sinc = _angle_of_vector(ctx, V, radius)
        return V.mul_(sinc).add_(x, alpha=cos)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            return _differentiated_backward(ctx, g, _REFERENCE[_TrivializeExp])
        x, X = ctx.saved_tensors
        t, cos, sinc = ctx.coefficients
        c, r2 = ctx.c, ctx.radius**2
        a = _dot(x, g)
        kV = (_two_dsinc_of(t) * (_dot(X, g) - c * a) - sinc * a) / r2
        k = c * kV * ctx.two_minus_p + sinc * a / r2
        gx = gX = None
        if ctx.needs_input_grad[1]:
            gX = _scaled_sum(g, sinc, X, kV).sub_(x, alpha=k)
        if ctx.needs_input_grad[0]:
            gx = _scaled_sum(g, cos - c * sinc, X, -k).add_(x, alpha=c * c * kV)
        return gx, gX, None


def _projective_forward(ctx, fused: type[torch.autograd.Function], x: Tensor, v: Tensor,
                        radius: float) -> Tensor:
    r"""The forward of a lean node over the projective node ``fused`` (whose forward returns
    the result and the scale :math:`r/\|w\|`): the result, with ``(x, v, y)`` saved and the
    scale and radius kept on ``ctx``."""
    y, ctx.scale = fused.forward(x, v, radius)
    ctx.radius = radius
    ctx.save_for_backward(x, v, y)
    return y


@backward_without_autocast
@reports_backward
class _VectorProjective(torch.autograd.Function):
    r""":class:`_SphereProjective` for one real CPU vector: the same forward and backward in
    a node with one output, whose ``forward`` takes ``ctx`` (one Python call instead of two),
    saving ``(x, v, y)`` and the scale :math:`r/\|x + v\|`."""

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, radius: float) -> Tensor:  # type: ignore[override]
        return _projective_forward(ctx, _SphereProjective, x, v, radius)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            return _differentiated_backward(ctx, g, _projective_reference)
        y = ctx.saved_tensors[2]
        gw = _normalize_backward(y, ctx.scale, g, ctx.radius * ctx.radius)
        need_x, need_v = ctx.needs_input_grad[:2]
        return (gw if need_x else None,
                (gw.clone() if need_x else gw) if need_v else None, None)


@backward_without_autocast
@reports_backward
class _VectorTrivializeProjective(torch.autograd.Function):
    r""":class:`_TrivializeProjective` for one real CPU vector: the same forward and backward
    (:func:`_trivialize_projective_grads`) in a node with one output, whose ``forward`` takes
    ``ctx`` (one Python call instead of two), saving ``(x, X, y)`` and the scale. A vector of
    4096: 102 -> 86 microseconds per forward and backward (the plain ``v/|v|``: 83)."""

    @staticmethod
    def forward(ctx, x: Tensor, X: Tensor, radius: float) -> Tensor:  # type: ignore[override]
        r2 = radius * radius
        c = torch.dot(x, X)  # (``dot`` for one real vector: one dispatch, ``vecdot`` three)
        if r2 != 1.0:
            c.div_(r2)
        w = torch.addcmul(X + x, x, c, value=-1)
        scale = torch.linalg.vector_norm(w).reciprocal_()
        if radius != 1.0:
            scale.mul_(radius)
        ctx.scale, ctx.radius = scale, radius
        y = w.mul_(scale)
        ctx.save_for_backward(x, X, y)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            return _differentiated_backward(ctx, g, _REFERENCE[_TrivializeProjective])
        x, X, y = ctx.saved_tensors
        r2 = ctx.radius * ctx.radius
        a = torch.dot(y, g)
        if r2 != 1.0:
            a = a / r2
        gw = torch.addcmul(g, y, a, value=-1).mul_(ctx.scale)
        b = torch.dot(x, gw)
        if r2 != 1.0:
            b = b / r2
        gx = gX = None
        if ctx.needs_input_grad[0]:
            c = torch.dot(x, X)
            if r2 != 1.0:
                c = c / r2
            gx = torch.addcmul(gw, gw, c, value=-1).addcmul_(X, b, value=-1)
        if ctx.needs_input_grad[1]:
            gX = gw.addcmul_(x, b, value=-1)
        return gx, gX, None


# ---------------------------------------------------------------- eager code: lean nodes
# Outside ``torch.func`` transforms and forward-mode derivatives (:func:`_eager_case`) the
# trivializations of a batch take nodes of their own: the same forward and backward as
# the fused nodes, in a node whose ``forward`` takes ``ctx`` (one Python call; ``torch.func``
# requires ``setup_context``, which makes two), with one output, the inputs saved and the
# coefficients (per-vector numbers) kept on ``ctx``. Measured, the parametrization
# ``sphere(retraction="exp")`` of 64 vectors of 1024, forward and backward with the loss, the
# two nodes alternated in one process: 276 -> 251 us (the plain ``v/|v|``: 244).


@backward_without_autocast
@reports_backward
class _EagerTrivializeExp(torch.autograd.Function):
    r""":class:`_TrivializeExp` in eager code (see above): saves ``(x, X)``, keeps
    ``(c, t, cos, sinc)`` on ``ctx``; backward :func:`_trivialize_exp_grads`."""

    @staticmethod
    def forward(ctx, x: Tensor, X: Tensor, radius: float) -> Tensor:  # type: ignore[override]
        y, *ctx.coefficients = _TrivializeExp.forward(x, X, radius)
        ctx.radius = radius
        ctx.save_for_backward(x, X)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            return (*_trivialize_exp_backward_recorded(ctx, *ctx.saved_tensors, g), None)
        return (*_trivialize_exp_grads(*ctx.saved_tensors, *ctx.coefficients, g, ctx.radius,
                                       ctx.needs_input_grad), None)


@backward_without_autocast
@reports_backward
class _EagerTrivializeProjective(torch.autograd.Function):
    r""":class:`_TrivializeProjective` in eager code (see above): saves ``(x, X, y)``, keeps
    the scale :math:`r/\|w\|` on ``ctx``; backward :func:`_trivialize_projective_grads`."""

    @staticmethod
    def forward(ctx, x: Tensor, X: Tensor, radius: float) -> Tensor:  # type: ignore[override]
        return _projective_forward(ctx, _TrivializeProjective, x, X, radius)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            return _differentiated_backward(ctx, g, _REFERENCE[_TrivializeProjective])
        x, X, y = ctx.saved_tensors
        return (*_trivialize_projective_grads(x, X, y, ctx.scale, g, ctx.radius,
                                              ctx.needs_input_grad), None)


#: the eager node of each fused node that has one
_EAGER = {
    _TrivializeExp: _EagerTrivializeExp,
    _TrivializeProjective: _EagerTrivializeProjective,
}


#: the one-vector node of each fused node that has one
_VECTOR = {
    _SphereExp: _VectorExp,
    _TrivializeExp: _VectorTrivializeExp,
    _SphereProjective: _VectorProjective,
    _TrivializeProjective: _VectorTrivializeProjective,
}
#: their C++ ``apply``
_VECTOR_APPLY = {fn: raw_apply(node) for fn, node in _VECTOR.items()}


def _fused(fn: type[torch.autograd.Function], x: Tensor, v: Tensor, radius: float) -> Tensor:
    """``fn.apply(x, v, radius)``, half precision through float32 (arguments not checked);
    under nested forward mode, the same map by differentiable torch operations."""
    if nested_forward_ad():
        return _REFERENCE[fn](x, v, radius)
    if x.dtype in (torch.float16, torch.bfloat16) or v.dtype != x.dtype:
        dtype = torch.promote_types(compute_dtype(x.dtype), compute_dtype(v.dtype))
        return _apply(fn, x.to(dtype), v.to(dtype), radius).to(x.dtype)
    return _apply(fn, x, v, radius)


def _radius_map(fn: type[torch.autograd.Function], name: str, doc: str
                ) -> Callable[..., Tensor]:
    """The map ``(x, v, radius=1.0) -> _fused(fn, x, v, float(radius))``, unchecked (for
    the manifolds), which in grad mode first tries the one-vector node of ``fn`` and then its
    eager node, when it has them: in a parametrization's forward and backward of a vector of
    4096 the two calls this skips (``_fused`` and the lookups of the node) cost 3 of about
    100 microseconds."""
    vector_apply = _VECTOR_APPLY.get(fn)
    eager = _EAGER.get(fn)
    eager_apply = None if eager is None else raw_apply(eager)

    def radius_map(x: Tensor, v: Tensor, radius: float = 1.0) -> Tensor:
        # no transform around the call (nothing to unwrap) and one dtype (nothing to cast)
        if torch.is_grad_enabled():
            if vector_apply is not None and _vector_case(x, v):
                return vector_apply(x, v, float(radius))
            if eager_apply is not None and _eager_case(x, v):
                return eager_apply(x, v, float(radius))
        return _fused(fn, x, v, float(radius))

    radius_map.__name__ = radius_map.__qualname__ = name
    radius_map.__doc__ = doc
    return radius_map


exp_radius = _radius_map(
    _SphereExp, "exp_radius",
    "Exponential map of the sphere of radius ``radius`` (unchecked, for the manifolds).")
projective_radius = _radius_map(
    _SphereProjective, "projective_radius",
    "Projective retraction of the sphere of radius ``radius`` (unchecked).")
tangent_radius = _radius_map(
    _SphereTangent, "tangent_radius",
    "Tangent projection at ``x`` on the sphere of radius ``radius`` (unchecked).")
trivialize_exp_radius = _radius_map(
    _TrivializeExp, "trivialize_exp_radius",
    "``exp_radius(x, tangent_radius(x, X, radius), radius)`` in one node (unchecked).")
trivialize_projective_radius = _radius_map(
    _TrivializeProjective, "trivialize_projective_radius",
    "``projective_radius(x, tangent_radius(x, X, radius), radius)`` in one node "
    "(unchecked).")


@upcast_half
def sphere_exp(x: Tensor, v: Tensor) -> Tensor:
    r"""Exponential map of the unit sphere: :math:`\cos\|v\|\,x + \frac{\sin\|v\|}{\|v\|}\,v`.

    The geodesic from ``x`` with initial velocity ``v`` (tangent: :math:`\langle x,v\rangle=0`),
    evaluated at time 1; it stays on the sphere and agrees with :math:`x + v` to first order.
    :math:`\cos t` and :math:`\sin t / t` are computed from :math:`t^2 = \|v\|^2` (power
    series for :math:`t^2 < 10^{-2}`), so the map is smooth at :math:`v = 0`, where its
    Jacobian in ``v`` is the identity, like that of :math:`x + v`, with no NaN. Beyond
    :math:`\|v\|` of about :math:`1.8 \cdot 10^{19}` in float32 (:math:`1.3 \cdot 10^{154}`
    in float64) :math:`t^2` overflows and the result is NaN.

    Args:
        x: ``(..., n)`` unit vectors.
        v: ``(..., n)`` tangent vectors at ``x``.

    Returns:
        ``(..., n)`` unit vectors, of the dtype of the inputs (promoted when they differ).

    Cost: :math:`O(n)` per vector (one norm, two scalings).
    """
    _check_vectors(x, v, "x", "v")
    return _apply(_SphereExp, *_promoted(x, v), 1.0)


@upcast_half
def sphere_log(x: Tensor, y: Tensor) -> Tensor:
    r"""Logarithm of the unit sphere, the inverse of :func:`sphere_exp`.

    With :math:`c = \operatorname{Re}\langle x, y\rangle`, :math:`u = y - c\,x` and
    :math:`s = \|u\|`, the angle is :math:`\theta = \operatorname{atan2}(s, c)` and
    :math:`\log_x y = \frac{\theta}{s}\,u`, the tangent at ``x`` of length :math:`\theta`
    pointing to ``y``. Near :math:`y = x` the factor :math:`\theta/s = \arctan(z)/(z\,c)`,
    :math:`z = s/c`, is a power series in :math:`z^2`, so the map is smooth there
    (:math:`\log_x x = 0` with a finite gradient).

    Raises:
        ValueError: for ``y`` antipodal to ``x`` (within :math:`\sqrt{\varepsilon}`), where
            the direction of the geodesic is undefined. Meta tensors, which have no
            values, are not checked, nor are calls under ``torch.func.vmap`` (also inside
            ``jacfwd`` and ``hessian``; a batched value cannot be read on the host): a
            nearly antipodal ``y`` then gives a result of length :math:`\pi` in an
            arbitrary (rounding-determined) direction, the exact antipode NaN. Under
            ``grad``, ``jacrev`` and ``jvp`` the check raises as in eager code.

    Args:
        x: ``(..., n)`` unit vectors.
        y: ``(..., n)`` unit vectors.

    Returns:
        ``(..., n)`` tangent vectors at ``x``, of the dtype of the inputs (promoted when
        they differ).

    Cost: :math:`O(n)` per vector.
    """
    _check_vectors(x, y, "x", "y")
    x, y = _promoted(x, y)
    c = _rdot(x, y)
    u = y - c * x
    s2 = _sqnorm(u)
    if y.numel() and values_checkable(y):
        with torch.no_grad():
            tol = math.sqrt(eps(x.dtype))
            antipodal = (c < 0) & (s2 <= tol**2)
            if bool(antipodal.any()):
                raise ValueError(
                    "y: expected a point that is not antipodal to x (|y + x| > "
                    f"{tol:.1e}), got |y + x| = {float((y + x).abs().amax()):.3e}: the "
                    "logarithm of the sphere is undefined at the antipode"
                )
    c_safe = torch.where(c > 0, c, torch.ones_like(c))
    z2 = s2 / c_safe**2
    small = (c > 0) & (z2 < _SERIES)
    series = _horner(_ATANC, torch.where(small, z2, torch.zeros_like(z2))) / c_safe
    s = torch.sqrt(torch.where(small, torch.ones_like(s2), s2))
    direct = torch.atan2(s, c) / s
    return torch.where(small, series, direct) * u


@upcast_half
def sphere_projective(x: Tensor, v: Tensor) -> Tensor:
    r"""Projective retraction of the unit sphere: :math:`\frac{x + v}{\|x + v\|}`.

    The nearest unit vector to :math:`x + v`; for tangent ``v`` it agrees with
    :func:`sphere_exp` to second order and is defined for every ``v``
    (:math:`\|x + v\|^2 = 1 + \|v\|^2`). The norm is taken without rescaling (as in
    ``torch.nn.functional.normalize``): beyond :math:`\|x + v\|` of about :math:`1.8
    \cdot 10^{19}` in float32 (:math:`1.3 \cdot 10^{154}` in float64) its square overflows and
    the result is zero; :meth:`dtriv.manifolds.Sphere.project` rescales.

    Args:
        x: ``(..., n)`` unit vectors.
        v: ``(..., n)`` tangent vectors at ``x``.

    Returns:
        ``(..., n)`` unit vectors, of the dtype of the inputs (promoted when they differ).

    Cost: :math:`O(n)` per vector.
    """
    _check_vectors(x, v, "x", "v")
    return _apply(_SphereProjective, *_promoted(x, v), 1.0)


@upcast_half
def sphere_projective_inverse(x: Tensor, y: Tensor) -> Tensor:
    r"""Inverse of :func:`sphere_projective`: :math:`y / \operatorname{Re}\langle x, y\rangle - x`.

    The tangent ``v`` at ``x`` with :math:`(x + v)/\|x + v\| = y`; it exists for ``y`` in the
    open hemisphere :math:`\operatorname{Re}\langle x, y\rangle > 0` and grows without bound
    towards its boundary.

    Raises:
        ValueError: when :math:`\operatorname{Re}\langle x, y\rangle \le \sqrt{\varepsilon}`.
            Meta tensors, which have no values, are not checked, nor are calls under
            ``torch.func.vmap`` (also inside ``jacfwd`` and ``hessian``; a batched value
            cannot be read on the host): ``y`` outside the open hemisphere then gives a
            non-finite or meaningless result. Under ``grad``, ``jacrev`` and ``jvp`` the
            check raises as in eager code.

    Args:
        x: ``(..., n)`` unit vectors.
        y: ``(..., n)`` unit vectors.

    Returns:
        ``(..., n)`` tangent vectors at ``x``, of the dtype of the inputs (promoted when
        they differ).

    Cost: :math:`O(n)` per vector.
    """
    _check_vectors(x, y, "x", "y")
    x, y = _promoted(x, y)
    c = _rdot(x, y)
    if y.numel() and values_checkable(y):
        with torch.no_grad():
            tol = math.sqrt(eps(x.dtype))
            if bool((c <= tol).any()):
                raise ValueError(
                    "y: expected a point in the open hemisphere of x (<x, y> > "
                    f"{tol:.1e}), got <x, y> = {float(c.min()):.3e}: the projective "
                    "retraction does not reach it"
                )
    return y / c - x


register("sphere", "exp", sphere_exp, sphere_log)
register("sphere", "projective", sphere_projective, sphere_projective_inverse)
