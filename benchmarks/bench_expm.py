"""Time ``dtriv.retractions.expm`` against ``torch.linalg.matrix_exp`` on skew matrices.

For each size n and dtype the script times the forward (under ``no_grad``) and the forward +
backward (gradient of ``<W, expm(A)>`` with respect to ``A``) of both maps at a random skew
``A`` scaled to a given 1-norm, and prints the medians and the ratio torch / dtriv (above 1:
dtriv is faster). dtriv's forward is a Padé scaling and squaring whose backward reuses the
forward's factors (Al-Mohy & Higham); torch's backward is a 2n x 2n exponential.

Example::

    python benchmarks/bench_expm.py --threads 1
    python benchmarks/bench_expm.py --sizes 64 256 --dtypes float64 --norms 0.5 3 30
    python benchmarks/bench_expm.py --small      # the crossover for tiny n (batched)

On a shared CPU, ``--threads 1`` gives steadier numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from dtriv.retractions import expm
from dtriv.retractions._expm import choose_degree

DEFAULT_SIZES = [64, 128, 256, 512, 1024]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int,
                budget_s: float) -> float:
    """Median wall time in milliseconds of ``fn()`` after ``warmup`` untimed calls (stops
    repeating once ``budget_s`` seconds are spent, after at least 3 timed calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    return 1e3 * statistics.median(times)


def skew_problem(batch: tuple[int, ...], n: int, dtype: torch.dtype, norm: float,
                 device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A skew ``A`` with largest 1-norm ``norm`` and a weight ``W`` for the loss <W, e^A>."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, n, dtype=dtype, generator=g)
    A = X - X.mH
    scale = A.abs().sum(dim=-2).amax()
    A = A * (norm / scale) if scale > 0 else A  # a real 1 x 1 skew matrix is 0
    W = torch.randn(*batch, n, n, dtype=dtype, generator=g)
    return A.to(device), W.to(device)


def timings(fn: Callable[[torch.Tensor], torch.Tensor], A: torch.Tensor, W: torch.Tensor,
            args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of ``fn`` at ``A``."""

    def forward():
        with torch.no_grad():
            fn(A)

    leaf = A.detach().clone().requires_grad_()

    def forward_backward():
        leaf.grad = None
        (fn(leaf) * W).sum().backward()

    fwd = median_time(forward, device, args.warmup, args.repeat, args.budget)
    fwdbwd = median_time(forward_backward, device, args.warmup, args.repeat, args.budget)
    return fwd, fwdbwd


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    batch = tuple(args.batch)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for norm in args.norms:
            for n in args.sizes:
                A, W = skew_problem(batch, n, dtype, norm, device)
                m, s = choose_degree(norm, dtype)
                t_fwd, t_fb = timings(torch.linalg.matrix_exp, A, W, args, device)
                d_fwd, d_fb = timings(expm, A, W, args, device)
                rows.append({
                    "dtype": dtype_name, "norm": norm, "n": n, "batch": batch, "m": m, "s": s,
                    "torch_fwd": t_fwd, "dtriv_fwd": d_fwd, "torch_fb": t_fb, "dtriv_fb": d_fb,
                })
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'dtype':<9}{'|A|_1':>7}{'batch':>9}{'n':>6}{'m,s':>7}"
              f"{'torch fwd':>11}{'dtriv fwd':>11}{'ratio':>7}"
              f"{'torch f+b':>11}{'dtriv f+b':>11}{'ratio':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        batch = "x".join(map(str, r["batch"])) or "-"
        print(f"{r['dtype']:<9}{r['norm']:>7g}{batch:>9}{r['n']:>6}{r['m']:>4},{r['s']:<2}"
              f"{r['torch_fwd']:>11.3f}{r['dtriv_fwd']:>11.3f}"
              f"{r['torch_fwd'] / r['dtriv_fwd']:>7.2f}"
              f"{r['torch_fb']:>11.3f}{r['dtriv_fb']:>11.3f}"
              f"{r['torch_fb'] / r['dtriv_fb']:>7.2f}")
    print("times in ms (median); ratio = torch / dtriv (> 1: dtriv faster); m,s = Padé degree "
          "and squarings of dtriv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help=f"matrix sizes n (default {DEFAULT_SIZES})")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                   choices=["float32", "float64", "complex64", "complex128"])
    p.add_argument("--norms", type=float, nargs="+", default=[3.0],
                   help="largest 1-norm of the skew input (default 3: one Padé-13 / "
                        "Padé-7 step without squaring)")
    p.add_argument("--batch", type=int, nargs="*", default=[],
                   help="leading batch shape (default: none)")
    p.add_argument("--small", action="store_true",
                   help="time tiny matrices instead (n = 1, 2, 3, 4, 8, 16; add --batch 64 for "
                        "a batch): the crossover below which expm defers to torch")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget", type=float, default=5.0,
                   help="seconds per timing after which repeats stop (min 3 repeats)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.small:
        args.sizes = args.sizes or [1, 2, 3, 4, 8, 16]
        args.repeat = max(args.repeat, 50)
    args.sizes = args.sizes or DEFAULT_SIZES
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print_table(run(args))


if __name__ == "__main__":
    main()
