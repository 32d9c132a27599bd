"""RiemannianSGD / RiemannianAdam: against geoopt, against torch on Euclidean parameters,
against explicit formulas, batching of equal manifolds, state dicts and argument checks."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from dtriv.manifolds import Sphere, Stiefel
from dtriv.optim import ManifoldParameter, RiemannianAdam, RiemannianSGD

with warnings.catch_warnings():  # geoopt scripts functions with the deprecated torch.jit
    warnings.simplefilter("ignore", DeprecationWarning)
    import geoopt

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(shape, seed=0):
    """A loss with a non-tangent Euclidean gradient: -tr(X^T A X) - <C, X> (batched)."""
    g = _gen(seed)
    n = shape[-2] if len(shape) >= 2 else shape[-1]
    A = torch.randn(n, n, generator=g, dtype=DT)
    A = (A + A.T) / 2
    C = torch.randn(*shape, generator=g, dtype=DT)

    def loss(X):
        if X.ndim >= 2 and len(shape) >= 2:
            quad = (X * (A @ X)).sum()
        else:
            quad = (X * (X @ A)).sum()
        return -quad - (C * X).sum()

    return loss


def _run(param, opt, loss, steps, hook=None):
    for _ in range(steps):
        opt.zero_grad()
        loss(param).backward()
        if hook is not None:
            param.grad = hook(param.detach(), param.grad)
        opt.step()
    return param.detach().clone()


CASES = [
    # (dtriv manifold, geoopt manifold, dtriv retraction, shape). geoopt's Sphere and
    # EuclideanStiefel retract by projection (normalisation; QR with diag(R) > 0) and
    # transport by projection; their "Exact" variants use the exponential maps (the sphere's
    # great circles, the Edelman-Arias-Smith geodesic of the embedded metric). geoopt's
    # default CanonicalStiefel has another metric (its Riemannian gradient differs), so no
    # dtriv configuration follows it.
    (Sphere(7), geoopt.Sphere(), "projective", (7,)),
    (Sphere(7), geoopt.Sphere(), "projective", (3, 7)),
    (Stiefel(8, 3), geoopt.Stiefel(canonical=False), "qr", (8, 3)),
    (Stiefel(8, 3), geoopt.Stiefel(canonical=False), "qr", (2, 8, 3)),
]
EXACT = [
    (Sphere(7), geoopt.SphereExact(), "exp", (7,)),
    (Stiefel(8, 3), geoopt.EuclideanStiefelExact(), "exp", (8, 3)),
]
ALGOS = [
    ("sgd", dict(lr=0.02)),
    ("sgd", dict(lr=0.02, weight_decay=0.1)),
    # geoopt seeds the momentum buffer with the Euclidean gradient and then applies the
    # momentum update at once: with tangent gradients and dampening = momentum this is
    # torch's convention (buffer = first gradient), which dtriv follows.
    ("sgd_tangent", dict(lr=0.02, momentum=0.6, dampening=0.6)),
    ("adam", dict(lr=0.02)),
    ("adam", dict(lr=0.02, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True)),
]
COMBOS = [case + algo for case in CASES for algo in ALGOS] + [
    case + algo for case in EXACT for algo in (ALGOS[2], ALGOS[4])
]


@pytest.mark.parametrize("manifold,gmanifold,method,shape,algo,kwargs", COMBOS,
                         ids=lambda c: repr(c))
def test_matches_geoopt_for_100_steps(manifold, gmanifold, method, shape, algo, kwargs):
    X0 = manifold.sample(*shape[: len(shape) - len(manifold.shape)], generator=_gen(1), dtype=DT)
    ours = ManifoldParameter(X0.clone(), manifold)
    theirs = geoopt.ManifoldParameter(X0.clone(), manifold=gmanifold)
    loss = _problem(shape, seed=2)
    hook = None
    if algo.startswith("sgd"):
        o1 = RiemannianSGD([ours], retraction=method, **kwargs)
        o2 = geoopt.optim.RiemannianSGD([theirs], **kwargs)
        if algo == "sgd_tangent":
            def hook(X, G):
                return manifold.proj_tangent(X, G)
    else:
        o1 = RiemannianAdam([ours], retraction=method, **kwargs)
        o2 = geoopt.optim.RiemannianAdam([theirs], **kwargs)
    a = _run(ours, o1, loss, 100, hook)
    b = _run(theirs, o2, loss, 100, hook)
    assert (a - X0).abs().max() > 1e-2  # it moved
    err = (a - b).abs().max().item()
    assert err < 1e-9, err  # measured: <= 2e-15 after 100 steps
    # exponential maps do not re-orthonormalize: rounding accumulates slowly (both libraries)
    assert manifold.distance(a).max() < 1e-11


def test_sgd_nesterov_matches_explicit_formula():
    """Explicit RSGD with nesterov momentum, dampening and weight decay, step by step."""
    M = Stiefel(9, 4)
    X = M.sample(generator=_gen(3), dtype=DT)
    loss = _problem((9, 4), seed=4)
    p = ManifoldParameter(X.clone(), M)
    lr, mom, wd = 0.03, 0.7, 0.01
    opt = RiemannianSGD([p], lr=lr, momentum=mom, weight_decay=wd, nesterov=True,
                        retraction="polar")
    buf = None
    for _ in range(25):
        Xr = X.clone().requires_grad_(True)
        G = torch.autograd.grad(loss(Xr), Xr)[0]
        g = M.proj_tangent(X, G + wd * X)
        buf = g.clone() if buf is None else mom * buf + g
        d = g + mom * buf
        X_new = M.retract(X, -lr * d, "polar")
        buf = M.transport(X, X_new, buf)
        X = X_new
        opt.zero_grad()
        loss(p).backward()
        opt.step()
    torch.testing.assert_close(p.detach(), X, rtol=0, atol=1e-12)


def test_sgd_dampening_matches_explicit_formula():
    M = Sphere(6)
    x = M.sample(generator=_gen(5), dtype=DT)
    loss = _problem((6,), seed=6)
    p = ManifoldParameter(x.clone(), M)
    lr, mom, damp = 0.05, 0.9, 0.3
    opt = RiemannianSGD([p], lr=lr, momentum=mom, dampening=damp)
    buf = None
    for _ in range(25):
        xr = x.clone().requires_grad_(True)
        g = M.proj_tangent(x, torch.autograd.grad(loss(xr), xr)[0])
        buf = g.clone() if buf is None else mom * buf + (1 - damp) * g
        x_new = M.retract(x, -lr * buf)  # default retraction of the sphere
        buf = M.transport(x, x_new, buf)
        x = x_new
        opt.zero_grad()
        loss(p).backward()
        opt.step()
    torch.testing.assert_close(p.detach(), x, rtol=0, atol=1e-12)


def _euclidean_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()


@pytest.mark.parametrize(
    "ours,theirs,kwargs",
    [
        (RiemannianSGD, torch.optim.SGD, dict(lr=0.1)),
        (RiemannianSGD, torch.optim.SGD,
         dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
        (RiemannianSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.2)),
        (RiemannianAdam, torch.optim.Adam, dict(lr=0.01)),
        (RiemannianAdam, torch.optim.Adam,
         dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.1, amsgrad=True)),
    ],
)
def test_euclidean_parameters_get_the_torch_update_bit_for_bit(ours, theirs, kwargs):
    m1, m2 = _euclidean_model(), _euclidean_model()
    # a manifold parameter in the same group must not disturb the Euclidean ones
    sphere = ManifoldParameter(Sphere(4).sample(generator=_gen(0), dtype=DT), Sphere(4))
    o1 = ours([*m1.parameters(), sphere], **kwargs)
    o2 = theirs(m2.parameters(), **kwargs)
    x = torch.randn(16, 5, generator=_gen(1), dtype=DT)
    y = torch.randn(16, 2, generator=_gen(2), dtype=DT)
    for _ in range(20):
        for m, o, extra in ((m1, o1, sphere), (m2, o2, None)):
            o.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            if extra is not None:
                loss = loss + extra.sum()
            loss.backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(o1.state_dict()["state"].values(), o2.state_dict()["state"].values()):
        for key in b:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


class CountingStiefel(Stiefel):
    calls = 0

    def retract(self, B, V, method=None):
        CountingStiefel.calls += 1
        return super().retract(B, V, method)


@pytest.mark.parametrize("algo", [RiemannianSGD, RiemannianAdam])
def test_equal_manifolds_are_updated_in_one_batched_call(algo):
    M = CountingStiefel(8, 3)
    starts = [M.sample(generator=_gen(10 + i), dtype=DT) for i in range(3)]
    losses = [_problem((8, 3), seed=20 + i) for i in range(3)]
    together = [ManifoldParameter(X.clone(), M) for X in starts]
    alone = [ManifoldParameter(X.clone(), Stiefel(8, 3)) for X in starts]
    kw = dict(lr=0.02, momentum=0.5) if algo is RiemannianSGD else dict(lr=0.02)
    o_together = algo(together, **kw)
    o_alone = [algo([p], **kw) for p in alone]
    CountingStiefel.calls = 0
    for _ in range(15):
        o_together.zero_grad()
        sum(f(p) for f, p in zip(losses, together)).backward()
        o_together.step()
        for f, p, o in zip(losses, alone, o_alone):
            o.zero_grad()
            f(p).backward()
            o.step()
    assert CountingStiefel.calls == 15  # one retraction per step for the three parameters
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-12)


def test_retraction_per_group_and_per_manifold_class():
    S, P = Stiefel(7, 2), Sphere(5)
    X = S.sample(generator=_gen(0), dtype=DT)
    x = P.sample(generator=_gen(1), dtype=DT)
    p1, p2 = ManifoldParameter(X.clone(), S), ManifoldParameter(x.clone(), P)
    opt = RiemannianSGD(
        [{"params": [p1], "retraction": "exp"},
         {"params": [p2], "retraction": {"Sphere": "exp"}}],
        lr=0.1,
    )
    f1, f2 = _problem((7, 2), seed=3), _problem((5,), seed=4)
    opt.zero_grad()
    (f1(p1) + f2(p2)).backward()
    G1, G2 = p1.grad.clone(), p2.grad.clone()
    opt.step()
    torch.testing.assert_close(p1.detach(), S.retract(X, -0.1 * S.proj_tangent(X, G1), "exp"),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(p2.detach(), P.retract(x, -0.1 * P.proj_tangent(x, G2), "exp"),
                               rtol=0, atol=1e-14)
    assert not torch.allclose(
        S.retract(X, -0.1 * S.proj_tangent(X, G1), "exp"),
        S.retract(X, -0.1 * S.proj_tangent(X, G1), "qr"), rtol=0, atol=1e-8)


def _reference_and_interrupted(M, seed, make, total, first):
    """On ``M`` from a sample of ``seed``: a parameter stepped ``total`` times by the
    optimizer ``make([p])`` builds, and another stopped after ``first`` steps with its
    optimizer, for a resume to continue; and the loss."""
    X0 = M.sample(generator=_gen(seed), dtype=DT)
    f = _problem(tuple(M.shape), seed=seed + 1)
    ref = ManifoldParameter(X0.clone(), M)
    _run(ref, make([ref]), f, total)
    p = ManifoldParameter(X0.clone(), M)
    o = make([p])
    _run(p, o, f, first)
    return ref, p, o, f


def test_state_dict_resume_is_bit_for_bit():
    M = Stiefel(6, 2)
    ref, p, o, f = _reference_and_interrupted(
        M, 7, lambda ps: RiemannianAdam(ps, lr=0.05, amsgrad=True), 30, 12)
    saved_p, saved_o = p.detach().clone(), o.state_dict()
    q = ManifoldParameter(saved_p, M)
    o2 = RiemannianAdam([q], lr=0.05, amsgrad=True)
    o2.load_state_dict(saved_o)
    _run(q, o2, f, 18)
    assert torch.equal(q.detach(), ref.detach())


def test_a_class_keyed_retraction_mapping_is_saved_for_weights_only_loading():
    """A group's ``retraction`` mapping keyed by manifold classes (a class key over its
    name's) is stored with class names: the state dict loads with ``torch.load``'s default
    ``weights_only=True`` and the resumed run equals the uninterrupted one bit for bit."""
    import io

    M = Stiefel(6, 3)
    spec = {"Stiefel": "cayley", Stiefel: "qr", Sphere: "projective"}
    ref, p, o, f = _reference_and_interrupted(
        M, 3, lambda ps: RiemannianAdam(ps, lr=0.05, retraction=spec), 10, 4)
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only=True
    assert saved["param_groups"][0]["retraction"] == {"Stiefel": "qr", "Sphere": "projective"}
    assert o.param_groups[0]["retraction"] is spec  # the live group keeps its classes
    q = ManifoldParameter(p.detach().clone(), M)
    o2 = RiemannianAdam([q], lr=0.05)
    o2.load_state_dict(saved)
    _run(q, o2, f, 6)
    assert torch.equal(q.detach(), ref.detach())


@pytest.mark.parametrize("count", [1, 2])
def test_a_state_saved_by_torchs_adam_is_refused_before_loading(count):
    """torch's Adam keeps one second moment per entry, RiemannianAdam one per point: loading
    the former raises a ValueError naming the entry and its expected shape (it was accepted,
    then ``step`` failed in a reshape), and leaves the optimizer's own state as it was."""
    M = Stiefel(6, 3)
    ps = [ManifoldParameter(M.sample(generator=_gen(i), dtype=DT), M) for i in range(count)]
    f = _problem((6, 3), seed=2)
    plain = torch.optim.Adam(ps, lr=0.01)
    opt = RiemannianAdam(ps, lr=0.01)
    for o in (plain, opt):
        o.zero_grad()
        sum(f(p) for p in ps).backward()
        o.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"^state_dict: expected state\[0\]\['exp_avg_sq'\] "
                                         r"of shape \(1, 1\) .* got \(6, 3\)"):
        opt.load_state_dict(plain.state_dict())
    after = opt.state_dict()
    for i in range(count):
        for key, value in before["state"][i].items():
            assert torch.equal(after["state"][i][key], value), key


