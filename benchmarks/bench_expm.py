"""``dtriv.retractions.expm`` against ``torch.linalg.matrix_exp`` on skew matrices (the raw map).

For each size n and regime, a skew ``A = L - L^T`` (``L`` lower triangular) is built and the
forward (under ``no_grad``) and the forward + backward (gradient of ``(expm(A)**2 * C).sum()``
with respect to ``L``) of both maps are timed interleaved with one n x n matmul. Regimes:
``small`` (``|A|_1 = 1``, typical near the base of a dynamic trivialization) and ``large``
(``L`` entries N(0, 1/n), random generators: ``|A|_1 ~ 0.8 sqrt(n)``, ``|A|_2 ~ 2``). dtriv
takes its skew path (Taylor schemes, degree and scaling from ``min_k |A^k|_1^(1/k)``);
torch's backward is a 2n x 2n exponential.

    python benchmarks/bench_expm.py              # n = 64 ... 1024, float32
    python benchmarks/bench_expm.py --quick      # n = 64, 512, large regime
    python benchmarks/bench_expm.py --dtype float64
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dtriv.retractions import expm

from harness import emit, matmul_case, md_table, measure, paired_ratio, parser, ratio, setup

SIZES = [64, 128, 256, 512, 1024]


def problem(n: int, regime: str, dtype: torch.dtype, device: torch.device,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(n, n, generator=g, dtype=torch.float64).tril() / n ** 0.5
    if regime == "small":
        L = L / (L - L.mT).abs().sum(dim=-2).amax()
    C = torch.randn(n, n, generator=g, dtype=torch.float64)
    return L.to(device, dtype), C.to(device, dtype)


def cases(fn: Callable[[torch.Tensor], torch.Tensor], L: torch.Tensor,
          C: torch.Tensor) -> tuple[Callable[[], object], Callable[[], object]]:
    leaf = L.clone().requires_grad_()
    A0 = (L - L.mT).contiguous()

    def forward() -> None:
        with torch.no_grad():
            fn(A0)

    def forward_backward() -> None:
        leaf.grad = None
        (fn(leaf - leaf.mT) ** 2 * C).sum().backward()

    return forward, forward_backward


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help=f"default {SIZES}")
    p.add_argument("--regimes", nargs="+", default=None, choices=["small", "large"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = p.parse_args(argv)
    device = setup(args)
    dtype = getattr(torch, args.dtype)
    sizes = args.sizes or ([64, 512] if args.quick else SIZES)
    regimes = args.regimes or (["large"] if args.quick else ["small", "large"])
    rows = []
    for regime in regimes:
        for n in sizes:
            L, C = problem(n, regime, dtype, device)
            d_f, d_fb = cases(expm, L, C)
            t_f, t_fb = cases(torch.linalg.matrix_exp, L, C)
            big = n >= 1024
            t = measure({"matmul": matmul_case(n, dtype, device), "dtriv fwd": d_f,
                         "torch fwd": t_f, "dtriv f+b": d_fb, "torch f+b": t_fb},
                        repeats=args.repeats or (3 if big else 10),
                        warmup=args.warmup if args.warmup is not None else 1,
                        budget_s=args.budget or (1.0 if big else 2.0),
                        min_repeats=2 if big else 3, device=device)
            mm = t["matmul"]
            norm = float((L - L.mT).abs().sum(dim=-2).amax())
            rows.append([regime, str(n), f"{norm:.3g}", str(t["dtriv fwd"]),
                         str(t["torch fwd"]), ratio(t["torch fwd"], t["dtriv fwd"]),
                         str(t["dtriv f+b"]), str(t["torch f+b"]),
                         ratio(t["torch f+b"], t["dtriv f+b"]),
                         f"{paired_ratio(t['dtriv f+b'], mm):.1f}",
                         f"{paired_ratio(t['torch f+b'], mm):.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    emit(args, f"expm of skew matrices ({args.dtype}): dtriv vs torch.linalg.matrix_exp",
         md_table(["regime", "n", "1-norm of A", "dtriv fwd", "torch fwd", "torch/dtriv",
                   "dtriv f+b", "torch f+b", "torch/dtriv", "dtriv f+b in matmuls",
                   "torch f+b in matmuls"], rows),
         "Medians ± half the interquartile range (in % of the median) of interleaved rounds; "
         "f+b: gradient of "
         "`(expm(L - L^T)**2 * C).sum()` in L; ratios torch/dtriv (above 1: dtriv faster); "
         "matmuls: one n x n product timed in the same rounds.")


if __name__ == "__main__":
    main()
