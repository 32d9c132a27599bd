"""Cost of one optimizer step on the Stiefel manifold, side by side.

For each shape ``(n, k)`` it times ``optimizer.step()`` (gradients set beforehand, so
neither the forward nor the backward of a model is counted) for

* ``adam``: :class:`torch.optim.Adam` on an unconstrained ``n x k`` tensor (the reference);
* ``wrapper K=1`` / ``wrapper K=100``: :class:`dtriv.optim.DynamicTrivialization` around
  Adam on a tensor constrained by :func:`dtriv.parametrize.constrain`; the refresh every
  ``K`` steps is amortised over the timed steps;
* ``dtriv radam``: :class:`dtriv.optim.RiemannianAdam` on a
  :class:`dtriv.optim.ManifoldParameter` (default retraction of the manifold, and ``qr``);
* ``geoopt radam``: :class:`geoopt.optim.RiemannianAdam` on geoopt's Euclidean Stiefel
  (QR retraction, projection transport: the same algorithm as ``dtriv radam (qr)``) and on
  its default canonical Stiefel (Cayley retraction and transport), when geoopt is installed;

and ``map fwd``, one forward of the trivialization (``module.weight``), which every
training step of a trivialized model pays anyway. Ratios: each row over ``adam``; for the
wrapper also over ``adam + fwd/K``, the cost model of a step plus the amortised refresh
(the K = 100 run is extended to 200 steps so that its refreshes are timed). Targets:
``dtriv radam (qr)`` no slower than geoopt's, ``wrapper K=100`` within 1.2x of
``adam + map fwd``.

Usage::

    python benchmarks/bench_optim.py --shapes 512x512 1024x256 --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from dtriv.manifolds import Stiefel
from dtriv.optim import DynamicTrivialization, ManifoldParameter, RiemannianAdam
from dtriv.parametrize import constrain


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


class _Holder(nn.Module):
    def __init__(self, X: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(X.clone())


def _stepper(opt: torch.optim.Optimizer, params: list[torch.Tensor], scale: float = 1e-3):
    grads = [scale * torch.randn_like(p) for p in params]

    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


def bench_shape(n: int, k: int, args, device: torch.device, dtype: torch.dtype) -> list[tuple]:
    manifold = Stiefel(n, k)
    g = torch.Generator().manual_seed(0)
    X0 = manifold.sample(generator=g, dtype=dtype).to(device)
    rows: list[tuple[str, float]] = []

    def run(name: str, make: Callable[[], tuple], steps: int | None = None) -> None:
        opt, params = make()
        seconds = _time(_stepper(opt, params), steps or args.steps, args.warmup, device)
        rows.append((name, seconds))

    free = nn.Parameter(torch.randn(n, k, generator=g, dtype=dtype).to(device))
    run("adam", lambda: (torch.optim.Adam([free], lr=1e-3), [free]))

    holder = _Holder(X0)
    constrain(holder, "weight", manifold)
    X = holder.parametrizations.weight.original
    with torch.no_grad():
        map_fwd = _time(lambda: holder.weight, args.steps, args.warmup, device)
    for K in (1, 100):
        steps = max(args.steps, 2 * K) if K > 1 and args.amortise else args.steps
        run(f"wrapper K={K}",
            lambda K=K: (DynamicTrivialization(torch.optim.Adam([X], lr=1e-3), K=K,
                                               modules=holder), [X]),
            steps)

    def radam(method: str | None):
        p = ManifoldParameter(X0.clone(), manifold)
        return RiemannianAdam([p], lr=1e-3, retraction=method), [p]

    run(f"dtriv radam ({manifold.default_retraction})", lambda: radam(None))
    if "qr" in manifold.retractions and manifold.default_retraction != "qr":
        run("dtriv radam (qr)", lambda: radam("qr"))
    try:
        import geoopt
    except ImportError:
        geoopt = None
    if geoopt is not None:
        for label, canonical in (("geoopt radam (euclidean, qr)", False),
                                 ("geoopt radam (canonical, cayley)", True)):
            def make(canonical=canonical):
                p = geoopt.ManifoldParameter(X0.clone(),
                                             manifold=geoopt.Stiefel(canonical=canonical))
                return geoopt.optim.RiemannianAdam([p], lr=1e-3), [p]
            run(label, make)
    rows.insert(1, ("map fwd (one forward)", map_fwd))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["512x512", "1024x256"],
                        help="Stiefel shapes n x k (default: 512x512 1024x256)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (default 3)")
    parser.add_argument("--no-amortise", dest="amortise", action="store_false",
                        help="do not extend the K=100 run to 2K steps (quick smoke runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, device {device}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}, {args.steps} timed steps")
    for shape in args.shapes:
        n, k = (int(s) for s in shape.lower().split("x"))
        rows = bench_shape(n, k, args, device, dtype)
        times = dict(rows)
        adam, fwd = times["adam"], times["map fwd (one forward)"]
        print(f"\nStiefel({n}, {k})")
        print(f"{'method':36s} {'ms/step':>10s} {'x adam':>9s} {'x (adam + fwd/K)':>17s}")
        for name, seconds in rows:
            model = ""
            if name.startswith("wrapper K="):
                K = int(name.split("=")[1])
                model = f"{seconds / (adam + fwd / K):17.2f}"
            print(f"{name:36s} {1e3 * seconds:10.3f} {seconds / adam:9.2f} {model}")
        geo = times.get("geoopt radam (euclidean, qr)")
        ours = times.get("dtriv radam (qr)")
        if geo is not None and ours is not None:
            print(f"dtriv radam (qr) / geoopt radam (euclidean, qr): {ours / geo:.2f} "
                  "(target <= 1)")
        w100 = times["wrapper K=100"]
        print(f"wrapper K=100 / (adam + one map forward): {w100 / (adam + fwd):.2f} "
              f"(target <= 1.2); / (adam + map forward / 100): {w100 / (adam + fwd / 100):.2f}")

if __name__ == "__main__":
    main()
