"""DynamicTrivialization: K = 1 is Riemannian gradient descent, refresh schedule, optimizer
state, schedulers, closures, resume, non-finite gradients, bad input, and the
parametrizations of torch and geotorch."""

from __future__ import annotations

import copy
import math

import geotorch
import pytest
import scipy.linalg
import torch
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from dtriv.manifolds import Orthogonal, Stiefel
from dtriv.optim import DynamicTrivialization, NonFiniteGradientError
from dtriv.parametrize import constrain
from dtriv.parametrize import orthogonal as dtriv_orthogonal

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sym(n: int, seed: int) -> torch.Tensor:
    A = torch.randn(n, n, generator=_gen(seed), dtype=DT)
    return (A + A.T) / 2


def _stiefel_linear(n=8, k=3, seed=0, retraction=None, bias=False):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(DT)
    constrain(lin, "weight", Stiefel(n, k), retraction=retraction)
    return lin


def _loss_fn(n, k, seed=1):
    """f(W) = -tr(W^T A W) - <C, W>: Euclidean gradient G = -2 A W - C (not tangent)."""
    A = _sym(n, seed)
    C = torch.randn(n, k, generator=_gen(seed + 1), dtype=DT)
    return (lambda W: -(W * (A @ W)).sum() - (C * W).sum()), (lambda W: -2 * A @ W - C)


def _square_loss_fn(n, seed):
    """f(W) = -tr(D W^T A W) - <C, W>, not constant on O(n): G = -2 A W D - C."""
    A = _sym(n, seed)
    D = torch.diag(torch.arange(1.0, n + 1, dtype=DT))
    C = torch.randn(n, n, generator=_gen(seed + 1), dtype=DT)
    return (lambda W: -(W * (A @ W @ D)).sum() - (C * W).sum()), (lambda W: -2 * A @ W @ D - C)


def _weight(lin):
    return lin.weight.detach().clone()


# --------------------------------------------------------------- K = 1 is RGD
def _cayley_dense(B, V):
    """(I - O/2)^{-1}(I + O/2) B with O = P V B^T - B (P V)^T, P = I - B B^T / 2."""
    n = B.shape[0]
    PV = V - B @ (B.T @ V) / 2
    O = PV @ B.T - B @ PV.T
    I = torch.eye(n, dtype=B.dtype)
    return torch.linalg.solve(I - O / 2, (I + O / 2) @ B)


def _qr_retraction(B, V):
    Q, R = torch.linalg.qr(B + V)
    return Q * torch.sign(torch.diagonal(R)).unsqueeze(0)


def _proj(B, G):
    S = B.T @ G
    return G - B @ (S + S.T) / 2


@pytest.mark.parametrize("retraction,oracle", [("cayley", _cayley_dense), ("qr", _qr_retraction)])
def test_K1_with_sgd_is_riemannian_gradient_descent(retraction, oracle):
    n, k, lr = 8, 3, 0.05
    lin = _stiefel_linear(n, k, retraction=retraction)
    f, grad = _loss_fn(n, k)
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=lr), K=1)
    W = _weight(lin)
    for _ in range(20):
        W = oracle(W, -lr * _proj(W, grad(W)))
        opt.zero_grad()
        f(lin.weight).backward()
        opt.step()
        torch.testing.assert_close(_weight(lin), W, rtol=0, atol=1e-10)
    assert opt.steps == 20 and opt.refreshes == 20
    assert torch.count_nonzero(lin.parametrizations.weight.original) == 0