def test_bad_arguments_name_the_argument():
    p = ManifoldParameter(Sphere(3).sample(generator=_gen(0)), Sphere(3))
    with pytest.raises(ValueError, match=r"lr: expected a non-negative .*got -0.1"):
        RiemannianSGD([p], lr=-0.1)
    with pytest.raises(ValueError, match=r"lr: expected a non-negative .*got -1"):
        RiemannianAdam([p], lr=-1)
    with pytest.raises(ValueError, match=r"momentum: expected a non-negative"):
        RiemannianSGD([p], lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError, match=r"nesterov: expected momentum > 0 and dampening = 0"):
        RiemannianSGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\]: expected a number in \[0, 1\), got 1.0"):
        RiemannianAdam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"retraction: expected one of exp, projective .*'qr'"):
        RiemannianSGD([p], lr=0.1, retraction="qr")
    g = geoopt.ManifoldParameter(torch.tensor([1.0, 0.0, 0.0]), manifold=geoopt.Sphere())
    with pytest.raises(ValueError, match=r"params: expected plain tensors or dtriv"):
        RiemannianAdam([g])


@pytest.mark.parametrize("algo,values,match", [
    (RiemannianSGD, dict(lr=-1.0), r"^lr: expected a non-negative .*got -1.0"),
    (RiemannianSGD, dict(momentum=-1.0), r"^momentum: expected a non-negative"),
    (RiemannianSGD, dict(momentum=0.9, dampening=-1.0), r"^dampening: expected a non-neg"),
    (RiemannianSGD, dict(momentum=0.9, dampening=1.5),
     r"^dampening: expected a number in \[0, 1\], got 1.5"),
    (RiemannianSGD, dict(nesterov=True), r"^nesterov: expected momentum > 0"),
    (RiemannianSGD, dict(weight_decay=math.inf), r"^weight_decay: expected a non-negative"),
    (RiemannianAdam, dict(lr=-1.0), r"^lr: expected a non-negative"),
    (RiemannianAdam, dict(betas=(1.5, 0.9)), r"^betas\[0\]: expected a number in \[0, 1\)"),
    (RiemannianAdam, dict(betas=0.9), r"^betas: expected a pair"),
    (RiemannianAdam, dict(eps=-1e-8), r"^eps: expected a non-negative"),
])
@pytest.mark.parametrize("where", ["constructor", "group", "add_param_group"])
def test_hyperparameters_are_checked_wherever_they_are_given(algo, values, match, where):
    """A value out of range raises the same ``ValueError``, naming it, whether it is a
    constructor argument, a group's own value or that of a group added later (torch checks
    only the constructor's), and the optimizer keeps no group that failed the check."""
    p = ManifoldParameter(Sphere(3).sample(generator=_gen(0)), Sphere(3))
    q = ManifoldParameter(Sphere(3).sample(generator=_gen(1)), Sphere(3))
    with pytest.raises(ValueError, match=match):
        if where == "constructor":
            algo([p], **values)
        elif where == "group":
            algo([{"params": [p], **values}])
        else:
            opt = algo([p])
            try:
                opt.add_param_group({"params": [q], **values})
            finally:
                assert len(opt.param_groups) == 1


