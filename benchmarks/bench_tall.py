"""Tall orthogonal weights: dtriv against torch's ``orthogonal``, and how dtriv scales in n.

Three tables, forward + backward of ``(W**2 * C).sum()`` through the parametrization:

1. **(n, k) against torch.** ``dtriv.parametrize.orthogonal`` (the twin) and
   ``torch.nn.utils.parametrizations.orthogonal`` with the same ``orthogonal_map``, with and
   without ``use_trivialization``. torch embeds the weight in an ``n x n`` matrix (an
   ``n x n`` exponential or solve, or a Householder backward that forms ``n x n``
   matrices); dtriv uses the ``O(n k^2)`` Stiefel maps. torch's ``matrix_exp`` costs minutes
   at n = 4096, so it is timed at ``--torch-expm-n`` rows (default 1024) unless raised.
2. **Scaling in n at fixed k.** dtriv's maps for n = 1k ... 64k (k = 64): the twins
   without a base, and ``dtriv.parametrize.constrain(..., Stiefel(n, k), retraction)``
   with its base of shape (n, k); the log-log slope of time against n (least squares over
   the sizes; 1 is linear).
3. **Peak memory** of one forward + backward at each n, measured in a child process whose
   allocations are all ``mmap``-ed (``MALLOC_MMAP_THRESHOLD_``), so that the peak resident
   set (reset through ``/proc/self/clear_refs``) is the peak of live tensors; reported in
   units of one ``n x k`` weight. Constant across n means ``O(n k)`` memory. (Linux only;
   the twin with ``use_trivialization=True`` keeps torch's ``n x n`` base by design and is
   not in this table.)

Example::

    python benchmarks/bench_tall.py --quick
    python benchmarks/bench_tall.py --torch-expm-n 4096     # adds about 3 minutes
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations as torch_param

from dtriv.manifolds import Stiefel
from dtriv.parametrize import constrain, twins
from dtriv.retractions import _scratch

import harness

MAPS = ("matrix_exp", "cayley", "householder")
# dtriv's Stiefel retractions timed through constrain (the base is (n, k))
STIEFEL = ("cayley", "exp_canonical", "qr", "polar")


class Holder(nn.Module):
    def __init__(self, n: int, k: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, k, dtype=dtype, device=device))
        nn.init.orthogonal_(self.weight)


def _warmup(args) -> int:
    """``--warmup``, 1 round by default (0 is a valid choice, not the default)."""
    return 1 if args.warmup is None else args.warmup


@torch.no_grad()
def _perturb_(module: nn.Module, scale: float, seed: int) -> None:
    """The same small parameter in every implementation (the identity is trivially cheap).

    Householder keeps its diagonal (the signs of the reflectors).
    """
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        P = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
        P *= scale / math.sqrt(max(p.shape))
        if getattr(module, "_keep_diagonal", False):
            P.diagonal().copy_(p.diagonal())
        p.copy_(P)


def twin(impl: str, orthogonal_map: str, triv: bool, n: int, k: int,
         dtype: torch.dtype, device: torch.device) -> nn.Module:
    m = Holder(n, k, dtype, device)
    register = twins.orthogonal if impl == "dtriv" else torch_param.orthogonal
    register(m, orthogonal_map=orthogonal_map, use_trivialization=triv)
    m._keep_diagonal = orthogonal_map == "householder"
    _perturb_(m, 1.0, 0)
    return m


def constrained(retraction: str, n: int, k: int, dtype: torch.dtype,
                device: torch.device) -> nn.Module:
    m = Holder(n, k, dtype, device)
    constrain(m, "weight", Stiefel(n, k), retraction)
    _perturb_(m, 1.0, 0)
    return m


def fwd_bwd(module: nn.Module) -> Callable[[], None]:
    C = torch.randn_like(module.weight.detach())
    params = list(module.parameters())

    def run() -> None:
        for p in params:
            p.grad = None
        (module.weight.square() * C).sum().backward()

    return run


def slope(ns: list[int], ts: list[float]) -> float:
    """Least-squares slope of log t against log n."""
    x = [math.log(n) for n in ns]
    y = [math.log(t) for t in ts]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


# --------------------------------------------------------------------------- tables
def table_vs_torch(args, device) -> dict[str, float]:
    """The comparison table; returns ``{"map triv": torch / dtriv}``."""
    n, k = args.shape
    rows = []
    ratios: dict[str, float] = {}
    for orthogonal_map in MAPS:
        for triv in (False, True):
            cases = {"dtriv": fwd_bwd(twin("dtriv", orthogonal_map, triv, n, k,
                                           torch.float32, device))}
            torch_n = n if orthogonal_map != "matrix_exp" else min(n, args.torch_expm_n)
            torch_note = ""
            if torch_n == n:
                cases["torch"] = fwd_bwd(twin("torch", orthogonal_map, triv, n, k,
                                              torch.float32, device))
            # torch's calls take seconds at 4096 rows: two timed rounds after the warmup
            t = harness.measure(cases, repeats=args.repeats or 5, warmup=_warmup(args),
                                budget_s=args.budget or 6.0, device=device, min_repeats=2)
            if torch_n != n:  # torch at fewer rows, dtriv at those rows beside it
                small = {"dtriv": fwd_bwd(twin("dtriv", orthogonal_map, triv, torch_n, k,
                                               torch.float32, device)),
                         "torch": fwd_bwd(twin("torch", orthogonal_map, triv, torch_n, k,
                                               torch.float32, device))}
                ts = harness.measure(small, repeats=3, warmup=1, budget_s=10.0,
                                     device=device)
                t["torch"] = ts["torch"]
                torch_note = f" (torch at {torch_n}x{k}; dtriv there: {ts['dtriv']})"
                t["ratio_at"] = ts["dtriv"]
            ref = t.get("ratio_at", t["dtriv"])
            if torch_n == n:
                ratios[f"{orthogonal_map} triv={triv}"] = harness.paired_ratio(t["torch"], ref)
            rows.append([orthogonal_map, str(triv), str(t["dtriv"]),
                         str(t["torch"]) + torch_note, harness.ratio(t["torch"], ref)])
            print(rows[-1], flush=True)
    harness.emit(
        args, f"Tall {n}x{k}: dtriv's orthogonal twin against torch's (float32, fwd+bwd)",
        harness.md_table(["map", "use_trivialization", "dtriv", "torch", "torch / dtriv"],
                         rows),
        "torch embeds the weight in an n x n matrix; dtriv uses O(n k^2) Stiefel maps. "
        "Where torch is timed at fewer rows, the ratio is taken against dtriv at those rows.",
    )
    return ratios


def scaling_cases(n: int, k: int, device) -> dict[str, Callable[[], None]]:
    cases = {}
    for orthogonal_map in MAPS:
        cases[f"twin {orthogonal_map}"] = fwd_bwd(
            twin("dtriv", orthogonal_map, False, n, k, torch.float32, device))
    for retraction in STIEFEL:
        cases[f"Stiefel {retraction}"] = fwd_bwd(
            constrained(retraction, n, k, torch.float32, device))
    return cases


def table_scaling(args, device) -> dict[str, float]:
    """The scaling table; returns ``{map: log-log slope}``."""
    k = args.k
    names: list[str] = []
    per_n: dict[int, dict[str, harness.Timing]] = {}
    for n in args.ns:
        cases = scaling_cases(n, k, device)
        names = list(cases)
        per_n[n] = harness.measure(cases, repeats=args.repeats or 5, warmup=_warmup(args),
                                   budget_s=args.budget or 3.0, device=device)
        print(n, {name: str(t) for name, t in per_n[n].items()}, flush=True)
    rows = []
    slopes, large = {}, {}
    top = [n for n in args.ns if n >= max(args.ns) // 4]  # the largest sizes (a factor 4)
    for name in names:
        slopes[name] = slope(args.ns, [per_n[n][name].median for n in args.ns])
        large[name] = slope(top, [per_n[n][name].median for n in top]) if len(top) > 1 else (
            float("nan"))
        rows.append([name] + [str(per_n[n][name]) for n in args.ns]
                    + [f"{slopes[name]:.2f}", f"{large[name]:.2f}"])
    harness.emit(
        args, f"Scaling in n at k = {k} (float32, fwd+bwd)",
        harness.md_table(["map"] + [f"n = {n}" for n in args.ns]
                         + ["log-log slope", f"slope, n >= {min(top)}"], rows),
        "Slope of log(time) against log(n), least squares over all the sizes (1 = linear; "
        "the target's measure), and over the largest sizes alone: the fixed costs flatten the "
        "small sizes, and the working set leaves the caches at the large ones.",
    )
    return slopes, large, min(top)


# --------------------------------------------------------------------------- memory
def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return 1024 * int(m.group(1))


def _peak_extra_bytes(fn: Callable[[], None]) -> int:
    """Peak resident bytes above the current level while ``fn`` runs (Linux). The scratch
    buffers that dtriv keeps between calls (:mod:`dtriv.retractions._scratch`) are freed
    first, so that those the call uses count in its peak: they are memory it holds."""
    _scratch.clear()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def memory_child(ns: list[int], k: int) -> None:
    """In the child: peak bytes of each case at each n, as JSON on stdout."""
    torch.set_num_threads(1)
    out: dict[str, dict[int, float]] = {}
    for n in ns:
        for name, run in scaling_cases(n, k, torch.device("cpu")).items():
            run()  # first call: lazy initialisation outside the measurement
            # median of three: the baseline of one call can include memory that call frees
            # (what the previous call left for the next one), which reads as a lower peak
            peak = statistics.median(_peak_extra_bytes(run) for _ in range(3))
            out.setdefault(name, {})[n] = peak / (n * k * 4)
    print(json.dumps(out))


def table_memory(args) -> dict[str, tuple[float, float]]:
    """The peak-memory table; returns ``{map: (slope, growth)}``: the least-squares slope of
    log(peak bytes) against log(n) (1 means O(n k), as for time) and the per-weight peak at
    the largest n over that at the smallest."""
    if not os.path.exists("/proc/self/clear_refs"):
        print("peak memory: skipped (needs Linux /proc/self/clear_refs)")
        return {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TOP_PAD_="0")
    cmd = [sys.executable, __file__, "--memory-child", "--k", str(args.k),
           "--ns", *map(str, args.ns)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        raise SystemExit("peak memory: the child process failed")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [[name] + [f"{data[name][str(n)]:.1f}" for n in args.ns] for name in data]
    harness.emit(
        args, f"Peak memory of one fwd+bwd, in units of one n x {args.k} float32 weight",
        harness.md_table(["map"] + [f"n = {n}" for n in args.ns], rows),
        "Measured as the peak resident set above the level before the call, all "
        "allocations mmap-ed; constant across n means O(n k) memory.",
    )
    lo, hi = str(min(args.ns)), str(max(args.ns))
    return {name: (slope(args.ns, [data[name][str(n)] * n for n in args.ns]),
                   data[name][hi] / data[name][lo]) for name in data}


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__.splitlines()[0])
    p.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split("x")),
                   default=None, help="NxK of the torch comparison (default 4096x64)")
    p.add_argument("--torch-expm-n", type=int, default=None,
                   help="largest n for torch's matrix_exp (default 1024; 4096 takes minutes)")
    p.add_argument("--ns", type=int, nargs="+", default=None, help="n of the scaling table")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--memory-child", action="store_true", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.ns, args.k)
        return
    device = harness.setup(args)
    if args.quick:
        args.shape = args.shape or (512, 64)
        args.ns = args.ns or [1024, 8192]
        args.torch_expm_n = args.torch_expm_n or 512
        args.repeats = args.repeats or 3
        args.budget = args.budget or 1.0
    else:
        args.shape = args.shape or (4096, 64)
        args.ns = args.ns or [1024, 2048, 4096, 8192, 16384, 32768, 65536]
        args.torch_expm_n = args.torch_expm_n or 1024
    ratios = table_vs_torch(args, device)
    slopes, large, top = table_scaling(args, device)
    growth = table_memory(args) if device.type == "cpu" else {}
    n, k = args.shape
    worst = min(ratios, key=ratios.get)
    steep = max(slopes, key=slopes.get)
    rows = [
        (f"tall {n}x{k}: every map vs torch's orthogonal (same map)", ">= 10x",
         f"min {ratios[worst]:,.0f}x ({worst}; torch's matrix_exp at {n} rows only with "
         f"--torch-expm-n {n})" if ratios else "-",
         ratios[worst] >= 10 if ratios and (n, k) == (4096, 64) else None),
        (f"time linear in n at k = {k}, n = {min(args.ns)}..{max(args.ns)}",
         "log-log slope <= 1.1",
         f"max {slopes[steep]:.2f} ({steep}); over n >= {top} alone: max "
         f"{max(large.values()):.2f} ({max(large, key=large.get)})",
         slopes[steep] <= 1.1 if max(args.ns) >= 64 * min(args.ns) else None),
    ]
    if growth:
        big = max(growth, key=lambda name: growth[name][0])
        most = max(g for _, g in growth.values())
        rows.append((f"peak memory O(n k), n = {min(args.ns)}..{max(args.ns)}",
                     "log-log slope of the peak <= 1.1 (as for time)",
                     f"max {growth[big][0]:.2f} ({big}); per-weight peak at the largest n over "
                     f"the smallest: at most {most:.2f}",
                     growth[big][0] <= 1.1 if max(args.ns) >= 64 * min(args.ns) else None))
    harness.emit_summary(args, "tall weights", rows)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