def test_K1_on_the_square_group_is_the_exponential_map():
    """W = B expm(skew X): K = 1 gives W <- W expm(-lr skew(W^T G))."""
    n, lr = 6, 0.1
    torch.manual_seed(3)
    lin = nn.Linear(n, n, bias=False).to(DT)
    constrain(lin, "weight", Orthogonal(n))
    f, grad = _square_loss_fn(n, 4)
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=lr), K=1)
    W = _weight(lin).numpy()
    W0 = W.copy()
    for _ in range(20):
        S = W.T @ grad(torch.from_numpy(W)).numpy()
        W = W @ scipy.linalg.expm(-lr * (S - S.T) / 2)
        opt.zero_grad()
        f(lin.weight).backward()
        opt.step()
    assert abs(W - W0).max() > 1e-2
    torch.testing.assert_close(_weight(lin), torch.from_numpy(W), rtol=0, atol=1e-10)


# --------------------------------------------------------------- schedule and state
def test_refresh_schedule_and_static_K():
    lin = _stiefel_linear()
    f, _ = _loss_fn(8, 3)
    triv = lin.parametrizations.weight[0]
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=0.01), K=3)
    bases = []
    for step in range(1, 8):
        opt.zero_grad()
        f(lin.weight).backward()
        opt.step()
        X = lin.parametrizations.weight.original
        assert (torch.count_nonzero(X) == 0) == (step % 3 == 0), step
        bases.append(triv.base.clone())
    assert opt.refreshes == 2
    assert torch.equal(bases[0], bases[1]) and not torch.equal(bases[1], bases[2])

    static = _stiefel_linear()
    base0 = static.parametrizations.weight[0].base.clone()
    opt = DynamicTrivialization(torch.optim.SGD(static.parameters(), lr=0.01), K=math.inf)
    for _ in range(10):
        opt.zero_grad()
        f(static.weight).backward()
        opt.step()
    assert opt.refreshes == 0
    assert torch.equal(static.parametrizations.weight[0].base, base0)
    assert torch.count_nonzero(static.parametrizations.weight.original) > 0
    assert Stiefel(8, 3).check(static.weight.detach())


@pytest.mark.parametrize("mode", ["keep", "reset"])
def test_optimizer_state_at_refresh(mode):
    lin = _stiefel_linear(bias=True)
    f, _ = _loss_fn(8, 3)
    opt = DynamicTrivialization(torch.optim.Adam(lin.parameters(), lr=0.01), K=2, state=mode)
    X = lin.parametrizations.weight.original
    for _ in range(2):
        opt.zero_grad()
        (f(lin.weight) + lin.bias.sum()).backward()
        opt.step()
    if mode == "keep":
        assert opt.state[X]["step"] == 2
    else:
        assert len(opt.state[X]) == 0
    assert opt.state[lin.bias]["step"] == 2  # only trivialized parameters are reset


class CountingStiefel(Stiefel):
    projections = 0

    def project(self, X):
        CountingStiefel.projections += 1
        return super().project(X)


def test_reproject_every_M_refreshes():
    torch.manual_seed(0)
    lin = nn.Linear(3, 8, bias=False).to(DT)
    constrain(lin, "weight", CountingStiefel(8, 3))
    f, _ = _loss_fn(8, 3)
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=0.01), K=2,
                                reproject_every=3)
    CountingStiefel.projections = 0
    counts = []
    for _ in range(12):  # 6 refreshes -> re-projections at the 3rd and the 6th
        opt.zero_grad()
        f(lin.weight).backward()
        opt.step()
        counts.append((opt.refreshes, CountingStiefel.projections))
    assert opt.refreshes == 6
    assert sorted(set(counts)) == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 2)]