@pytest.mark.parametrize("algo,key", [(RiemannianSGD, "momentum_buffer"),
                                      (RiemannianAdam, "exp_avg")])
def test_stabilize_projects_points_and_momenta(algo, key):
    M = Stiefel(6, 3)
    X0 = M.sample(generator=_gen(0), dtype=DT)
    f = _problem((6, 3), seed=1)
    p = ManifoldParameter(X0.clone(), M)
    kw = dict(momentum=0.9) if algo is RiemannianSGD else {}
    opt = algo([p], lr=0.01, stabilize=3, retraction="cayley", **kw)
    _run(p, opt, f, 2)
    with torch.no_grad():
        p.mul_(1 + 1e-4)  # off the manifold
        opt.state[p][key].add_(p, alpha=1e-3)  # off the tangent space
    _run(p, opt, f, 1)  # third step: stabilised after the update
    assert M.distance(p.detach()) < 1e-14
    buf = opt.state[p][key]
    torch.testing.assert_close(M.proj_tangent(p.detach(), buf), buf, rtol=0, atol=1e-15)
    assert opt.param_groups[0]["step"] == 3
    with pytest.raises(ValueError, match=r"stabilize: expected None or a positive integer"):
        algo([p], lr=0.01, stabilize=0)


@pytest.mark.parametrize("algo,kw", [(RiemannianSGD, dict(momentum=0.5)),
                                     (RiemannianAdam, {})])
