"""Forward + backward time of the sphere and spectral maps against the formulas they replace.

Sphere (unit vectors along the last dimension, or the whole tensor for the weight norm of a
vector): for one vector of 4096, the rows of a (512, 512) matrix and a batch (64, 1024),

* ``dtriv.parametrize.sphere`` (``exp`` and ``projective``, dynamic and static
  trivializations, the parameter drawn ``N(0, 0.1^2)`` away from the base; and ``exp`` near
  the base, ``N(0, 10^{-6})``, the regime after a refresh, where the map's coefficients come
  from power series), geotorch's ``sphere`` when installed, and the plain normalisation
  ``v / v.norm(dim=-1, keepdim=True)`` registered as a torch parametrization;
* the retractions ``sphere_exp`` / ``sphere_projective`` (gradient in the tangent ``v``)
  against the formula ``(x + v) / (x + v).norm(dim=-1, keepdim=True)``;
* dtriv's ``weight_norm`` twin against ``torch.nn.utils.parametrizations.weight_norm`` and
  the formula ``g * v / v.norm(...)`` as a parametrization.

Spectral (weights (512, 512), (1024, 256) and a conv kernel (64, 64, 3, 3) read as
64 x 576), in training mode (one power-iteration step per forward) and in eval mode: dtriv's
``spectral_norm`` twin against torch's and against a hand-written power iteration
(``u = normalize(W v); v = normalize(W^H u)`` on persistent buffers under ``no_grad``,
``sigma = u . W v``, ``W / sigma``).

Each case is ``W = module.weight; (W * C).sum().backward()``; times are per call
(median ± interquartile spread over interleaved rounds); ratios are ``peer / dtriv``
(above 1: dtriv is faster). Example::

    python benchmarks/bench_sphere_spectral.py --threads 2
    python benchmarks/bench_sphere_spectral.py --quick
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as tp
from torch.nn.utils import parametrize

import dtriv
from dtriv.parametrize import twins
from dtriv.retractions import sphere_exp, sphere_projective

from harness import (
    emit,
    emit_summary,
    md_table,
    measure,
    paired_ratio,
    parser,
    ratio,
    setup,
)

try:
    import geotorch
except ImportError:  # optional peer
    geotorch = None

SPHERE_SHAPES = [(4096,), (512, 512), (64, 1024)]
SPECTRAL_SHAPES = [(512, 512), (1024, 256), (64, 64, 3, 3)]


class Holder(nn.Module):
    def __init__(self, shape, dtype=torch.float32, device="cpu", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(shape, generator=g, dtype=dtype).to(device))


class Normalize(nn.Module):
    """The plain formula: ``v / v.norm(dim=-1, keepdim=True)``."""

    def forward(self, v):
        return v / v.norm(dim=-1, keepdim=True)


class PlainWeightNorm(nn.Module):
    """The plain formula ``g * v / ||v||`` (norm over all dims but ``dim``, or all)."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, g, v):
        return g * (v / v.norm(dim=self.dims, keepdim=True))

    def right_inverse(self, w):
        return w.norm(dim=self.dims, keepdim=True), w


class PlainPowerIteration(nn.Module):
    """One hand-written power-iteration step per training forward, then ``W / sigma``."""

    def __init__(self, weight, eps=1e-12):
        super().__init__()
        self.eps = eps
        mat = weight.detach().flatten(1)
        g = torch.Generator().manual_seed(1)
        u = F.normalize(torch.randn(mat.shape[0], generator=g, dtype=mat.dtype), dim=0)
        v = F.normalize(torch.randn(mat.shape[1], generator=g, dtype=mat.dtype), dim=0)
        self.register_buffer("_u", u.to(mat.device))
        self.register_buffer("_v", v.to(mat.device))

    def forward(self, weight):
        mat = weight.flatten(1)
        if self.training:
            with torch.no_grad():
                self._u.copy_(F.normalize(mat @ self._v, dim=0, eps=self.eps))
                self._v.copy_(F.normalize(mat.mH @ self._u, dim=0, eps=self.eps))
        sigma = torch.vdot(self._u.clone(), mat @ self._v.clone())
        return weight / sigma


def _fwd_bwd(module: nn.Module, C: torch.Tensor, inner: int) -> Callable[[], None]:
    params = list(module.parameters())

    def run():
        for _ in range(inner):
            for p in params:
                p.grad = None
            (module.weight * C).sum().backward()

    return run