# --------------------------------------------------------------- Optimizer surface
def test_lr_scheduler_on_the_wrapper_and_on_the_inner_optimizer():
    lin = _stiefel_linear()
    f, _ = _loss_fn(8, 3)
    inner = torch.optim.SGD(lin.parameters(), lr=0.4)
    opt = DynamicTrivialization(inner, K=2)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(6):
        opt.zero_grad()
        f(lin.weight).backward()
        opt.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)
    sched2 = torch.optim.lr_scheduler.ExponentialLR(inner, gamma=0.5)
    opt.step()
    sched2.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_zero_grad_add_param_group_and_closure():
    lin = _stiefel_linear()
    other = _stiefel_linear(seed=5)
    f, _ = _loss_fn(8, 3)
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=0.01), K=1)
    assert len(opt.targets) == 1
    opt.add_param_group({"params": other.parameters(), "lr": 0.02})
    assert len(opt.targets) == 2

    def closure():
        opt.zero_grad()
        loss = f(lin.weight) + f(other.weight)
        loss.backward()
        return loss

    before = f(lin.weight).item() + f(other.weight).item()
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(before)
    assert torch.count_nonzero(other.parametrizations.weight.original) == 0
    opt.zero_grad()
    assert lin.parametrizations.weight.original.grad is None

    # LBFGS re-evaluates the closure: the wrapper hands it the first loss, then the closure
    lbfgs = DynamicTrivialization(torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=5), K=1)
    losses = [lbfgs.step(lambda: (lbfgs.zero_grad(), f(lin.weight).backward(),
                                  f(lin.weight))[-1]).item() for _ in range(4)]
    assert losses[-1] < losses[0]
    assert Stiefel(8, 3).check(lin.weight.detach())


# --------------------------------------------------------------- resume
def _make_run(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8, bias=False)).to(DT)
    constrain(model[2], "weight", Orthogonal(8))
    constrain(model[0], "weight", Stiefel(8, 4))
    opt = DynamicTrivialization(torch.optim.Adam(model.parameters(), lr=0.01), K=7,
                                reproject_every=3)
    return model, opt


def _train(model, opt, start, stop):
    for t in range(start, stop):
        g = _gen(1000 + t)
        x = torch.randn(16, 4, generator=g, dtype=DT)
        y = torch.randn(16, 8, generator=g, dtype=DT)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def test_resume_from_state_dicts_is_bit_for_bit():
    model, opt = _make_run()
    _train(model, opt, 0, 500)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, 500, 600)

    model2, opt2 = _make_run(seed=123)  # different initialisation, overwritten by the load
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert opt2.steps == 500 and opt2.refreshes == 500 // 7
    _train(model2, opt2, 500, 600)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert opt2.steps == 600 and opt2.refreshes == opt.refreshes


# --------------------------------------------------------------- non-finite gradients
def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"])


def _assert_same(snapshot, model, opt):
    (ms, os_) = snapshot
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ms[name]), name
    for key, value in opt.state_dict()["state"].items():
        for k, v in value.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(os_[key][k])), k


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_leaves_the_model_untouched(bad):
    model, opt = _make_run()
    _train(model, opt, 0, 5)
    snap = _snapshot(model, opt)
    opt.zero_grad()
    x = torch.randn(4, 4, generator=_gen(0), dtype=DT)
    model(x).sum().backward()
    model[2].parametrizations.weight.original.grad[1, 0] = bad
    with pytest.raises(NonFiniteGradientError, match=r"param_groups\[0\]\['params'\]\[2\]"):
        opt.step()
    _assert_same(snap, model, opt)
    assert opt.steps == 5


def test_nonfinite_gradient_skip():
    model, opt = _make_run()
    opt.nonfinite = "skip"
    _train(model, opt, 0, 6)  # the 7th step would refresh
    snap = _snapshot(model, opt)
    opt.zero_grad()
    model(torch.full((2, 4), float("nan"), dtype=DT)).sum().backward()
    with pytest.warns(RuntimeWarning, match="skipped a step with a non-finite gradient"):
        opt.step()
    _assert_same(snap, model, opt)
    assert opt.skipped_steps == 1 and opt.steps == 6 and opt.refreshes == 0
    _train(model, opt, 6, 7)
    assert opt.refreshes == 1