def test_step_with_a_closure_returns_its_loss_and_takes_the_same_step(algo, kw):
    """``step(closure)``: the closure runs with grad enabled (also when ``step`` is called under
    ``no_grad``), its loss is returned, and the step equals the one after a manual backward,
    for manifold and Euclidean parameters of one group."""
    M = Stiefel(7, 3)
    X0 = M.sample(generator=_gen(20), dtype=DT)
    w0 = torch.randn(4, generator=_gen(21), dtype=DT)
    f = _problem((7, 3), seed=22)

    def setup():
        p, w = ManifoldParameter(X0.clone(), M), nn.Parameter(w0.clone())
        return p, w, algo([p, w], lr=0.05, **kw)

    def loss_of(p, w):
        return f(p) + (w * w).sum() + w.sum()

    p1, w1, o1 = setup()
    p2, w2, o2 = setup()
    for _ in range(3):
        def closure():
            o1.zero_grad()
            value = loss_of(p1, w1)
            value.backward()
            return value

        with torch.no_grad():
            returned = o1.step(closure)
        o2.zero_grad()
        expected = loss_of(p2, w2)
        expected.backward()
        o2.step()
        assert torch.equal(returned.detach(), expected.detach())
    assert torch.equal(p1.detach(), p2.detach()) and torch.equal(w1.detach(), w2.detach())
    assert (p1.detach() - X0).abs().max() > 1e-3


def test_stabilize_at_once_leaves_euclidean_parameters_and_empty_states_alone():
    """``opt.stabilize()``: points projected (polar factor), first moments projected onto the
    tangent space there; a Euclidean parameter in the same group is left as it is, and a
    manifold parameter never stepped gets no state."""
    M = Stiefel(6, 3)
    p = ManifoldParameter(M.sample(generator=_gen(23), dtype=DT), M)
    idle = ManifoldParameter(M.sample(generator=_gen(24), dtype=DT), M)
    w = nn.Parameter(torch.randn(5, generator=_gen(25), dtype=DT))
    opt = RiemannianAdam([p, idle, w], lr=0.01, retraction="qr")
    f = _problem((6, 3), seed=26)
    for _ in range(2):
        opt.zero_grad()
        (f(p) + (w * w).sum()).backward()
        idle.grad = None
        opt.step()
    with torch.no_grad():
        p.add_(1e-3 * torch.randn(6, 3, generator=_gen(27), dtype=DT))  # off the manifold
        opt.state[p]["exp_avg"].add_(p, alpha=0.1)  # off the tangent space
    off, m_off = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    w_before, idle_before = w.detach().clone(), idle.detach().clone()
    w_state = {k: v.clone() for k, v in opt.state[w].items()}
    opt.stabilize()
    X = p.detach()
    torch.testing.assert_close(X, M.project(off), rtol=0, atol=1e-15)
    assert M.distance(X) < 1e-14
    torch.testing.assert_close(opt.state[p]["exp_avg"], M.proj_tangent(X, m_off),
                               rtol=0, atol=1e-15)
    assert torch.equal(w.detach(), w_before)
    assert all(torch.equal(opt.state[w][k], v) for k, v in w_state.items())
    # a point without state is projected too (a change at rounding level), and gets no state
    torch.testing.assert_close(idle.detach(), M.project(idle_before), rtol=0, atol=0)
    assert len(opt.state[idle]) == 0


def test_complex_and_sparse_inputs_are_refused_with_their_shape():
    z = ManifoldParameter(Stiefel(4, 2).sample(dtype=torch.complex128), Stiefel(4, 2))
    with pytest.raises(ValueError, match=r"params: expected real manifold parameters, got a "
                                         r"complex one of shape \(4, 2\)"):
        RiemannianSGD([z], lr=0.1)
    p = ManifoldParameter(Sphere(5).sample(generator=_gen(28), dtype=DT), Sphere(5))
    opt = RiemannianSGD([p], lr=0.1)
    p.grad = torch.eye(5, dtype=DT)[0].to_sparse()
    with pytest.raises(RuntimeError, match=r"RiemannianSGD does not support sparse gradients "
                                           r"\(parameter of shape \(5,\)"):
        opt.step()


def test_amsgrad_turned_on_later_starts_its_maximum_from_the_current_moment():
    """A group switched to ``amsgrad=True`` after some steps (or a state dict saved without
    it) gets ``max_exp_avg_sq`` at its next step: the maximum of zeros and the new second
    moment, so that step equals one of plain Adam, and the maximum then holds."""
    M = Stiefel(6, 3)
    X0 = M.sample(generator=_gen(29), dtype=DT)
    f = _problem((6, 3), seed=30)
    p, q = ManifoldParameter(X0.clone(), M), ManifoldParameter(X0.clone(), M)
    op, oq = RiemannianAdam([p], lr=0.02), RiemannianAdam([q], lr=0.02)
    _run(p, op, f, 3)
    _run(q, oq, f, 3)
    op.param_groups[0]["amsgrad"] = True
    _run(p, op, f, 1)
    _run(q, oq, f, 1)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-14)
    s = op.state[p]
    assert torch.equal(s["max_exp_avg_sq"], s["exp_avg_sq"])
    with torch.no_grad():  # a tiny gradient: the second moment falls, the maximum stays
        before = s["max_exp_avg_sq"].clone()
        p.grad = 1e-6 * torch.ones_like(p)
    op.step()
    assert torch.equal(s["max_exp_avg_sq"], before)
    assert (s["exp_avg_sq"] < before).all()


