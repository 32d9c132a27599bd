"""The GPU table: dtriv beside its peers on an accelerator, in float32 and bfloat16.

For a machine with a CUDA device (``make bench-gpu`` writes ``benchmarks/RESULTS-gpu.md``);
``--device cpu --quick`` runs the same cases at small sizes, to try the script where there is
no GPU (its figures are not the CPU suite's: that is ``run_all.py``). For each dtype of
``--dtypes`` (``float32 bfloat16``), interleaved per case as in every script here:

* square ``orthogonal`` (``matrix_exp``, ``cayley``, ``householder``): forward + backward of
  ``(W**2 * C).sum()`` at n = 512 and 1024, dtriv's twin against torch's ``orthogonal`` and
  geotorch's, with the time in n x n products of the dtype;
* tall (4096, 64) ``orthogonal``, the same loss, against torch's (which maps an n x n
  matrix);
* the polar retraction of a (4096, 1024) point: the matmul-only Newton--Schulz map
  ``stiefel_polar_newton_schulz`` against the SVD one ``stiefel_polar``, forward and forward +
  backward (gradient in the tangent), with each result's orthonormality error and their
  distance;
* one ``RiemannianAdam`` step on Stiefel (512, 512) against geoopt's (float32 only);
* the sphere parametrization of the rows of a 512 x 512 weight against ``v / |v|``.

A peer that fails for a dtype (CPU LAPACK has no half-precision QR, LU or SVD; some CUDA
kernels neither) gets "n/a" and the first words of its error. dtriv's maps compute half
precision in float32 (their accuracy needs it) and return the dtype of the weight.

Usage::

    python benchmarks/bench_gpu.py --device cuda [--dtypes float32 bfloat16] [--markdown F]
    python benchmarks/bench_gpu.py --device cpu --quick      # a dry run, about a minute
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from bench_orthogonal import _builders, _parameter
from bench_sphere_spectral import Normalize
from torch import nn

import dtriv
from dtriv.manifolds import Stiefel
from dtriv.retractions import stiefel_polar, stiefel_polar_newton_schulz

from harness import Timing, emit, matmul_case, md_table, measure, parser, ratio, setup

with warnings.catch_warnings():  # geoopt scripts functions with the deprecated torch.jit
    warnings.simplefilter("ignore")
    try:
        import geoopt
    except ImportError:  # optional
        geoopt = None

MAPS = ["matrix_exp", "cayley", "householder"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _failed(err: Exception) -> str:
    words = " ".join(str(err).split()[:6])
    return f"n/a ({type(err).__name__}: {words})"


def _usable(cases: dict[str, Callable[[], object]]) -> tuple[dict, dict[str, str]]:
    """The cases that run once without an error, and the reason of each that does not."""
    ok, failed = {}, {}
    for name, fn in cases.items():
        try:
            fn()
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
            failed[name] = _failed(err)
        else:
            ok[name] = fn
    return ok, failed


def _time(args, device, cases) -> dict[str, Timing]:
    kw = {k: v for k, v in (("repeats", args.repeats), ("warmup", args.warmup),
                            ("budget_s", args.budget)) if v is not None}
    kw.setdefault("repeats", 5 if args.quick else 21)
    kw.setdefault("budget_s", 0.5 if args.quick else 4.0)
    return measure(cases, device=device, **kw)


def _cell(res: dict[str, Timing], failed: dict[str, str], name: str) -> str:
    return str(res[name]) if name in res else failed.get(name, "-")


def _weight_case(module: nn.Module, C: torch.Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def run() -> None:
        for p in params:
            p.grad = None
        (module.weight.float() ** 2 * C).sum().backward()

    return run


def _holder(X: torch.Tensor) -> nn.Module:
    m = nn.Module()
    m.weight = nn.Parameter(X.clone())
    return m


def orthogonal_rows(args, device, dtype, sizes, tall) -> list[list[str]]:
    """Square maps at ``sizes`` and the tall ``tall = (n, k)`` weight, forward + backward."""
    rows = []
    shapes = [(n, n) for n in sizes] + [tall]
    for shape in shapes:
        n, k = shape
        for orthogonal_map in MAPS:
            if n == k:
                X = _parameter(n, orthogonal_map, "large")
            else:
                X = torch.randn(shape, generator=torch.Generator().manual_seed(0)) / k ** 0.5
                if orthogonal_map == "householder":
                    X.diagonal().fill_(1.0)
            X = X.to(device=device, dtype=dtype)
            C = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
            cases = {}
            builders = _builders(orthogonal_map, True)
            if n != k:  # geotorch's tall maps are not the ones compared here
                builders.pop("geotorch", None)
            failed = {}
            for impl, build in builders.items():
                m = _holder(X)
                try:
                    build(m)
                except (RuntimeError, NotImplementedError, ValueError) as err:
                    failed[impl] = _failed(err)
                    continue
                # registration moved X into the base and reset the parameter (0 for dtriv and
                # geotorch, -I for torch): the generator every implementation maps is X, as
                # in bench_orthogonal
                with torch.no_grad():
                    for p in m.parameters():
                        p.copy_(X)
                cases[impl] = _weight_case(m, C)
            cases, more = _usable(cases)
            failed.update(more)
            cases["matmul"] = matmul_case(n, dtype, device)
            res = _time(args, device, cases)
            unit = res["matmul"].median
            mm = f"{res['dtriv'].median / unit:.1f}" if "dtriv" in res else "-"
            rows.append([f"{n}x{k}", orthogonal_map, _cell(res, failed, "dtriv"), mm,
                         _cell(res, failed, "torch"), ratio(res.get("torch"), res.get("dtriv")),
                         _cell(res, failed, "geotorch"),
                         ratio(res.get("geotorch"), res.get("dtriv"))])
    return rows


def _orthonormality(Y: torch.Tensor) -> float:
    Y = Y.detach().double()
    return float((Y.mT @ Y - torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)).abs().max())


def polar_rows(args, device, dtype, shape) -> list[list[str]]:
    """Newton--Schulz against SVD polar at ``shape``: forward, forward + backward, accuracy."""
    g = torch.Generator().manual_seed(0)
    n, k = shape
    X = Stiefel(n, k).sample(generator=g).to(device=device, dtype=dtype)
    V0 = 0.1 * Stiefel(n, k).proj_tangent(X.float().cpu(), torch.randn(n, k, generator=g))
    V = V0.to(device=device, dtype=dtype).requires_grad_()
    C = torch.randn(n, k, generator=g).to(device)
    maps = {"polar (SVD)": stiefel_polar, "polar_ns (Newton-Schulz)": stiefel_polar_newton_schulz}

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(X, V)
        return run

    def both(fn):
        def run():
            V.grad = None
            (fn(X, V).float() * C).sum().backward()
        return run

    rows = []
    fwd, failed_f = _usable({name: forward(fn) for name, fn in maps.items()})
    full, failed_b = _usable({name: both(fn) for name, fn in maps.items()})
    res_f = _time(args, device, fwd) if fwd else {}
    res_b = _time(args, device, full) if full else {}
    with torch.no_grad():
        outs = {}
        for name, fn in maps.items():
            try:
                outs[name] = fn(X, V)
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                pass
    svd, ns = "polar (SVD)", "polar_ns (Newton-Schulz)"
    gap = (f"{float((outs[ns].double() - outs[svd].double()).abs().max()):.1e}"
           if svd in outs and ns in outs else "-")
    for name in maps:
        rows.append([f"{n}x{k}", name, _cell(res_f, failed_f, name),
                     _cell(res_b, failed_b, name),
                     f"{_orthonormality(outs[name]):.1e}" if name in outs else "-",
                     gap if name == ns else ""])
    rows.append([f"{n}x{k}", "SVD / Newton-Schulz", ratio(res_f.get(svd), res_f.get(ns)),
                 ratio(res_b.get(svd), res_b.get(ns)), "", ""])
    return rows


def adam_rows(args, device, shape) -> list[list[str]]:
    """One RiemannianAdam step against geoopt's (float32)."""
    from dtriv.optim import ManifoldParameter, RiemannianAdam

    n, k = shape
    g = torch.Generator().manual_seed(0)
    X0 = Stiefel(n, k).sample(generator=g).to(device)
    G = torch.randn(n, k, generator=g).to(device)

    def stepper(opt, p):
        def step():
            p.grad = G
            opt.step()
        return step

    p = ManifoldParameter(X0.clone(), Stiefel(n, k))
    cases = {"dtriv": stepper(RiemannianAdam([p], lr=1e-3, retraction="qr"), p)}
    if geoopt is not None:
        q = geoopt.ManifoldParameter(X0.clone(), manifold=geoopt.Stiefel(canonical=False))
        cases["geoopt"] = stepper(geoopt.optim.RiemannianAdam([q], lr=1e-3), q)
    cases, failed = _usable(cases)
    res = _time(args, device, cases)
    return [[f"{n}x{k}", _cell(res, failed, "dtriv"), _cell(res, failed, "geoopt"),
             ratio(res.get("geoopt"), res.get("dtriv"))]]