def test_finite_check_is_exact():
    """Sums flag NaN and inf; a sum that overflows on finite entries is checked exactly."""
    nan, inf = float("nan"), float("inf")
    tensors = [torch.tensor([3e38, 3e38]), torch.tensor([1.0, nan]), torch.tensor([inf, -inf]),
               torch.zeros(0), torch.tensor([1 + 1j, complex(0, nan)]), torch.ones(3, 3)]
    assert DynamicTrivialization._finite(tensors) == [True, False, False, True, False, True]
    # several dtypes, interleaved: each flag goes back to its own tensor
    mixed = [torch.tensor([6e4, 6e4], dtype=torch.float16),  # its half sum overflows
             torch.tensor([1.0, nan], dtype=torch.float64), torch.ones(2, dtype=torch.bfloat16),
             torch.tensor([inf], dtype=torch.float16), torch.ones(2, dtype=torch.float64),
             torch.tensor([nan], dtype=torch.bfloat16)]
    assert DynamicTrivialization._finite(mixed) == [True, False, True, False, True, False]


def test_nonfinite_parameter_never_reaches_a_base():
    lin = _stiefel_linear()
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=0.01), K=1)
    base = lin.parametrizations.weight[0].base.clone()
    with torch.no_grad():
        lin.parametrizations.weight.original[0, 0] = float("inf")
    with pytest.raises(NonFiniteGradientError, match="bases were not refreshed"):
        opt.refresh()
    assert torch.equal(lin.parametrizations.weight[0].base, base)


# --------------------------------------------------------------- bad input
def test_bad_arguments_name_the_argument():
    lin = _stiefel_linear()
    sgd = torch.optim.SGD(lin.parameters(), lr=0.1)
    for K in (0, -3, 1.5, "10", True, -math.inf):
        with pytest.raises(ValueError, match=r"K: expected a positive integer or math.inf, got"):
            DynamicTrivialization(sgd, K=K)
    with pytest.raises(ValueError, match=r"state: expected one of 'keep', 'reset', got 'clear'"):
        DynamicTrivialization(sgd, state="clear")
    with pytest.raises(ValueError, match=r"nonfinite: expected one of 'raise', 'skip'"):
        DynamicTrivialization(sgd, nonfinite="ignore")
    with pytest.raises(ValueError, match=r"reproject_every: expected None or a positive"):
        DynamicTrivialization(sgd, reproject_every=0)
    with pytest.raises(ValueError, match=r"optimizer: expected a torch.optim.Optimizer, got list"):
        DynamicTrivialization([sgd])
    with pytest.raises(ValueError, match=r"^optimizer: expected an optimizer, got a "
                                         r"DynamicTrivialization"):
        DynamicTrivialization(DynamicTrivialization(sgd))
    with pytest.raises(ValueError, match=r"^modules: expected an nn.Module or an iterable of "
                                         r"them, got a Tensor"):
        DynamicTrivialization(sgd, modules=[lin, lin.weight])
    K = DynamicTrivialization(sgd, K=3.0).K  # an integral float is read as an integer
    assert K == 3 and type(K) is int
    sgd.param_groups[0]["lr"] = -0.1
    with pytest.raises(ValueError, match=r"lr: expected non-negative learning rates, got -0.1"):
        DynamicTrivialization(sgd)