def test_amsgrad_maximum_on_the_host_is_torch_maximum():
    """One point on CPU keeps its second moments on the host; their running maximum must
    be ``torch.maximum``'s, NaN included (Python's ``max`` drops a NaN in second place)."""
    from dtriv.optim.radam import _nan_max

    nan = float("nan")
    for a, b in [(1.0, 2.0), (3.0, 2.0), (0.0, 0.0), (nan, 1.0), (1.0, nan), (nan, nan)]:
        expected = torch.maximum(torch.tensor(a, dtype=DT), torch.tensor(b, dtype=DT))
        torch.testing.assert_close(torch.tensor(_nan_max(a, b), dtype=DT), expected,
                                   equal_nan=True, rtol=0, atol=0)


def _drift_after(M, method, opt_cls, steps, dtype=torch.float32, **kw):
    """The constraint error of a least-squares run on ``M`` after ``steps`` steps."""
    g = _gen(3)
    X0 = M.sample(generator=g, dtype=dtype)
    p = ManifoldParameter(X0, M)
    x = torch.randn(7, M.k, generator=g, dtype=dtype)
    T = torch.randn(7, M.n, generator=g, dtype=dtype)
    opt = opt_cls([p], retraction=method, **kw)
    for _ in range(steps):
        opt.zero_grad()
        (((x @ p.mT - T) ** 2).sum() + (p**3).sum().real).backward()
        opt.step()
    return M.distance(p.detach()).max().item()


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
@pytest.mark.parametrize("method", ["exp", "exp_canonical", "cayley"])
@pytest.mark.parametrize("opt_cls, kw", [(RiemannianSGD, {"lr": 2e-3, "momentum": 0.9}),
                                         (RiemannianSGD, {"lr": 2e-3}),
                                         (RiemannianAdam, {"lr": 1e-2})],
                         ids=["sgd-momentum", "sgd", "adam"])
def test_non_projecting_retractions_stay_on_the_manifold(shape, method, opt_cls, kw):
    # the exponential maps read X^T V, skew only on the manifold: without a polish the error
    # grew geometrically (float32, SGD with momentum and exp on (6, 4): 3.7 after 200 steps)
    assert _drift_after(Stiefel(*shape), method, opt_cls, 200, **kw) < 2e-5


class _OwnStiefel(Stiefel):
    """A subclass with its own tangent projection: its buckets take the generic path."""

    def proj_tangent(self, B, V):
        return super().proj_tangent(B, V)


@pytest.mark.parametrize("method", ["exp", "exp_canonical"])
def test_non_projecting_retractions_stay_on_the_manifold_generic_path(method):
    # the generic path polishes after every such step
    assert _drift_after(_OwnStiefel(6, 4), method, RiemannianSGD, 200, lr=2e-3,
                        momentum=0.9) < 2e-5


def _worst_error_under_a_flat_loss(M, method, dtype, steps=30):
    # a loss constant on the manifold (|X|^2): the Riemannian gradient is rounding, which
    # Adam's per-point scaling turns into a step of length lr, normal to the manifold as much
    # as tangent
    torch.manual_seed(0)
    p = ManifoldParameter(M.sample(dtype=dtype), M)
    opt = RiemannianAdam([p], lr=0.01, retraction=method)
    worst = 0.0
    for _ in range(steps):
        opt.zero_grad()
        (1e-3 * p.pow(2).sum()).backward()
        opt.step()
        worst = max(worst, M.distance(p.detach()).max().item())
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sphere_exp_steps_stay_on_the_sphere_under_a_flat_loss(dtype):
    # before: |X| = 1.16 after 100 float32 steps (the exponential map keeps the norm only for
    # tangent steps); now scaled back to the radius after each step
    for M in (Sphere(8), Sphere(8, radius=3.0)):
        assert _worst_error_under_a_flat_loss(M, "exp", dtype) <= 8 * torch.finfo(dtype).eps * (
            M.radius)


@pytest.mark.parametrize("method", ["exp", "exp_canonical"])
@pytest.mark.parametrize("M", [Stiefel(8, 3), _OwnStiefel(8, 3)], ids=["fused", "generic"])
def test_stiefel_exp_steps_settle_under_a_flat_loss(M, method):
    # one polish from the 1e-2 error of such a step left 1.9e-4 (float32), above check's
    # tolerance 9.5e-5: polished until settled
    assert _worst_error_under_a_flat_loss(M, method, torch.float32) < 2e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("opt_cls, kw", [(RiemannianSGD, {"lr": 0.1, "momentum": 0.9}),
                                         (RiemannianAdam, {"lr": 0.01})], ids=["sgd", "adam"])
def test_half_precision_stiefel_steps(dtype, opt_cls, kw):
    # the fused path's block QR has no half kernels: half buckets take the generic path,
    # whose maps compute in float32 (the constraint error is that of the rounding to half)
    M = Stiefel(8, 3)
    p = ManifoldParameter(M.sample(generator=_gen(0), dtype=dtype), M)
    opt = opt_cls([p], retraction="qr", **kw)
    for _ in range(3):
        opt.zero_grad()
        (p.float() ** 3).sum().backward()
        opt.step()
    assert p.dtype == dtype and M.distance(p.detach()).item() < 20 * torch.finfo(dtype).eps


