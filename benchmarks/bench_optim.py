"""One Riemannian optimizer step on the Stiefel manifold: dtriv against geoopt, side by side.

For each case the script times ``optimizer.step()`` (the gradients are set beforehand, so
no forward or backward pass is counted), interleaved in one ``measure`` call:

* ``dtriv adam`` / ``dtriv sgd``: :class:`dtriv.optim.RiemannianAdam` /
  :class:`dtriv.optim.RiemannianSGD` (momentum 0.9) on :class:`dtriv.optim.ManifoldParameter`
  s with the QR retraction (``retraction="qr"``);
* ``geoopt adam`` / ``geoopt sgd``: geoopt's ``RiemannianAdam`` / ``RiemannianSGD`` on
  ``geoopt.ManifoldParameter`` s of ``geoopt.Stiefel(canonical=False)`` (EuclideanStiefel:
  the same algorithm, QR retraction with diag(R) > 0 and transport by projection);
* ``torch adam``: :class:`torch.optim.Adam` on unconstrained tensors of the same shapes
  (the floor: what an unconstrained step costs);
* ``matmul``: one 512 x 512 product, the unit of the "matmuls" column.

Cases: one ``(512, 512)`` parameter, one ``(1024, 256)`` parameter, twenty ``(256, 256)``
parameters in one optimizer, and one ``(64, 64)`` parameter (no target: a step of a
fraction of a millisecond, where the cost per operation counts more than the products).
Ratio columns: geoopt / dtriv (above 1: dtriv is faster).

The full run also times one step on spheres (a vector of 4096 and 64 rows of 1024, the
projective and exponential retractions, against geoopt's ``Sphere`` / ``SphereExact``; no
target) and reports the constraint error ``max|X^T X - I|`` after 1,000 float32
Adam steps at ``(256, 256)`` for dtriv (QR), geoopt's EuclideanStiefel (QR) and geoopt's
default canonical Stiefel (Cayley retraction).

``--pieces`` adds, per case, the cost of each piece of one fused Adam step (the functions
of ``dtriv.optim._stiefel`` on the stacked batch, timed one after the other in each round,
medians over rounds), with the checked Cholesky QR and Householder QR for reference.

Usage::

    python benchmarks/bench_optim.py [--quick] [--pieces] [--threads 2] [--markdown results.md]
"""

from __future__ import annotations

import time
import warnings

import torch

from dtriv.manifolds import Sphere, Stiefel
from dtriv.optim import ManifoldParameter, RiemannianAdam, RiemannianSGD

from harness import (
    emit,
    emit_summary,
    matmul_case,
    md_table,
    measure,
    paired_ratio,
    parser,
    ratio,
    setup,
)

with warnings.catch_warnings():  # geoopt scripts functions with the deprecated torch.jit
    warnings.simplefilter("ignore")
    import geoopt

LR = 1e-3
MOMENTUM = 0.9
#: the side of the small square case (a step of a fraction of a millisecond, where the
#: per-operation cost of the step counts more than its products; reported, no target)
SMALL = 64


def _points(count: int, n: int, k: int, dtype, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [Stiefel(n, k).sample(generator=g, dtype=dtype).to(device) for _ in range(count)]


def _stepper(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]):
    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


def _riemannian_steppers(X0: list[torch.Tensor], grads: list[torch.Tensor], ours, theirs,
                         method: str) -> dict:
    """dtriv's and geoopt's Adam and SGD (momentum :data:`MOMENTUM`) on copies of the points
    ``X0`` (dtriv's manifold ``ours`` and retraction ``method``; geoopt's manifold
    ``theirs``), each step with the gradients ``grads`` set."""
    out = {}
    for name, make in (
        ("dtriv adam", lambda ps: RiemannianAdam(ps, lr=LR, retraction=method)),
        ("geoopt adam", lambda ps: geoopt.optim.RiemannianAdam(ps, lr=LR)),
        ("dtriv sgd", lambda ps: RiemannianSGD(ps, lr=LR, momentum=MOMENTUM,
                                               retraction=method)),
        ("geoopt sgd", lambda ps: geoopt.optim.RiemannianSGD(ps, lr=LR, momentum=MOMENTUM)),
    ):
        if name.startswith("dtriv"):
            ps = [ManifoldParameter(X.clone(), ours) for X in X0]
        else:
            ps = [geoopt.ManifoldParameter(X.clone(), manifold=theirs) for X in X0]
        out[name] = _stepper(make(ps), ps, grads)
    return out


def cases_for(count: int, n: int, k: int, device, dtype=torch.float32) -> dict:
    """The timed callables of one case (``count`` parameters of shape ``(n, k)``)."""
    X0 = _points(count, n, k, dtype, device)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, k, generator=g, dtype=dtype).to(device) for _ in range(count)]
    out = _riemannian_steppers(X0, grads, Stiefel(n, k), geoopt.Stiefel(canonical=False), "qr")
    ps = [torch.nn.Parameter(X.clone()) for X in X0]
    out["torch adam"] = _stepper(torch.optim.Adam(ps, lr=LR), ps, grads)
    out["matmul"] = matmul_case(512, dtype, device)
    return out