def test_no_constrained_parameter_warns():
    model = nn.Linear(3, 3)
    with pytest.warns(UserWarning, match=r"expected parameters of dynamic trivializations.*got "
                                         r"none among its 2 parameters"):
        opt = DynamicTrivialization(torch.optim.SGD(model.parameters(), lr=0.1), K=1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert opt.steps == 1 and opt.refreshes == 0 and opt.targets == []


# --------------------------------------------------------------- torch and geotorch
def _so_rgd_reference(W, G, lr):
    """W expm(-lr (W^T G - G^T W)): one step of the map base @ expm(tril(X) - tril(X)^T)."""
    S = W.T @ G
    return W @ torch.linalg.matrix_exp(-lr * (S - S.T))


def _square_model(kind, seed=0, n=6):
    torch.manual_seed(seed)
    lin = nn.Linear(n, n, bias=False).to(DT)
    if kind == "torch":
        P.orthogonal(lin, "weight", orthogonal_map="matrix_exp", use_trivialization=True)
    elif kind == "dtriv":
        dtriv_orthogonal(lin, "weight", orthogonal_map="matrix_exp", use_trivialization=True)
    else:
        geotorch.orthogonal(lin, "weight")
    return lin


@pytest.mark.parametrize("kind,use_modules", [("torch", False), ("torch", True),
                                              ("geotorch", False), ("geotorch", True),
                                              ("dtriv", False)])
def test_square_torch_geotorch_and_twin_orthogonal_gain_rgd(kind, use_modules):
    """torch's orthogonal (found with and without ``modules``), geotorch's and dtriv's twin:
    with K = 1 and SGD, W <- W expm(-lr (W^T G - G^T W)); the base follows the weight."""
    n, lr = 6, 0.05
    lin = _square_model(kind, n=n)
    f, grad = _square_loss_fn(n, 7)
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=lr), K=1,
                                modules=lin if use_modules else None, reproject_every=5)
    assert [t.kind for t in opt.targets] == [kind]
    W = _weight(lin)
    base0 = lin.parametrizations.weight[0].base.clone()
    for _ in range(20):
        W = _so_rgd_reference(W, grad(W), lr)
        opt.zero_grad()
        f(lin.weight).backward()
        opt.step()
    torch.testing.assert_close(_weight(lin), W, rtol=0, atol=1e-10)
    base = lin.parametrizations.weight[0].base
    assert (base - base0).abs().max() > 1e-2  # the base moved
    torch.testing.assert_close(base, W, rtol=0, atol=1e-12)


def test_torch_square_refresh_equals_torch_assignment():
    """For square weights the refresh is torch's own ``module.weight = module.weight``."""
    ours, theirs = _square_model("torch", seed=1), _square_model("torch", seed=1)
    with torch.no_grad():
        for m in (ours, theirs):
            m.parametrizations.weight.original.normal_(generator=_gen(2))
    opt = DynamicTrivialization(torch.optim.SGD(ours.parameters(), lr=0.1), K=1)
    opt.refresh()
    with torch.no_grad():
        theirs.weight = theirs.weight
    torch.testing.assert_close(ours.parametrizations.weight[0].base,
                               theirs.parametrizations.weight[0].base, rtol=0, atol=1e-13)
    assert torch.equal(ours.parametrizations.weight.original,
                       theirs.parametrizations.weight.original)


@pytest.mark.parametrize("kind,omap", [("torch", "householder"), ("torch", "cayley"),
                                       ("torch", "matrix_exp"), ("geotorch", None)])