def _time(args, device, cases, inner):
    kw = {k: v for k, v in (("repeats", args.repeats), ("warmup", args.warmup),
                            ("budget_s", args.budget)) if v is not None}
    kw.setdefault("repeats", 5 if args.quick else 31)
    kw.setdefault("budget_s", 0.4 if args.quick else 2.5)
    res = measure(cases, device=device, **kw)
    return {k: t.per_call(inner) for k, t in res.items()}


def _inner(numel: int) -> int:
    return max(1, 200_000 // numel)


def _worst(ratios):
    """The smallest ``(ratio, label)`` of a list, or ``None`` when empty."""
    return min(ratios) if ratios else None


def sphere_rows(args, device, shapes, ratios=None):
    rows = []
    ratios = [] if ratios is None else ratios
    for shape in shapes:
        C = torch.randn(shape, device=device)
        inner = _inner(C.numel())
        mods = {}
        m = Holder(shape, device=device)
        parametrize.register_parametrization(m, "weight", Normalize())
        mods["plain"] = m
        for retraction in ("exp", "projective"):
            for dynamic in (True, False):
                m = Holder(shape, device=device)
                dtriv.parametrize.sphere(m, retraction=retraction, dynamic=dynamic)
                with torch.no_grad():  # a point away from the base
                    m.parametrizations.weight.original.normal_(0, 0.1)
                mods[f"{retraction} {'dynamic' if dynamic else 'static'}"] = m
        # near the base, as after a refresh: the exponential's coefficients by power series
        m = Holder(shape, device=device)
        dtriv.parametrize.sphere(m, retraction="exp")
        with torch.no_grad():
            m.parametrizations.weight.original.normal_(0, 1e-3)
        mods["exp dynamic, near base"] = m
        if geotorch is not None:
            m = Holder(shape, device=device)
            geotorch.sphere(m, "weight")
            mods["geotorch"] = m
        res = _time(args, device, {k: _fwd_bwd(m, C, inner) for k, m in mods.items()}, inner)
        label = "x".join(map(str, shape))
        for name in mods:
            if name in ("plain", "geotorch"):
                continue
            ratios.append((paired_ratio(res["plain"], res[name]), f"{name}, {label}"))
            rows.append([label, f"sphere({name})", str(res[name]), str(res["plain"]),
                         ratio(res["plain"], res[name]),
                         ratio(res.get("geotorch"), res[name])])
    return rows


def retraction_rows(args, device, shapes, ratios=None):
    rows = []
    ratios = [] if ratios is None else ratios
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        x = F.normalize(torch.randn(shape, generator=g), dim=-1).to(device)
        v0 = 0.1 * torch.randn(shape, generator=g).to(device)
        v0 = v0 - x * (x * v0).sum(-1, keepdim=True)
        v = v0.clone().requires_grad_(True)
        C = torch.randn(shape, device=device)
        inner = _inner(x.numel())

        def case(fn, x=x, v=v, C=C, inner=inner):
            def run():
                for _ in range(inner):
                    v.grad = None
                    (fn(x, v) * C).sum().backward()
            return run

        def plain(x, v):
            w = x + v
            return w / w.norm(dim=-1, keepdim=True)

        res = _time(args, device, {"plain": case(plain), "exp": case(sphere_exp),
                                   "projective": case(sphere_projective)}, inner)
        label = "x".join(map(str, shape))
        for name in ("exp", "projective"):
            ratios.append((paired_ratio(res["plain"], res[name]), f"sphere_{name}, {label}"))
            rows.append([label, f"sphere_{name}", str(res[name]), str(res["plain"]),
                         ratio(res["plain"], res[name])])
    return rows


def weight_norm_rows(args, device, shapes, ratios=None):
    rows = []
    ratios = [] if ratios is None else ratios
    for shape in shapes:
        dim = None if len(shape) == 1 else 0
        dims = tuple(range(len(shape))) if dim is None else tuple(range(1, len(shape)))
        C = torch.randn(shape, device=device)
        inner = _inner(C.numel())
        mods = {}
        m = Holder(shape, device=device)
        parametrize.register_parametrization(m, "weight", PlainWeightNorm(dims))
        mods["plain"] = m
        for name, fn in (("dtriv", twins.weight_norm), ("torch", tp.weight_norm)):
            m = Holder(shape, device=device)
            fn(m, dim=dim)
            mods[name] = m
        res = _time(args, device, {k: _fwd_bwd(m, C, inner) for k, m in mods.items()}, inner)
        label = "x".join(map(str, shape))
        ratios.append((paired_ratio(res["torch"], res["dtriv"]), f"dim={dim}, {label}"))
        rows.append([label, f"dim={dim}", str(res["dtriv"]), str(res["torch"]),
                     str(res["plain"]), ratio(res["torch"], res["dtriv"]),
                     ratio(res["plain"], res["dtriv"])])
    return rows


def spectral_rows(args, device, shapes, ratios=None):
    rows = []
    ratios = [] if ratios is None else ratios
    for shape in shapes:
        C = torch.randn(shape, device=device)
        mods = {}
        for name, fn in (("dtriv", twins.spectral_norm), ("torch", tp.spectral_norm)):
            torch.manual_seed(0)
            m = Holder(shape, device=device)
            fn(m)
            mods[name] = m
        m = Holder(shape, device=device)
        parametrize.register_parametrization(m, "weight", PlainPowerIteration(m.weight))
        mods["plain"] = m
        label = "x".join(map(str, shape))
        for mode in ("train", "eval"):
            for mm in mods.values():
                mm.train(mode == "train")
            inner = _inner(C.numel())
            res = _time(args, device, {k: _fwd_bwd(m, C, inner) for k, m in mods.items()},
                        inner)
            ratios.append((paired_ratio(res["plain"], res["dtriv"]), f"{mode}, {label}"))
            rows.append([label, mode, str(res["dtriv"]), str(res["torch"]), str(res["plain"]),
                         ratio(res["torch"], res["dtriv"]), ratio(res["plain"], res["dtriv"])])
    return rows


def main(argv=None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = setup(args)
    sphere_shapes = SPHERE_SHAPES[:2] if args.quick else SPHERE_SHAPES
    spectral_shapes = SPECTRAL_SHAPES[:1] if args.quick else SPECTRAL_SHAPES
    note = ("forward + backward of `(W * C).sum()` per call, float32; "
            "ratio = peer / dtriv (above 1: dtriv faster).")
    worst = {k: [] for k in ("sphere", "retraction", "weight_norm", "spectral")}
    rows = sphere_rows(args, device, sphere_shapes, worst["sphere"])
    emit(args, "Sphere parametrizations vs the plain normalisation",
         md_table(["shape", "dtriv", "dtriv time", "plain v/|v|", "plain / dtriv",
                   "geotorch / dtriv"], rows), note)
    rows = retraction_rows(args, device, sphere_shapes, worst["retraction"])
    emit(args, "Sphere retractions vs (x + v)/|x + v|",
         md_table(["shape", "map", "dtriv time", "plain", "plain / dtriv"], rows),
         note + " Gradient in the tangent v.")
    rows = weight_norm_rows(args, device, sphere_shapes, worst["weight_norm"])
    emit(args, "weight_norm twin",
         md_table(["shape", "dim", "dtriv", "torch", "plain g v/|v|", "torch / dtriv",
                   "plain / dtriv"], rows), note)
    rows = spectral_rows(args, device, spectral_shapes, worst["spectral"])
    emit(args, "spectral_norm twin vs torch and a hand-written power iteration",
         md_table(["shape", "mode", "dtriv", "torch", "plain", "torch / dtriv",
                   "plain / dtriv"], rows),
         note + " Training mode runs one power-iteration step per forward.")
    complete = not args.quick  # --quick leaves out sizes

    def summary(target, key, what):
        w = _worst(worst[key])
        if w is None:
            return (target, ">= 1x (no slower)", "not measured", None)
        met = w[0] >= 1.0
        measured = f"worst {w[0]:.2f}x ({w[1]}) {what}"
        return (target, ">= 1x (no slower)", measured, met if (complete or not met) else None)

    emit_summary(args, "sphere and spectral maps", [
        summary("sphere parametrizations vs v/|v|", "sphere", "plain / dtriv"),
        summary("sphere retractions vs (x + v)/|x + v|", "retraction", "plain / dtriv"),
        summary("spectral_norm twin vs hand-written power iteration", "spectral",
                "plain / dtriv"),
        summary("weight_norm twin vs torch", "weight_norm", "torch / dtriv"),
    ])

if __name__ == "__main__":
    main()
