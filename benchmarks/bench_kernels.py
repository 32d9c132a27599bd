"""dtriv's elementwise and structured building blocks against the torch operations they replace.

Each row times one building block of the maps beside the torch expression it stands for
(the same values), interleaved in one ``measure`` call, ``inner`` calls per round:

* lower triangle: ``torch.tril(X, -1)`` (out of place) against
  ``dtriv.retractions._common.tril_copy`` (a copy and the in-place ``tril_``);
* Hermitian square: ``A @ A`` for a skew ``A`` against
  ``dtriv.retractions._expm._half_product_into`` (three quarters of the product);
* skew part of the lower triangle: ``L = X.tril(); L - L^T`` against ``skew_of(X, lower=True)``
  with the arena the maps give it (no grad, as in their forward);
* ``ut(G) = striu(G) + diag(G)/2`` of the Householder WY form: ``G.triu(1) +
  diag_embed(diag(G)/2)`` against ``dtriv.retractions.householder._ut_of_gram``;
* a spectral-norm read under ``no_grad`` in eval mode: torch's ``spectral_norm`` against
  dtriv's twin.

Ratios are torch / dtriv (above 1: dtriv's block is faster). CPU only (the blocks that are
not the torch operation are used on CPU only).

    python benchmarks/bench_kernels.py            # about 30 s
    python benchmarks/bench_kernels.py --quick
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations as tp

from dtriv.parametrize import twins
from dtriv.retractions._common import tril_copy
from dtriv.retractions._expm import _half_product_into, skew_of
from dtriv.retractions._scratch import Arena
from dtriv.retractions.householder import _ut_of_gram

from harness import emit, md_table, measure, paired_ratio, parser, setup


def _repeat(fn: Callable[[], object], inner: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(inner):
            fn()
    return run


def _skew_with_arena(X: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad(), Arena(X) as arena:
            return skew_of(X, True, arena, out=arena.empty())
    return run


def _torch_skew(X: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            L = X.tril()
            return L - L.mT
    return run


def _spectral_reads(shape: tuple[int, ...]) -> tuple[Callable[[], object], Callable[[], object]]:
    mods = []
    for fn in (tp.spectral_norm, twins.spectral_norm):
        torch.manual_seed(0)
        m = nn.Conv2d(shape[1], shape[0], shape[2:]) if len(shape) == 4 else nn.Linear(*shape[::-1])
        mods.append(fn(m).eval())

    def read(m: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m.weight
        return run

    return read(mods[0]), read(mods[1])


def rows_for(quick: bool) -> list[tuple[str, str, Callable[[], object], Callable[[], object], int]]:
    """``(block, shape, torch's, dtriv's, inner calls)`` of every row."""
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in ([(512, 512)] if quick else [(512, 512), (4096, 64), (20, 256, 256)]):
        X = torch.randn(shape, generator=g)
        out.append(("lower triangle, tril(X, -1)", "x".join(map(str, shape)),
                    lambda X=X: torch.tril(X, -1), lambda X=X: tril_copy(X, -1), 20))
    for n in ([512] if quick else [512, 1024]):
        L = torch.randn(n, n, generator=g) / n ** 0.5
        A = L - L.mT
        buf = torch.empty_like(A)
        out.append(("Hermitian square A @ A (skew A)", f"{n}x{n}",
                    lambda A=A, buf=buf: torch.mm(A, A, out=buf),
                    lambda A=A, buf=buf: _half_product_into(A, A, buf), 2 if n >= 1024 else 5))
    for n in ([700] if quick else [64, 700]):
        X = torch.randn(n, n, generator=g)
        out.append(("skew part of the lower triangle", f"{n}x{n}", _torch_skew(X),
                    _skew_with_arena(X), 200 if n < 128 else 20))
    G = torch.randn(512, 512, generator=g)
    out.append(("ut(G) = striu(G) + diag(G)/2", "512x512",
                lambda: G.triu(1) + torch.diag_embed(G.diagonal() / 2),
                lambda: _ut_of_gram(G), 10))
    for shape in ([(64, 64, 3, 3)] if quick else [(64, 64, 3, 3), (512, 512)]):
        theirs, ours = _spectral_reads(shape)
        out.append(("spectral_norm read, eval, no_grad", "x".join(map(str, shape)),
                    theirs, ours, 200))
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    device = setup(args)
    if device.type != "cpu":
        raise SystemExit("bench_kernels.py: CPU only (its blocks are used on CPU)")
    table = []
    for block, shape, theirs, ours, inner in rows_for(args.quick):
        t = measure({"torch": _repeat(theirs, inner), "dtriv": _repeat(ours, inner)},
                    repeats=args.repeats or (5 if args.quick else 15),
                    warmup=args.warmup if args.warmup is not None else 2,
                    budget_s=args.budget or (1.0 if args.quick else 3.0), device=device)
        per = {k: v.per_call(inner) for k, v in t.items()}
        table.append([block, shape, str(per["torch"]), str(per["dtriv"]),
                      f"{paired_ratio(t['torch'], t['dtriv']):.2f}x"])
        print(f"{block} {shape}: torch {per['torch']}, dtriv {per['dtriv']}", flush=True)
    emit(args, "Building blocks against the torch operations they replace (CPU, float32)",
         md_table(["block", "shape", "torch", "dtriv", "torch / dtriv"], table),
         "Per call, median ± half the interquartile range over interleaved rounds; ratio: "
         "the median of the per-round ratios (above 1: dtriv's block is faster).")


if __name__ == "__main__":
    main()