@pytest.mark.parametrize("shape", [(8, 3), (3, 8)])
def test_rectangular_torch_and_geotorch_weights_stay_orthogonal(kind, omap, shape):
    n, k = max(shape), min(shape)
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=False).to(DT)
    if kind == "torch":
        P.orthogonal(lin, "weight", orthogonal_map=omap)
    else:
        geotorch.orthogonal(lin, "weight")
    plist = lin.parametrizations.weight
    A = _sym(n, 9)

    def tall(W):
        return W if shape[0] >= shape[1] else W.T

    opt = DynamicTrivialization(torch.optim.Adam(lin.parameters(), lr=0.05), K=3, modules=lin)
    base0 = plist[0].base.clone()
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = -(tall(lin.weight) * (A @ tall(lin.weight))).sum()
        loss.backward()
        losses.append(loss.item())
        W_before = _weight(lin)
        opt.step()
        if opt.steps % 3 == 0:
            # the refresh does not move the weight: forward(original) recomputes it
            W_step = _weight(lin)
            with torch.no_grad():
                W_reeval = plist[0](plist.original)
            torch.testing.assert_close(W_reeval, W_step, rtol=0, atol=1e-12)
            assert not torch.equal(W_step, W_before)
    W = _weight(lin)
    Wt = W if shape[0] >= shape[1] else W.T
    torch.testing.assert_close(Wt.T @ Wt, torch.eye(k, dtype=DT), rtol=0, atol=1e-12)
    base = plist[0].base
    torch.testing.assert_close(base.T @ base, torch.eye(n, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(base[:, :k], Wt, rtol=0, atol=1e-12)
    assert (base - base0).abs().max() > 1e-2
    assert losses[-1] < losses[0]


def test_geotorch_sphere_is_refreshed_through_its_right_inverse():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).to(DT)
    geotorch.sphere(lin, "bias")
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=0.1), K=2,
                                reproject_every=1)
    assert [t.kind for t in opt.targets] == ["geotorch"]
    c = torch.randn(4, generator=_gen(1), dtype=DT)
    base0 = lin.parametrizations.bias[0].base.clone()
    for _ in range(4):
        opt.zero_grad()
        (-(lin.bias * c).sum()).backward()
        b = lin.bias.detach().clone()
        opt.step()
    bias = lin.bias.detach()
    torch.testing.assert_close(lin.parametrizations.bias[0].base, bias, rtol=0, atol=1e-14)
    assert torch.count_nonzero(lin.parametrizations.bias.original) == 0
    assert abs(bias.norm().item() - 1) < 1e-14
    assert (bias - base0).abs().max() > 1e-2 and not torch.equal(bias, b)


@pytest.mark.parametrize("kind", ["constrain", "twin"])
def test_optimizers_over_dtriv_parameters_pickle(kind):
    """The parameter's link to its trivialization is a weak link that pickles (as a dead
    link): an optimizer holding dtriv's parameters, and the wrapper, can be pickled (a raw
    ``weakref.ref`` made ``pickle`` fail), and a parameter loaded alone has no trivialization."""
    import pickle

    model = nn.Linear(5, 5)
    if kind == "constrain":
        constrain(model, "weight", Orthogonal(5))
    else:
        dtriv_orthogonal(model, "weight", use_trivialization=True)
    original = model.parametrizations.weight.original
    assert original._dtriv_trivialization() is model.parametrizations.weight[0]
    wrapper = DynamicTrivialization(torch.optim.SGD(model.parameters(), lr=0.1), K=2)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        wrapper.zero_grad()
        model(x).square().sum().backward()
        wrapper.step()
    inner = pickle.loads(pickle.dumps(wrapper.optimizer))
    assert inner.state_dict()["param_groups"] == wrapper.optimizer.state_dict()["param_groups"]
    loaded = pickle.loads(pickle.dumps(wrapper))
    assert (loaded.steps, loaded.refreshes, loaded.K) == (wrapper.steps, wrapper.refreshes, 2)
    p = pickle.loads(pickle.dumps(original))
    assert torch.equal(p, original) and p._dtriv_trivialization() is None


def test_add_param_group_finds_modules_outside_the_hint():
    # modules= limits the constructor's search; a group added later may belong elsewhere
    torch.manual_seed(0)
    a, b = nn.Linear(5, 5), nn.Linear(5, 5)
    for m in (a, b):
        P.orthogonal(m, "weight", use_trivialization=True)
    opt = DynamicTrivialization(torch.optim.SGD(a.parameters(), lr=0.1), K=1, modules=a)
    opt.add_param_group({"params": list(b.parameters())})
    assert len(opt.targets) == 2
    x = torch.randn(3, 5)
    for _ in range(3):
        opt.zero_grad()
        (a(x).sin().sum() + b(x).sin().sum()).backward()
        opt.step()
    for m in (a, b):  # refreshed: torch's base moved, original back at its origin (-I)
        original = m.parametrizations.weight.original.detach()
        assert (original + torch.eye(5)).abs().max().item() == 0.0