#: sphere cases: (shape of the parameter, dtriv retraction, geoopt manifold class name):
#: geoopt's ``Sphere`` retracts by projection, ``SphereExact`` by the exponential map
SPHERE_CASES = [((4096,), "projective", "Sphere"), ((4096,), "exp", "SphereExact"),
                ((64, 1024), "projective", "Sphere"), ((64, 1024), "exp", "SphereExact")]


def sphere_cases_for(shape: tuple[int, ...], method: str, geoopt_manifold: str, device,
                     dtype=torch.float32) -> dict:
    """The timed callables of one sphere case: one parameter of ``shape`` (unit rows)."""
    g = torch.Generator().manual_seed(0)
    X0 = Sphere(shape[-1]).sample(*shape[:-1], generator=g, dtype=dtype).to(device)
    grad = torch.randn(shape, generator=g, dtype=dtype).to(device)
    return _riemannian_steppers([X0], [grad], Sphere(shape[-1]),
                                getattr(geoopt, geoopt_manifold)(), method)


def constraint_after(steps: int, n: int, k: int, device) -> dict[str, float]:
    """``max|X^T X - I|`` after ``steps`` float32 Adam steps on a fixed quadratic loss."""
    g = torch.Generator().manual_seed(2)
    A = torch.randn(n, n, generator=g).to(device)
    A = A + A.T
    X0 = _points(1, n, k, torch.float32, device)[0]
    setups = {
        "dtriv adam (qr)": lambda: (p := ManifoldParameter(X0.clone(), Stiefel(n, k)),
                                    RiemannianAdam([p], lr=1e-2, retraction="qr")),
        "geoopt adam, EuclideanStiefel (qr)": lambda: (
            p := geoopt.ManifoldParameter(X0.clone(), manifold=geoopt.Stiefel(canonical=False)),
            geoopt.optim.RiemannianAdam([p], lr=1e-2)),
        "geoopt adam, canonical Stiefel (cayley)": lambda: (
            p := geoopt.ManifoldParameter(X0.clone(), manifold=geoopt.Stiefel()),
            geoopt.optim.RiemannianAdam([p], lr=1e-2)),
    }
    errors = {}
    eye = torch.eye(k, device=device)
    for name, make in setups.items():
        p, opt = make()
        for _ in range(steps):
            with torch.no_grad():
                p.grad = -(A @ p)
            opt.step()
        with torch.no_grad():
            errors[name] = float((p.T @ p - eye).abs().max())
    return errors