def sphere_rows(args, device, dtype, shape) -> list[list[str]]:
    """The sphere parametrization of the rows against the plain normalisation."""
    X = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    C = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    plain = _holder(X)
    torch.nn.utils.parametrize.register_parametrization(plain, "weight", Normalize())
    cases = {"plain": _weight_case(plain, C)}
    for retraction in ("exp", "projective"):
        m = _holder(X)
        dtriv.parametrize.sphere(m, retraction=retraction)
        with torch.no_grad():  # a point away from the base
            m.parametrizations.weight.original.normal_(0, 0.1)
        cases[retraction] = _weight_case(m, C)
    cases, failed = _usable(cases)
    res = _time(args, device, cases)
    label = "x".join(map(str, shape))
    return [[label, f"sphere({r})", _cell(res, failed, r), _cell(res, failed, "plain"),
             ratio(res.get("plain"), res.get(r))] for r in ("exp", "projective")]


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.set_defaults(device="cuda")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    args = p.parse_args(argv)
    device = setup(args)
    if args.quick:
        sizes, tall, polar, adam, sphere = [128], (512, 32), (512, 128), (128, 128), (128, 128)
    else:
        sizes, tall, polar, adam = [512, 1024], (4096, 64), (4096, 1024), (512, 512)
        sphere = (512, 512)
    name = "GPU" if device.type == "cuda" else f"{device.type} (dry run of the GPU table)"
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        emit(args, f"{name}: orthogonal maps, {dtype_name}", md_table(
            ["shape", "map", "dtriv", "dtriv (matmuls)", "torch", "torch / dtriv", "geotorch",
             "geotorch / dtriv"], orthogonal_rows(args, device, dtype, sizes, tall)),
            "forward + backward of `(W**2 * C).sum()`; matmuls: n x n products of the dtype; "
            "ratio = peer / dtriv (above 1: dtriv faster).")
        emit(args, f"{name}: polar retraction, Newton-Schulz against SVD, {dtype_name}",
             md_table(["shape", "map", "forward", "forward + backward", "max|Y^T Y - I|",
                       "max|Y_ns - Y_svd|"], polar_rows(args, device, dtype, polar)),
             "`stiefel_polar_newton_schulz(X, V)` against `stiefel_polar(X, V)` (thin SVD), "
             "the gradient in the tangent `V`.")
        emit(args, f"{name}: sphere parametrization, {dtype_name}", md_table(
            ["shape", "dtriv", "dtriv time", "plain v/|v|", "plain / dtriv"],
            sphere_rows(args, device, dtype, sphere)))
    emit(args, f"{name}: RiemannianAdam step on Stiefel, float32", md_table(
        ["shape", "dtriv", "geoopt", "geoopt / dtriv"], adam_rows(args, device, adam)),
        "dtriv `retraction=\"qr\"` against geoopt's EuclideanStiefel (the same algorithm).")


if __name__ == "__main__":
    main()