def test_state_dict_hooks_registered_on_the_wrapper_run():
    lin = _stiefel_linear()
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=0.1), K=2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load_pre", "extra" in sd)))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    state = opt.state_dict()
    assert state["extra"] == 1 and calls == ["pre"]
    state.pop("extra")
    opt.load_state_dict(state)
    assert calls == ["pre", ("load_pre", False), "load_post"]


@pytest.mark.parametrize("kind", ["constrain", "twin", "torch"])
def test_a_removed_parametrization_is_no_longer_refreshed(kind):
    # after remove_parametrizations(leave_parametrized=True) the parameter is a plain weight:
    # a refresh overwrote it (with constrain, by zeros)
    from torch.nn.utils import parametrize

    make = {"constrain": lambda m: constrain(m, "weight", Stiefel(6, 4)),
            "twin": dtriv_orthogonal, "torch": P.orthogonal}[kind]
    x = torch.randn(5, 4, generator=_gen(0))
    torch.manual_seed(0)
    lin = nn.Linear(4, 6)
    make(lin)
    opt = DynamicTrivialization(torch.optim.SGD(lin.parameters(), lr=0.1), K=2, modules=lin)
    for _ in range(3):
        opt.zero_grad()
        lin(x).square().sum().backward()
        opt.step()
    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    W = lin.weight.detach().clone()
    opt.zero_grad()
    lin(x).square().sum().backward()
    opt.step()  # the fourth step: a refresh step for K = 2
    torch.testing.assert_close(lin.weight.detach(), W - 0.1 * lin.weight.grad)
    assert opt.targets == []