def _least_squares(M, seed=0, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(9, M.k, generator=g, dtype=dtype)
    T = torch.randn(9, M.n, generator=g, dtype=dtype)
    return lambda W: ((x @ W.mT - T) ** 2).sum()


@pytest.mark.parametrize("opt_cls, kw", [(RiemannianSGD, {"lr": 1e-2}),
                                         (RiemannianSGD, {"lr": 1e-2, "momentum": 0.9}),
                                         (RiemannianAdam, {"lr": 1e-2})],
                         ids=["sgd", "sgd-momentum", "adam"])
def test_resume_from_a_state_dict_is_bit_for_bit(opt_cls, kw, monkeypatch):
    # the fused QR's record of the points it wrote travels in the state dict: a resumed run
    # takes the same block Cholesky QR steps as one never interrupted (it took the checked QR
    # before, 1e-9 away)
    import dtriv.optim._stiefel as fused

    M = Stiefel(32, 16)
    loss = _least_squares(M)

    def steps(p, opt, count):
        for _ in range(count):
            opt.zero_grad()
            loss(p).backward()
            opt.step()

    p = ManifoldParameter(M.sample(generator=_gen(1)), M)
    opt = opt_cls([p], retraction="qr", **kw)
    steps(p, opt, 5)
    saved = torch.load(_roundtrip(opt.state_dict()), weights_only=True)
    q = ManifoldParameter(p.detach().clone(), M)
    resumed = opt_cls([q], retraction="qr", **kw)
    resumed.load_state_dict(saved)
    calls = []
    block_qr = fused.block_cholesky_qf_
    monkeypatch.setattr(fused, "block_cholesky_qf_",
                        lambda Y, **kwargs: calls.append(1) or block_qr(Y, **kwargs))
    steps(p, opt, 3)
    steps(q, resumed, 3)
    assert torch.equal(p.detach(), q.detach()) and len(calls) == 6
    assert all("on_manifold" not in s for s in resumed.state.values())
    packed = opt.state_dict()
    assert packed["on_manifold"] == [0]  # a top-level entry: the states stay torch's
    assert all("on_manifold" not in entry for entry in packed["state"].values())
    if opt_cls is RiemannianSGD and "momentum" not in kw:
        assert packed["state"] == {}  # as torch's SGD without momentum


def test_state_dict_post_hooks_see_torch_s_per_parameter_states():
    # a hook that re-keys the states by name (torch lets post-hooks return a new dict) must
    # not leave a stray entry behind
    M = Stiefel(8, 3)
    p = ManifoldParameter(M.sample(generator=_gen(0)), M)
    opt = RiemannianAdam([p], lr=0.01)
    p.grad = torch.randn(8, 3, generator=_gen(1))
    opt.step()
    opt.register_state_dict_post_hook(
        lambda o, sd: {**sd, "state": {f"w{k}": v for k, v in sd["state"].items()}})
    assert set(opt.state_dict()["state"]) == {"w0"}


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("opt_cls", [RiemannianSGD, RiemannianAdam])
def test_deepcopy_and_pickle_keep_the_constructor_defaults(opt_cls):
    import copy
    import pickle

    M = Stiefel(6, 3)
    opt = opt_cls([ManifoldParameter(M.sample(generator=_gen(0)), M)], lr=0.1,
                  retraction="qr", stabilize=5)
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        other.add_param_group({"params": [ManifoldParameter(M.sample(), M)]})
        assert other.param_groups[-1]["retraction"] == "qr"
        assert other.param_groups[-1]["stabilize"] == 5


def test_manifolds_with_bounds_equal_in_repr_are_distinct_buckets():
    from dtriv.manifolds import SpectrallyBounded

    Ma, Mb = SpectrallyBounded(4, 3, upper=2.0), SpectrallyBounded(4, 3, upper=2.000004)
    assert repr(Ma) == repr(Mb)  # repr rounds the bounds
    g = _gen(0)
    pa = ManifoldParameter(Ma.project(3 * torch.randn(4, 3, generator=g, dtype=DT)), Ma)
    pb = ManifoldParameter(Mb.project(3 * torch.randn(4, 3, generator=g, dtype=DT)), Mb)
    opt = RiemannianSGD([pa, pb], lr=0.1)
    (-(pa**2).sum() - (pb**2).sum()).backward()
    opt.step()
    top = [torch.linalg.matrix_norm(p.detach(), 2).item() for p in (pa, pb)]
    assert top[0] == pytest.approx(2.0, abs=1e-12) and top[1] == pytest.approx(2.000004, abs=1e-12)


class _OwnSphere(Sphere):
    """A subclass with its own tangent projection: its buckets take the generic path."""

    def proj_tangent(self, B, V):
        return super().proj_tangent(B, V)


@pytest.mark.parametrize("M,own,method", [
    (Stiefel(8, 3), _OwnStiefel(8, 3), "qr"), (Sphere(7), _OwnSphere(7), "projective")])
def test_nesterov_turned_on_mid_run_uses_the_transported_buffer(M, own, method):
    # the lazy momentum step keeps the buffer at the previous point; the Nesterov step
    # (eager on Stiefel, the generic path on the sphere) projects it: the fused path equals
    # the generic one (a subclass)
    loss = _least_squares(M, dtype=DT) if isinstance(M, Stiefel) else _problem((7,), seed=3)
    X0 = M.sample(generator=_gen(2), dtype=DT)
    points = []
    for manifold in (M, own):
        p = ManifoldParameter(X0.clone(), manifold)
        opt = RiemannianSGD([p], lr=0.01, momentum=0.9, retraction=method)
        for t in range(12):
            if t == 6:
                opt.param_groups[0]["nesterov"] = True
            opt.zero_grad()
            loss(p).backward()
            opt.step()
        points.append(p.detach())
    assert (points[0] - X0).abs().max() > 1e-3
    assert (points[0] - points[1]).abs().max().item() < 1e-13


@pytest.mark.parametrize("opt_cls", [RiemannianSGD, RiemannianAdam])
def test_compiled_step_with_a_lone_stiefel_parameter_matches_eager(opt_cls):
    # a one-parameter bucket is a view of the parameter, written in place: a view of a leaf
    # that requires grad made torch.compile fail ("a view was created in no_grad mode")
    # The manifold updates run as eager code under compile (host reads choose the QR; traced,
    # they broke the graph at each read and recompiled): no graph for a manifold-only
    # optimizer, and the points equal eager ones bit for bit.
    from torch._dynamo.utils import counters

    M = Stiefel(6, 4)
    points = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        p = ManifoldParameter(M.sample(generator=_gen(0)), M)
        opt = opt_cls([p], lr=0.05)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        for seed in range(4):
            p.grad = torch.randn(6, 4, generator=_gen(10 + seed))
            step()
        points.append(p.detach().clone())
    assert counters["stats"]["unique_graphs"] == 0
    torch.testing.assert_close(points[0], points[1], rtol=0, atol=0)


# ------------------------------------------------- maximize, weight decay, per-group lr
_SGD_MOMENTUM = (RiemannianSGD, dict(momentum=0.9))


@pytest.mark.parametrize("opt_cls,kw", [(RiemannianSGD, {}), _SGD_MOMENTUM,
                                        (RiemannianAdam, {})], ids=["sgd", "sgd-momentum", "adam"])
def test_maximize_is_minimizing_the_negated_loss(opt_cls, kw):
    """``maximize=True`` on f follows the run without it on -f (the gradient is negated before
    anything else), and f increases: a dropped negation would minimize f instead."""
    M = Sphere(7)
    x0 = M.sample(generator=_gen(40), dtype=DT)
    t = torch.randn(7, generator=_gen(41), dtype=DT)
    up, down = ManifoldParameter(x0.clone(), M), ManifoldParameter(x0.clone(), M)
    o_up = opt_cls([up], lr=0.05, maximize=True, **kw)
    o_down = opt_cls([down], lr=0.05, **kw)
    _run(up, o_up, lambda p: (p * t).sum(), 10)
    _run(down, o_down, lambda p: -(p * t).sum(), 10)
    torch.testing.assert_close(up.detach(), down.detach(), rtol=0, atol=1e-12)
    assert float((up.detach() * t).sum()) > float((x0 * t).sum()) + 0.1


def _clip(Y, lower, upper):
    """Nearest point with singular values in [lower, upper], by hand (SVD)."""
    U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
    return U @ torch.diag(S.clamp(lower, upper)) @ Vh


@pytest.mark.parametrize("momentum,dampening", [(0.0, 0.0), (0.9, 0.3)])
def test_sgd_weight_decay_on_a_manifold_that_keeps_it_matches_explicit_formula(momentum,
                                                                              dampening):
    """On SpectrallyBounded (tangent projection the identity, so ``lambda X`` survives it) three
    steps equal the documented formula written out: g = G + lambda X, b = mu b + (1 - tau) g
    (b = g first), X' = clip(X - eta b). On Stiefel/Sphere a wrong sign of the decay would be
    projected away; here it moves the point."""
    from dtriv.manifolds import SpectrallyBounded

    M = SpectrallyBounded(6, 4, upper=2.0, lower=0.5)
    X = M.sample(generator=_gen(42), dtype=DT)
    C = torch.randn(6, 4, generator=_gen(43), dtype=DT)
    lr, wd = 0.1, 0.3
    p = ManifoldParameter(X.clone(), M)
    opt = RiemannianSGD([p], lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd)
    buf = None
    for _ in range(3):
        g = C + wd * X  # the gradient of <C, X>, plus the decay
        if momentum == 0:
            d = g
        else:
            buf = g.clone() if buf is None else momentum * buf + (1 - dampening) * g
            d = buf  # transport: the identity here
        X = _clip(X - lr * d, 0.5, 2.0)
        _run(p, opt, lambda q: (C * q).sum(), 1)
    torch.testing.assert_close(p.detach(), X, rtol=0, atol=1e-12)
    # without the decay the run differs (the decay is visible at this tolerance)
    q = ManifoldParameter(M.sample(generator=_gen(42), dtype=DT), M)
    _run(q, RiemannianSGD([q], lr=lr, momentum=momentum, dampening=dampening),
         lambda r: (C * r).sum(), 3)
    assert (q.detach() - X).abs().max() > 1e-3


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_weight_decay_on_a_manifold_that_keeps_it_matches_explicit_formula(amsgrad):
    """On SpectrallyBounded three Adam steps equal the documented formula written out:
    g = G + lambda X, m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) <g, g> (one number per
    point), X' = clip(X - eta (m / bc1) / (sqrt(v_hat / bc2) + eps)). The decay term must add
    lambda X (not lambda G, which a tangent projection on Stiefel would hide just as well)."""
    from dtriv.manifolds import SpectrallyBounded

    M = SpectrallyBounded(6, 4, upper=2.0, lower=0.5)
    X = M.sample(generator=_gen(44), dtype=DT)
    C = torch.randn(6, 4, generator=_gen(45), dtype=DT)
    lr, wd, (b1, b2), eps = 0.1, 0.3, (0.8, 0.95), 1e-8
    p = ManifoldParameter(X.clone(), M)
    opt = RiemannianAdam([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                         amsgrad=amsgrad)
    m, v, v_max = torch.zeros_like(X), torch.zeros((), dtype=DT), torch.zeros((), dtype=DT)
    for t in range(1, 4):
        g = C + wd * X
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g * g).sum()
        v_max = torch.maximum(v_max, v)
        v_hat = v_max if amsgrad else v
        d = (m / (1 - b1**t)) / ((v_hat / (1 - b2**t)).sqrt() + eps)
        X = _clip(X - lr * d, 0.5, 2.0)
        _run(p, opt, lambda q: (C * q).sum(), 1)
    torch.testing.assert_close(p.detach(), X, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"].reshape(()), v, rtol=0, atol=1e-12)


# (optimizer, keywords, manifold): the fused sphere path, the fused Stiefel paths without
# momentum (in-place plain step), with lazy momentum, with nesterov (eager), and Adam's
LR_CASES = [
    (RiemannianSGD, {}, Sphere(7)),
    (RiemannianSGD, {}, Stiefel(8, 3)),
    (RiemannianSGD, dict(momentum=0.9), Stiefel(8, 3)),
    (RiemannianSGD, dict(momentum=0.9, nesterov=True), Stiefel(8, 3)),
    (RiemannianAdam, {}, Sphere(7)),
    (RiemannianAdam, {}, Stiefel(8, 3)),
]
_LR_IDS = ["sgd-sphere", "sgd-stiefel", "sgd-momentum-stiefel", "sgd-nesterov-stiefel",
           "adam-sphere", "adam-stiefel"]


def _lr_problem(M, seed):
    X0 = M.sample(generator=_gen(seed), dtype=DT)
    loss = _problem(tuple(M.shape), seed=seed + 1)
    return X0, loss


@pytest.mark.parametrize("opt_cls,kw,M", LR_CASES, ids=_LR_IDS)
def test_a_group_s_own_lr_is_used(opt_cls, kw, M):
    """A manifold parameter in a second group with lr=0.1 (the default is 0.01) follows the run
    of that parameter alone with lr=0.1: each group's ``lr`` is read, not the default."""
    X0, loss = _lr_problem(M, 46)
    Y0, other_loss = _lr_problem(M, 48)
    p, other = ManifoldParameter(X0.clone(), M), ManifoldParameter(Y0.clone(), M)
    opt = opt_cls([{"params": [other]}, {"params": [p], "lr": 0.1}], lr=0.01, **kw)
    for _ in range(5):
        opt.zero_grad()
        (loss(p) + other_loss(other)).backward()
        opt.step()
    alone = ManifoldParameter(X0.clone(), M)
    _run(alone, opt_cls([alone], lr=0.1, **kw), loss, 5)
    torch.testing.assert_close(p.detach(), alone.detach(), rtol=0, atol=1e-12)
    assert (p.detach() - X0).abs().max() > 1e-2


@pytest.mark.parametrize("opt_cls,kw,M", LR_CASES, ids=_LR_IDS)
def test_lr_changed_mid_run_takes_effect(opt_cls, kw, M):
    """Setting ``param_groups[0]["lr"]`` between steps (what a scheduler does) gives the steps of
    an optimizer built with that lr, holding the same state, from that point."""
    X0, loss = _lr_problem(M, 50)
    p = ManifoldParameter(X0.clone(), M)
    opt = opt_cls([p], lr=0.01, **kw)
    _run(p, opt, loss, 3)
    q = ManifoldParameter(p.detach().clone(), M)
    fresh = opt_cls([q], lr=0.1, **kw)
    fresh.state[q] = {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0]["lr"] = 0.1
    _run(p, opt, loss, 4)
    _run(q, fresh, loss, 4)
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
    slow = ManifoldParameter(X0.clone(), M)
    _run(slow, opt_cls([slow], lr=0.01, **kw), loss, 7)
    assert (p.detach() - slow.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("opt_cls,kw", [(RiemannianSGD, {"lr": 1e-2, "momentum": 0.9}),
                                        (RiemannianAdam, {"lr": 1e-2})],
                         ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("count", [2, 3])
def test_resume_of_a_multi_parameter_bucket_is_bit_for_bit(opt_cls, kw, count):
    """Several Stiefel parameters in one bucket (persistent stacked buffers): the resumed run
    re-stacks them at its first step, which must keep their "written by this optimizer" marks
    (from the state dict), so that it takes the block Cholesky QR steps of the run never
    interrupted, bit for bit for every parameter (the checked QR differs by rounding)."""
    M = Stiefel(32, 16)
    losses = [_least_squares(M, seed=60 + i) for i in range(count)]

    def steps(ps, opt, n):
        for _ in range(n):
            opt.zero_grad()
            sum(f(q) for f, q in zip(losses, ps)).backward()
            opt.step()

    ps = [ManifoldParameter(M.sample(generator=_gen(70 + i)), M) for i in range(count)]
    opt = opt_cls(ps, retraction="qr", **kw)
    steps(ps, opt, 4)
    saved = torch.load(_roundtrip(opt.state_dict()), weights_only=True)
    assert saved["on_manifold"] == list(range(count))
    qs = [ManifoldParameter(p.detach().clone(), M) for p in ps]
    resumed = opt_cls(qs, retraction="qr", **kw)
    resumed.load_state_dict(saved)
    steps(ps, opt, 3)
    steps(qs, resumed, 3)
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("opt_cls,kw,key", [(RiemannianSGD, dict(momentum=0.9), "momentum_buffer"),
                                            (RiemannianAdam, {}, "exp_avg")],
                         ids=["sgd-momentum", "adam"])
def test_stabilize_projects_the_momentum_of_every_parameter_of_a_bucket(opt_cls, kw, key):
    """``opt.stabilize()`` on a bucket of three Sphere(7) parameters: every momentum (not only
    the first row's) becomes its projection onto the tangent space at its point."""
    M = Sphere(7)
    ps = [ManifoldParameter(M.sample(generator=_gen(80 + i), dtype=DT), M) for i in range(3)]
    opt = opt_cls(ps, lr=0.01, **kw)
    f = _problem((7,), seed=83)
    opt.zero_grad()
    sum(f(p) for p in ps).backward()
    opt.step()
    raw = [torch.randn(7, generator=_gen(90 + i), dtype=DT) for i in range(3)]
    for p, r in zip(ps, raw):
        opt.state[p][key] = r.clone()
    opt.stabilize()
    for p, r in zip(ps, raw):
        x, buf = p.detach(), opt.state[p][key]
        assert abs(float((x * buf).sum())) < 1e-6
        torch.testing.assert_close(buf, r - (x @ r) * x, rtol=0, atol=1e-12)


def test_a_float32_tensor_lr_does_not_round_a_float64_step():
    """One float64 point on CPU takes its Adam step size on the host: a float32 tensor lr was
    kept a tensor there, and rounded the step to float32 (1.9e-9 from the generic path
    after 20 steps, against 3e-16 with a float lr)."""
    from dtriv.manifolds import Stiefel
    from dtriv.optim import ManifoldParameter, RiemannianAdam

    finals = []
    for lr in (torch.tensor(0.02), float(torch.tensor(0.02))):  # the same number
        X = torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(0)))[0]
        p = ManifoldParameter(X, Stiefel(8, 4))
        opt = RiemannianAdam([p], lr=lr)
        for step in range(20):
            p.grad = torch.randn(8, 4, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(step))
            opt.step()
        finals.append(p.detach().clone())
    assert (finals[0] - finals[1]).abs().max() < 1e-14
