"""Orthogonal RNN, forward + backward, on each library's default path, against the plain RNN.

The model is a cell loop, ``h_{t+1} = modReLU(W h_t + U x_t)`` (input size 10, batch 128,
``T = 200`` steps), whose cell reads its recurrent weight ``W`` at every step
(``self.recurrent(h)``), as an ``nn.RNNCell`` loop does. One call is a forward and a backward
of ``sum(h_T^2)``. ``W`` is

* ``plain``: an unconstrained ``nn.Linear`` weight (the reference: ratios are ``time / plain``,
  the cost of the constraint, so 1.00x means free);
* ``dtriv orthogonal``: the twin ``dtriv.parametrize.orthogonal`` with its defaults
  (``matrix_exp`` with a trivialization base), **no caching code** in the model: the library
  computes the weight once per forward by default;
* ``dtriv constrain``: ``dtriv.parametrize.constrain(rec, "weight", Orthogonal(n))`` with the
  default retraction (``expm``), again with no caching code;
* torch's ``torch.nn.utils.parametrizations.orthogonal`` and geotorch's ``geotorch.orthogonal``,
  each without and with ``torch.nn.utils.parametrize.cached()`` around the forward. Without it
  they recompute the map at every step (``T`` maps per call, seconds per call at hidden 190 and
  minutes at 512), so those two are measured at ``T = 5`` beside a plain RNN at ``T = 5``:
  their ratio is the one at ``T = 5`` (both costs grow linearly in ``T``) and their time at
  ``T = 200`` is an extrapolation (x40), marked as such.

Every constrained ``W`` holds the same parameter after registration: a generator with
``|A|_1 = 1`` (bench_orthogonal's ``small`` regime, the size dynamic trivialization keeps it
at between refreshes), not the zero generator that registration leaves, at which an
exponential map costs almost nothing (hidden 512: 0.99-1.02x there, 1.06-1.09x at this one).

Subnormal numbers are flushed to zero (``torch.set_flush_denormal``) for every variant: the
plain weight shrinks the backward's gradients step after step, which go subnormal in about a
quarter of the steps and slow the plain RNN alone by about 2%.

All variants of one table run interleaved in one ``measure`` call, at 1 and 2 threads
(``torch.set_num_threads``; ``--threads N`` for one count). ``--quick``: hidden 190, ``T = 50``,
the current thread count (about 10 s). The full run takes under 2 minutes on 2 cores.

    python benchmarks/bench_rnn.py [--quick] [--threads N] [--hidden 190 512] [--markdown PATH]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from bench_orthogonal import _parameter
from torch import nn
from torch.nn.utils import parametrizations as torch_parametrizations
from torch.nn.utils import parametrize as torch_parametrize

import dtriv.parametrize as dp
from dtriv.manifolds import Orthogonal

from harness import (
    emit,
    emit_summary,
    fmt_seconds,
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

INPUT, BATCH, T_FULL, T_SHORT = 10, 128, 200, 5
TARGET = 1.1  # the default path's forward+backward within 1.1x of the plain RNN


class ModReLU(nn.Module):
    """``sign(z) relu(|z| + b)``, ``b ~ U(-0.01, 0.01)`` (the experiments' nonlinearity)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.empty(n).uniform_(-0.01, 0.01))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sign(z) * torch.relu(z.abs() + self.b)


class CellLoop(nn.Module):
    """``h <- modReLU(W h + U x_t)``; reads ``recurrent.weight`` at every step."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.input = nn.Linear(INPUT, hidden, bias=False)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        self.nonlinearity = ModReLU(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, batch, INPUT)
        h = x.new_zeros(x.shape[1], self.hidden)
        for u_t in self.input(x).unbind(0):  # unbind: one backward node, not T selects
            h = self.nonlinearity(u_t + self.recurrent(h))
        return h


def build(kind: str, hidden: int) -> CellLoop:
    """The cell loop with its recurrent weight constrained by ``kind`` (same seed for all)."""
    torch.manual_seed(0)
    model = CellLoop(hidden)
    if kind == "dtriv-twin":
        dp.orthogonal(model.recurrent)
    elif kind == "dtriv-constrain":
        dp.constrain(model.recurrent, "weight", Orthogonal(hidden))
    elif kind == "torch":
        torch_parametrizations.orthogonal(model.recurrent)
    elif kind == "geotorch":
        geotorch.orthogonal(model.recurrent, "weight")
    elif kind != "plain":
        raise ValueError(f"kind: expected a known variant, got {kind!r}")
    if kind != "plain":
        # registration leaves the generator at 0 (the map at the identity, nearly free for
        # an exponential); training moves it: every variant gets bench_orthogonal's "small"
        # parameter, |A|_1 = 1 for the generator A = L - L^T of torch's map and the twin's,
        # typical of dynamic trivialization between two refreshes
        X = _parameter(hidden, "matrix_exp", "small")
        with torch.no_grad():
            for p in model.recurrent.parameters():
                p.copy_(X)
    return model


def fwd_bwd(model: CellLoop, x: torch.Tensor, use_cached: bool) -> Callable[[], None]:
    """One forward + backward of ``sum(h_T^2)`` (inside torch's ``cached()`` if asked)."""
    params = list(model.parameters())

    def call() -> None:
        for p in params:
            p.grad = None
        if use_cached:
            with torch_parametrize.cached():
                h = model(x)
        else:
            h = model(x)
        h.square().sum().backward()

    return call


# (label, kind, torch cached(), measured at the short T when the hidden size is large)
VARIANTS = [
    ("plain RNN", "plain", False, False),
    ("dtriv orthogonal (default)", "dtriv-twin", False, False),
    ("dtriv constrain Orthogonal (default)", "dtriv-constrain", False, False),
    ("torch orthogonal + cached()", "torch", True, False),
    ("torch orthogonal", "torch", False, True),
    ("geotorch orthogonal + cached()", "geotorch", True, False),
    ("geotorch orthogonal", "geotorch", False, True),
]


def run_size(args, device, hidden: int, T: int) -> dict[str, tuple]:
    """Measure every variant at ``hidden``; returns ``{label: (timing, T, ratio_to_plain)}``.

    The uncached peers run at ``T_SHORT`` in a second ``measure`` call beside a plain RNN at
    ``T_SHORT``.
    """
    g = torch.Generator().manual_seed(1)
    xs = {t: torch.randn(t, BATCH, INPUT, generator=g).to(device) for t in {T, T_SHORT}}
    variants = [v for v in VARIANTS if geotorch is not None or v[1] != "geotorch"]
    groups = {T: {}, T_SHORT: {}}
    for label, kind, use_cached, is_slow in variants:
        t = T_SHORT if is_slow else T
        model = build(kind, hidden).to(device)
        groups[t][label] = fwd_bwd(model, xs[t], use_cached)
    if groups[T_SHORT] and T_SHORT != T:
        groups[T_SHORT]["plain RNN"] = fwd_bwd(build("plain", hidden).to(device), xs[T_SHORT],
                                               False)
    results = {}
    for t, cases in groups.items():
        if not cases:
            continue
        repeats = args.repeats or (3 if args.quick else 5 if hidden >= 400 else 7)
        warmup = args.warmup if args.warmup is not None else 1
        timings = measure(cases, repeats=repeats, warmup=warmup,
                          budget_s=args.budget or 15.0, device=device)
        for label, timing in timings.items():
            if t != T and label == "plain RNN":
                continue
            results[label] = (timing, t, ratio(timing, timings["plain RNN"]))
        if t != T:
            results["plain RNN @ short T"] = (timings["plain RNN"], t, "1.00x")
    return results


def table(results: dict[str, tuple], T: int) -> str:
    rows = []
    order = [v[0] for v in VARIANTS] + ["plain RNN @ short T"]
    for label in order:
        if label not in results:
            continue
        timing, t, r = results[label]
        if t == T:
            at_T, where = str(timing), f"{t}"
        else:
            at_T = f"~{fmt_seconds(timing.median * T / t)} (extrapolated x{T // t})"
            where = f"{t} (short)"
        rows.append([label.replace(" @ short T", ""), where, str(timing), at_T, r])
    return md_table(["variant", "T measured", "time per call", f"time at T = {T}",
                     "cost vs plain (same T)"], rows)


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[190, 512],
                   help="hidden sizes of the full run (default: 190 512)")
    args = p.parse_args(argv)
    device = setup(args)
    torch.set_flush_denormal(True)  # the same arithmetic speed for every variant (see above)
    if args.quick:
        plan = [(torch.get_num_threads(), 190, 50)]
    else:
        threads = [args.threads] if args.threads else [1, 2]
        plan = [(th, n, T_FULL) for th in threads for n in args.hidden]
    summary = []
    for threads, hidden, T in plan:
        torch.set_num_threads(threads)
        results = run_size(args, device, hidden, T)
        notes = (
            f"Cell loop `h <- modReLU(W h + U x_t)`, input {INPUT}, batch {BATCH}, hidden "
            f"{hidden}, {threads} thread(s); forward + backward of `sum(h_T^2)`; the cell reads "
            "`W` at every step. Cost = time / the plain RNN's time at the same T (lower is "
            "better; 1.00x = free)."
        )
        notes += (
            f" Uncached torch/geotorch recompute the map at each step; they are measured at "
            f"T = {T_SHORT} beside a plain RNN at T = {T_SHORT}; their T = {T} time is an "
            "extrapolation."
        )
        emit(args, f"Orthogonal RNN, hidden {hidden}, T = {T}, {threads} thread(s)",
             table(results, T), notes)
        for label in ("dtriv orthogonal (default)", "dtriv constrain Orthogonal (default)"):
            timing, _, r = results[label]
            cost = paired_ratio(timing, results["plain RNN"][0])
            met = cost <= TARGET if (T == T_FULL and not args.quick) else None
            summary.append((f"{label}, hidden {hidden}, {threads} thread(s)",
                            f"<= {TARGET}x plain RNN at T = {T_FULL}", f"{r} (T = {T})", met))
    emit_summary(args, "orthogonal RNN on the default path", summary)


if __name__ == "__main__":
    main()