def pieces(count: int, n: int, k: int, device, rounds: int = 15) -> dict[str, float]:
    """Median seconds of each piece of one fused Adam step on ``count`` points ``(n, k)``
    (``beta1 = 0.9``, step ``-1e-3 m / |m|_F`` per point: Adam's step size with its second
    moment ``|m|_F^2``), and of one 512 x 512 product (``"matmul"``)."""
    from dtriv.optim import _stiefel as S
    from dtriv.retractions.stiefel import householder_qf, qf

    dtype = torch.float32
    X = torch.stack(_points(count, n, k, dtype, device))
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(n, k, generator=g, dtype=dtype).to(device) for _ in range(count)]
    M0 = S.riemannian_grad(X, torch.stack(grads))
    c = -LR / torch.linalg.vector_norm(M0, dim=(-2, -1), keepdim=True)
    mm = matmul_case(512, dtype, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples: dict[str, list[float]] = {}

    def tick(name, fn, *args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        samples.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    def stack_grads():
        return torch.stack(grads) if count > 1 else grads[0].unsqueeze(0)

    def norms(G, Sg):
        return bool((S.sq_norms(G) - 0.25 * S.sq_norms(Sg) >= 0).all())

    Ys = torch.empty_like(X)  # the step's scratch for Y (from its arena)
    for r in range(rounds + 2):
        Xw, m = X.clone(), M0.clone()
        tick("matmul", mm)
        G = tick("stack the gradients (a view for one parameter)", stack_grads)
        Ag = tick("X^T G (product)", S.cross, Xw, G)
        Sg = tick("2 sym(X^T G) = P + P^T", S._sym2_, Ag)
        tick("N = lerp(m, G), in place", m.lerp_, G, 0.1)
        An = tick("X^T N (product)", S.cross, Xw, m)
        Sn = tick("2 S = 2 sym(X^T N)", S._sym2_, An)
        tick("m <- N - X S (product)", m.baddbmm_, Xw, Sn, alpha=-0.5)
        tick("norm(G)^2 - norm(sym(X^T G))^2 (reductions)", norms, G, Sg)
        tick("block-QR bound (reduction)", S.safe_for_block_qr, m, c)
        tick("orthonormality probe (one pass over X)", S.near_orthonormal, Xw)
        Ys = tick("Y = X + c m (into scratch)", torch.addcmul, Xw, m, c, out=Ys)
        Y = Ys.clone()
        tick("QR: block QR of Y (series blocks), into X", S.block_cholesky_qf_, Ys, out=Xw,
             near_identity=True)
        tick("[reference] QR: checked Cholesky QR", qf, Y)
        tick("[reference] QR: Householder", householder_qf, Y)
        if r < 2:  # warm-up rounds
            samples.clear()
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pieces", action="store_true",
                   help="also time each piece of one fused Adam step")
    args = p.parse_args(argv)
    device = setup(args)
    quick = args.quick
    shapes = [(1, 512, 512)] if quick else [(1, 512, 512), (1, 1024, 256), (20, 256, 256),
                                            (1, SMALL, SMALL)]
    budget = args.budget if args.budget is not None else (2.5 if quick else 14.0)
    repeats = args.repeats if args.repeats is not None else (5 if quick else 15)
    warmup = args.warmup if args.warmup is not None else 2
    rows, summary = [], []
    for count, n, k in shapes:
        small = n == k == SMALL  # steps of a fraction of a millisecond: more rounds
        t = measure(cases_for(count, n, k, device),
                    repeats=repeats if args.repeats is not None or not small else 101,
                    warmup=warmup, budget_s=budget, device=device)
        label = f"{count} x ({n}, {k})" if count > 1 else f"({n}, {k})"
        mm = t["matmul"]
        for algo in ("adam", "sgd"):
            ours, theirs = t[f"dtriv {algo}"], t[f"geoopt {algo}"]
            rows.append([label, algo, str(ours), str(theirs), ratio(theirs, ours),
                         f"{paired_ratio(ours, mm):.1f}", f"{paired_ratio(theirs, mm):.1f}",
                         str(t["torch adam"])])
        if small:  # reported, no target
            continue
        r = paired_ratio(t["geoopt adam"], t["dtriv adam"])
        goal, need = ("≥ 3x", 3.0) if count > 1 else ("≥ 2x (step ≤ 0.5x)", 2.0)
        summary.append((f"RiemannianAdam step {label} vs geoopt", goal, f"{r:.2f}x", r >= need))
    headers = ["parameters", "optimizer", "dtriv", "geoopt", "geoopt / dtriv",
               "dtriv (matmuls)", "geoopt (matmuls)", "torch Adam (floor)"]
    emit(args, "Riemannian optimizer step on Stiefel (float32, QR retraction)",
         md_table(headers, rows),
         "One `step()` with the gradients set; dtriv `retraction=\"qr\"` against geoopt's "
         "EuclideanStiefel (the same algorithm). matmuls: the step in units of one 512 x 512 "
         f"float32 product. SGD with momentum {MOMENTUM}; lr {LR}.")
    if not quick:
        rows = []
        for shape, method, gname in SPHERE_CASES:
            t = measure(sphere_cases_for(shape, method, gname, device),
                        repeats=args.repeats or 101, warmup=warmup, budget_s=budget,
                        device=device)
            for algo in ("adam", "sgd"):
                ours, theirs = t[f"dtriv {algo}"], t[f"geoopt {algo}"]
                rows.append(["x".join(map(str, shape)), method, algo, str(ours), str(theirs),
                             ratio(theirs, ours)])
        emit(args, "Riemannian optimizer step on spheres (float32)",
             md_table(["parameter", "retraction", "optimizer", "dtriv", "geoopt",
                       "geoopt / dtriv"], rows),
             "One `step()` with the gradient set, unit rows; geoopt's `Sphere` (projective) or "
             f"`SphereExact` (exp). No target. SGD with momentum {MOMENTUM}; lr {LR}.")
    if args.pieces:
        for count, n, k in shapes:
            t = pieces(count, n, k, device)
            mm = t.pop("matmul")
            step = sum(v for name, v in t.items() if not name.startswith("["))
            rows_p = [[name, f"{1e3 * v:.3f} ms", f"{v / mm:.2f}"] for name, v in t.items()]
            rows_p.append(["sum of the step's pieces", f"{1e3 * step:.2f} ms", f"{step / mm:.2f}"])
            label = f"{count} x ({n}, {k})" if count > 1 else f"({n}, {k})"
            emit(args, f"Pieces of one fused RiemannianAdam step, {label}",
                 md_table(["piece", "time", "matmuls"], rows_p),
                 "Each piece timed alone (medians over rounds); matmuls: in units of one "
                 "512 x 512 float32 product. The block QR runs when the point is the "
                 "optimizer's own, passes the probe and the step passes the bound; else the "
                 "checked QR. This step is small (c |V|_F about 1e-3): its blocks take the "
                 "series of the inverse Cholesky factor, at the series' widths.")
    if not quick:
        errors = constraint_after(1000, 256, 256, device)
        emit(args, "Constraint error after 1,000 float32 Adam steps, Stiefel (256, 256)",
             md_table(["optimizer", "max abs(X^T X - I)"],
                      [[name, f"{e:.2e}"] for name, e in errors.items()]))
        e = errors["dtriv adam (qr)"]
        summary.append(("constraint error after 1,000 float32 steps (256, 256)",
                        "rounding level (≤ 1e-5)", f"{e:.1e}", e <= 1e-5))
    emit_summary(args, "Riemannian optimizers", summary)


if __name__ == "__main__":
    main()