def test_compiled_step_refreshes_without_new_graphs_and_matches_eager():
    # the refresh and the finiteness check read values on the host: traced by dynamo, each
    # refresh added graphs (17 after 20 steps with K = 3). They now run as eager code; the
    # inner optimizer's step is compiled once.
    from torch._dynamo.utils import counters

    weights, graphs = [], []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        m = nn.Linear(8, 8, bias=False)
        dtriv_orthogonal(m)
        opt = DynamicTrivialization(torch.optim.Adam(m.parameters(), lr=0.1), K=3)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        target = torch.randn(4, 8, generator=_gen(99))
        for i in range(10):  # (an orthogonal W leaves |W x| as it is: a target instead)
            (m(torch.randn(4, 8, generator=_gen(i))) - target).square().sum().backward()
            step()
            opt.zero_grad()
            graphs.append(counters["stats"]["unique_graphs"])
        weights.append(m.weight.detach().clone())
    assert opt.refreshes == 3
    assert graphs[10] == graphs[-1] == 1, graphs[10:]
    # (compiled Adam rounds differently from the eager one: 6e-6 after ten steps)
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_skip_warning_names_the_callers_line(compiled):
    # stacklevel=3 named a line of torch's step hooks (torch/optim/optimizer.py), and since
    # _gradients_finite runs through outside_compiled_graphs one of dtriv's wrapper.py:
    # warnings filters by module and the reported location then missed the training loop
    import warnings

    torch._dynamo.reset()
    m = nn.Linear(4, 4, bias=False)
    dtriv_orthogonal(m)
    opt = DynamicTrivialization(torch.optim.SGD(m.parameters(), lr=0.1), K=2,
                                nonfinite="skip")
    step = torch.compile(opt.step, backend="eager") if compiled else opt.step
    m.parametrizations.weight.original.grad = torch.full((4, 4), float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    skipped = [w for w in caught if "skipped a step" in str(w.message)]
    assert len(skipped) == 1 and opt.skipped_steps == 1
    assert skipped[0].filename == __file__, (skipped[0].filename, skipped[0].lineno)


def test_skipped_steps_survive_a_state_dict_round_trip():
    """The count of skipped non-finite steps is saved and restored by ``load_state_dict`` into a
    fresh wrapper (as ``steps`` and ``refreshes`` are), not reset."""
    m = nn.Linear(4, 4, bias=False).to(DT)
    dtriv_orthogonal(m)
    opt = DynamicTrivialization(torch.optim.SGD(m.parameters(), lr=0.1), K=3, nonfinite="skip")
    original = m.parametrizations.weight.original
    original.grad = torch.ones_like(original)
    opt.step()
    original.grad = torch.full_like(original, float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped a step with a non-finite gradient"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.steps == 1
    saved = copy.deepcopy(opt.state_dict())
    fresh = DynamicTrivialization(torch.optim.SGD(m.parameters(), lr=0.1), K=3,
                                  nonfinite="skip")
    assert fresh.skipped_steps == 0
    fresh.load_state_dict(saved)
    assert fresh.skipped_steps == 1 and fresh.steps == 1


class _BaseShift(nn.Module):
    """``W = base + X``: a toy parametrization of someone else's with a ``base`` buffer and
    no right inverse."""

    def __init__(self, base: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("base", base.clone())

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.base + X


class _ShiftedBase(_BaseShift):
    """:class:`_BaseShift` whose right inverse moves the base to ``W`` and returns ``X = 0``
    (as geotorch's ``update_base`` reads one)."""

    def right_inverse(self, W: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.base.copy_(W)
        return torch.zeros_like(W)


def test_another_parametrization_with_a_base_is_refreshed_through_its_right_inverse():
    """A parametrization neither dtriv's, torch's nor geotorch's, with a ``base`` buffer and a
    ``right_inverse``: a ``generic`` target; each refresh (every K = 2 steps) leaves the
    weight as the step made it, with the base moved there and ``X`` reset to 0; between
    refreshes ``X`` carries the steps."""
    lin = nn.Linear(3, 2).to(DT)
    parametrize.register_parametrization(lin, "weight", _ShiftedBase(lin.weight.detach()))
    plist = lin.parametrizations.weight
    opt = DynamicTrivialization(torch.optim.SGD([plist.original], lr=0.1), K=2)
    assert [t.kind for t in opt.targets] == ["generic"]
    C = torch.randn(2, 3, generator=_gen(2), dtype=DT)
    for step in range(1, 5):
        W = lin.weight.detach().clone()
        opt.zero_grad()
        (lin.weight * C).sum().backward()
        opt.step()
        torch.testing.assert_close(lin.weight.detach(), W - 0.1 * C, rtol=0, atol=1e-14)
        if step % 2 == 0:  # refreshed: the base is the weight, X is zero
            assert torch.count_nonzero(plist.original) == 0
            torch.testing.assert_close(plist[0].base, lin.weight.detach(), rtol=0, atol=0)
        else:
            assert torch.count_nonzero(plist.original) == plist.original.numel()


@pytest.mark.parametrize("case", ["no right_inverse", "base not a tensor"])
def test_a_parametrization_that_cannot_be_refreshed_is_not_a_target(case):
    """A ``base`` without a ``right_inverse``, or a ``base`` that is not a tensor: no target
    (nothing to refresh); the wrapper steps the parameter as the inner optimizer does."""
    lin = nn.Linear(3, 2).to(DT)
    W0 = lin.weight.detach().clone()
    p = (_BaseShift if case == "no right_inverse" else _ShiftedBase)(W0)
    parametrize.register_parametrization(lin, "weight", p, unsafe=True)
    if case == "base not a tensor":
        base = p._buffers.pop("base")
        p.base = base.tolist()  # a plain attribute: forward reads it as a constant
        p.forward = lambda X: torch.as_tensor(p.base, dtype=X.dtype) + X
    original = lin.parametrizations.weight.original
    with pytest.warns(UserWarning, match=r"got none among its 1 parameters \(1 parametrized "
                                         r"without a base\)"):
        opt = DynamicTrivialization(torch.optim.SGD([original], lr=0.1), K=1)
    assert opt.targets == []
    X0 = original.detach().clone()
    lin.weight.sum().backward()
    opt.step()
    torch.testing.assert_close(original.detach(), X0 - 0.1, rtol=0, atol=1e-14)
