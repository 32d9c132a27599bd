"""Forward + backward time of orthogonal parametrizations: dtriv's twin, torch's, geotorch's.

For each shape and map, one weight is parametrized by

* ``dtriv.parametrize.orthogonal`` (the twin of torch's),
* ``torch.nn.utils.parametrizations.orthogonal``,
* ``geotorch.orthogonal`` (``triv="expm"``/``"cayley"``; it has no householder and always
  keeps an ``n x n`` base),

and ``W = module.weight; (W * C).sum().backward()`` is timed (median of ``--repeats`` runs
after ``--warmup`` runs). Times in milliseconds; ratios > 1 mean dtriv is faster.

Tall weights use the ``O(n k^2)`` Stiefel maps in dtriv and the ``n x n`` embedding in torch
and geotorch. Example::

    python benchmarks/bench_orthogonal.py                       # the full table
    python benchmarks/bench_orthogonal.py --square 32 64 --tall 256x16 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations as torch_param

from dtriv.parametrize import twins

try:
    import geotorch
except ImportError:  # optional
    geotorch = None


class Holder(nn.Module):
    def __init__(self, shape, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape, dtype=dtype, device=device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fwd_bwd(module: nn.Module, C: torch.Tensor) -> float:
    """Seconds of one ``(module.weight * C).sum().backward()``."""
    for p in module.parameters():
        p.grad = None
    _sync(C.device)
    t0 = time.perf_counter()
    (module.weight * C).sum().backward()
    _sync(C.device)
    return time.perf_counter() - t0


def time_fwd_bwd(modules: dict[str, nn.Module], repeats: int, warmup: int,
                 budget: float) -> dict[str, float]:
    """Median seconds of a forward + backward of each module, interleaved run by run.

    Interleaving (in alternating order) spreads fluctuations of the machine's load and
    cache effects over all implementations.
    Stops early (at least one timed run each) once ``budget`` seconds have passed.
    """
    any_module = next(iter(modules.values()))
    C = torch.randn_like(any_module.weight.detach())
    times: dict[str, list[float]] = {name: [] for name in modules}
    start = time.perf_counter()
    order = list(modules.items())
    for i in range(warmup + repeats):
        for name, module in order if i % 2 == 0 else order[::-1]:
            t = _fwd_bwd(module, C)
            if i >= warmup:
                times[name].append(t)
        if i >= warmup and time.perf_counter() - start > budget:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.no_grad()
def _set_parameter_(module: nn.Module, orthogonal_map: str, scale: float, seed: int) -> None:
    """The same parameter in every implementation: ``N(0, scale^2 / max(n, k))`` entries.

    (After registration with a base the parameter is the identity value, for which the maps
    are trivially cheap.) Householder keeps its diagonal of signs.
    """
    for p in module.parameters():
        g = torch.Generator(device="cpu").manual_seed(seed)
        P = torch.randn(p.shape, generator=g, dtype=p.dtype) * (scale / max(p.shape[-2:]) ** 0.5)
        if orthogonal_map == "householder":
            P.diagonal(dim1=-2, dim2=-1).copy_(p.diagonal(dim1=-2, dim2=-1))
        p.copy_(P)


def _builders(orthogonal_map: str, triv: bool) -> dict[str, Callable[[nn.Module], object]]:
    out: dict[str, Callable[[nn.Module], object]] = {
        "dtriv": lambda m: twins.orthogonal(m, orthogonal_map=orthogonal_map,
                                            use_trivialization=triv),
        "torch": lambda m: torch_param.orthogonal(m, orthogonal_map=orthogonal_map,
                                                  use_trivialization=triv),
    }
    if geotorch is not None and orthogonal_map != "householder":
        name = "expm" if orthogonal_map == "matrix_exp" else "cayley"
        out["geotorch"] = lambda m: geotorch.orthogonal(m, "weight", triv=name)
    return out


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = [(n, n) for n in args.square]
    shapes += [tuple(int(s) for s in t.lower().split("x")) for t in args.tall]
    rows = []
    geo_cache: dict[tuple, float] = {}
    for shape in shapes:
        n, k = shape
        for orthogonal_map in args.maps:
            for triv in args.trivialization:
                row = {"shape": f"{n}x{k}", "map": orthogonal_map, "triv": triv}
                modules = {}
                for impl, build in _builders(orthogonal_map, triv).items():
                    if impl not in args.impls:
                        continue
                    if impl == "geotorch" and (shape, orthogonal_map) in geo_cache:
                        row[impl] = geo_cache[shape, orthogonal_map]  # has no such option
                        continue
                    torch.manual_seed(args.seed)
                    modules[impl] = Holder(shape, dtype, device)
                    build(modules[impl])
                    _set_parameter_(modules[impl], orthogonal_map, args.param_scale, args.seed)
                row.update(time_fwd_bwd(modules, args.repeats, args.warmup, args.budget))
                if "geotorch" in row:
                    geo_cache[shape, orthogonal_map] = row["geotorch"]
                rows.append(row)
                print_row(row)
    return rows


def _fmt_ms(t: float | None) -> str:
    return "-" if t is None else f"{1e3 * t:10.3f}"


def _fmt_ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:8.2f}"


HEADER = (f"{'shape':>10} {'map':>11} {'triv':>5} {'dtriv ms':>10} {'torch ms':>10} "
          f"{'geotorch ms':>11} {'torch/dtriv':>11} {'geotorch/dtriv':>14}")


def print_row(row: dict) -> None:
    print(
        f"{row['shape']:>10} {row['map']:>11} {str(row['triv']):>5} "
        f"{_fmt_ms(row.get('dtriv')):>10} {_fmt_ms(row.get('torch')):>10} "
        f"{_fmt_ms(row.get('geotorch')):>11} "
        f"{_fmt_ratio(row.get('torch'), row.get('dtriv')):>11} "
        f"{_fmt_ratio(row.get('geotorch'), row.get('dtriv')):>14}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--square", type=int, nargs="*", default=[64, 128, 256, 512, 1024],
                        help="sizes n of square n x n weights")
    parser.add_argument("--tall", nargs="*", default=["4096x64"],
                        help="tall shapes NxK (N > K)")
    parser.add_argument("--maps", nargs="+", default=["matrix_exp", "cayley", "householder"],
                        choices=["matrix_exp", "cayley", "householder"])
    parser.add_argument("--trivialization", nargs="+", type=lambda s: s.lower() == "true",
                        default=[False, True], help="use_trivialization values: true false")
    parser.add_argument("--impls", nargs="+", default=["dtriv", "torch", "geotorch"],
                        choices=["dtriv", "torch", "geotorch"], help="implementations to time")
    parser.add_argument("--param-scale", type=float, default=1.0,
                        help="parameter entries ~ N(0, scale^2 / n) (the same in all)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds per measurement; fewer repeats once exceeded")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, geotorch "
          f"{'yes' if geotorch is not None else 'not installed'}; median of {args.repeats}")
    print(HEADER)
    run(args)


if __name__ == "__main__":
    main()
