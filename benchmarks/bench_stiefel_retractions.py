"""Time the O(n k^2) Stiefel retractions against the dense n x n formulations.

For each size (n, k, dtype) the script times, forward and forward + backward (gradient with
respect to the tangent), every retraction of :mod:`dtriv.retractions.stiefel` at a random
point, and the dense constructions of ``torch.nn.utils.parametrizations.orthogonal`` on a
tall weight: the n x n Cayley transform ``solve(I - A/2, I + A/2)[:, :k]`` and the n x n
exponential ``matrix_exp(A)[:, :k]`` of ``A = Y - Y^H``, ``Y = [X.tril(), 0]``, plus torch's
``householder_product`` (also O(n k^2)). The dense maps are skipped when ``n`` exceeds
``--dense-max-n``. The ratio column is dense time / dtriv time for the pairs that compute
the same map (``cayley`` vs the dense Cayley, ``exp_canonical`` vs the dense exponential).

Example::

    python benchmarks/bench_stiefel_retractions.py
    python benchmarks/bench_stiefel_retractions.py --sizes 4096x64:float32 --repeat 3
    python benchmarks/bench_stiefel_retractions.py --device cuda

On a shared CPU, ``--threads 1`` gives steadier numbers (oversubscribed BLAS threads
dominate small ``k x k`` operations).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from dtriv.retractions.stiefel import (
    stiefel_cayley,
    stiefel_exp,
    stiefel_exp_canonical,
    stiefel_polar,
    stiefel_polar_newton_schulz,
    stiefel_qr,
)

DEFAULT_SIZES = ["200000x8:float64", "4096x64:float32", "1024x256:float32", "512x16:float64"]
RETRACTIONS: dict[str, Callable] = {
    "qr": stiefel_qr,
    "polar": stiefel_polar,
    "polar_ns": stiefel_polar_newton_schulz,
    "cayley": stiefel_cayley,
    "exp": stiefel_exp,
    "exp_canonical": stiefel_exp_canonical,
}
PAIRS = {"cayley": "dense_cayley", "exp_canonical": "dense_expm"}


def parse_size(text: str) -> tuple[int, int, torch.dtype]:
    """``"NxK:dtype"`` -> (n, k, dtype)."""
    try:
        shape, _, dtype_name = text.partition(":")
        n, k = (int(v) for v in shape.lower().split("x"))
        dtype = getattr(torch, dtype_name or "float32")
    except (ValueError, AttributeError) as err:
        raise argparse.ArgumentTypeError(
            f"size: expected NxK[:dtype], e.g. 4096x64:float32, got {text!r}"
        ) from err
    if not isinstance(dtype, torch.dtype) or n < k or k < 1:
        raise argparse.ArgumentTypeError(f"size: expected n >= k >= 1 and a dtype, got {text!r}")
    return n, k, dtype


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, warmup: int,
                repeat: int) -> float:
    """Median wall time in milliseconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def problem(n: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A point B, a tangent V of norm ~1, and torch's tall parameter X (n x k)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = torch.linalg.qr(torch.randn(n, k, dtype=dtype, generator=g))[0].to(device)
    Z = (torch.randn(n, k, dtype=dtype, generator=g) / (n * k) ** 0.5).to(device)
    V = Z - B @ ((B.mH @ Z + Z.mH @ B) / 2)
    X = (0.1 * torch.randn(n, k, dtype=dtype, generator=g)).to(device)
    return B, V, X


def dense_skew(X: torch.Tensor) -> torch.Tensor:
    n, k = X.shape
    Y = torch.cat([X.tril(), X.new_zeros(n, n - k)], dim=-1)
    return Y - Y.mH


def dense_maps(n: int, k: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    def dense_cayley(X):
        A = dense_skew(X)
        Id = torch.eye(n, dtype=X.dtype, device=X.device)
        return torch.linalg.solve(Id - A / 2, Id + A / 2)[:, :k]

    def dense_expm(X):
        return torch.linalg.matrix_exp(dense_skew(X))[:, :k]

    return {"dense_cayley": dense_cayley, "dense_expm": dense_expm}


def householder(X: torch.Tensor) -> torch.Tensor:
    A = X.tril(-1)
    tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
    return torch.linalg.householder_product(A, tau)


def timings(fn: Callable[[torch.Tensor], torch.Tensor], arg: torch.Tensor,
            weight: torch.Tensor, device: torch.device, warmup: int,
            repeat: int, backward: bool = True) -> tuple[float, float | None]:
    """(forward ms, forward + backward ms or None) of ``fn`` at ``arg``."""

    def forward():
        with torch.no_grad():
            fn(arg)

    leaf = arg.detach().clone().requires_grad_()

    def forward_backward():
        leaf.grad = None
        (fn(leaf) * weight).sum().backward()

    fwd = median_time(forward, device, warmup, repeat)
    fwdbwd = median_time(forward_backward, device, warmup, repeat) if backward else None
    return fwd, fwdbwd


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for n, k, dtype in args.sizes:
        B, V, X = problem(n, k, dtype, device)
        weight = torch.randn(n, k, dtype=dtype, generator=torch.Generator().manual_seed(1))
        weight = weight.to(device)
        size = f"{n}x{k} {str(dtype).removeprefix('torch.')}"
        results = {}
        for name in args.maps:
            f = RETRACTIONS[name]
            results[name] = timings(lambda v, f=f, B=B: f(B, v), V, weight, device,
                                    args.warmup, args.repeat)
        dense = n <= args.dense_max_n
        notes = {}
        if dtype.is_floating_point:
            # householder_product's backward allocates n x n: forward only beyond dense_max_n
            results["householder (torch)"] = timings(householder, X, weight, device,
                                                     args.warmup, args.repeat, backward=dense)
            if not dense:
                notes["householder (torch)"] = "its backward forms n x n"
        if dense:
            for name, f in dense_maps(n, k).items():
                results[name] = timings(f, X, weight, device, args.warmup, args.repeat)
        for name, (fwd, fwdbwd) in results.items():
            row = {"size": size, "map": name, "fwd_ms": fwd, "fwdbwd_ms": fwdbwd,
                   "ratio_fwd": None, "ratio_fwdbwd": None, "note": notes.get(name)}
            pair = PAIRS.get(name)
            if pair in results:
                row["ratio_fwd"] = results[pair][0] / fwd
                row["ratio_fwdbwd"] = results[pair][1] / fwdbwd
            rows.append(row)
        if not dense:
            for pair in PAIRS.values():
                rows.append({"size": size, "map": pair, "fwd_ms": None, "fwdbwd_ms": None,
                             "ratio_fwd": None, "ratio_fwdbwd": None,
                             "note": f"skipped: n > --dense-max-n, n x n = {nbytes(n, dtype)}"})
    return rows


def nbytes(n: int, dtype: torch.dtype) -> str:
    """Human-readable size of an n x n matrix of ``dtype``."""
    size = n * n * torch.empty((), dtype=dtype).element_size()
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.0f} GiB"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = (f"{'size':<22}{'map':<22}{'fwd ms':>11}{'fwd+bwd ms':>12}"
              f"{'dense/dtriv fwd':>17}{'dense/dtriv f+b':>17}")
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r['size']:<22}{r['map']:<22}{fmt(r['fwd_ms'], '.3f'):>11}"
                f"{fmt(r['fwdbwd_ms'], '.3f'):>12}{fmt(r['ratio_fwd'], '.1f'):>17}"
                f"{fmt(r['ratio_fwdbwd'], '.1f'):>17}")
        if r.get("note"):
            line += f"  ({r['note']})"
        print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size,
                        default=[parse_size(s) for s in DEFAULT_SIZES],
                        help="sizes as NxK[:dtype] (default: %(default)s)")
    parser.add_argument("--maps", nargs="+", choices=list(RETRACTIONS),
                        default=list(RETRACTIONS), help="retractions to time")
    parser.add_argument("--dense-max-n", type=int, default=4096,
                        help="largest n for the dense n x n baselines (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls (default: 1)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"warmup {args.warmup}, median of {args.repeat}")
    print_table(run(args))


if __name__ == "__main__":
    main()
