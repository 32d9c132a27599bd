"""Models: modReLU, the orthogonal RNN's recurrence, its kernel's constraint and caching."""

from __future__ import annotations

import math

import pytest
import torch

from dtriv.manifolds import generator_init
from dtriv.parametrize import memoize
from experiments import backend
from experiments.models import BaselineRNN, ModReLU, OrthogonalRNN, build_model
from experiments.tasks import AddingTask, CopyingTask

OPTIM = {"name": "rmsprop", "lr": 1e-2, "lr_orth": 1e-2, "K": 5, "state": "keep",
         "momentum": 0.0, "alpha": 0.99, "clip_grad": 0.0}


def model_cfg(**kw):
    return {"name": "orthogonal", "hidden": 8, "init": "henaff", "manifold": "orthogonal",
            "retraction": "expm", **kw}


def test_modrelu_formula():
    torch.manual_seed(0)
    act = ModReLU(6).double()
    assert act.b.abs().max() <= 0.01 and act.b.abs().min() > 0
    with torch.no_grad():
        act.b.copy_(torch.tensor([0.5, -0.5, 0.0, -2.0, 1.0, -0.1], dtype=torch.float64))
    z = torch.tensor([[1.0, 1.0, -3.0, 1.5, -0.25, 0.05],
                      [-1.0, -0.25, 0.0, -3.0, 0.0, -0.2]], dtype=torch.float64)
    expected = torch.tensor([[1.5, 0.5, -3.0, 0.0, -1.25, 0.0],
                             [-1.5, 0.0, 0.0, -1.0, 0.0, -0.1]], dtype=torch.float64)
    assert torch.allclose(act(z), expected, atol=1e-15)
    # elementwise oracle: z / |z| * max(|z| + b, 0), and 0 at z = 0
    z = torch.randn(50, 6, dtype=torch.float64)
    oracle = torch.where(z != 0, z / z.abs(), 0.0) * torch.clamp(z.abs() + act.b, min=0)
    assert torch.allclose(act(z), oracle, atol=1e-15)


def test_orthogonal_rnn_recurrence_matches_the_formula():
    torch.manual_seed(1)
    rnn = OrthogonalRNN(3, 5, 2, output="sequence").double()
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    W, U = rnn.recurrent.weight, rnn.input_kernel.weight
    b, V, c = rnn.nonlinearity.b, rnn.readout.weight, rnn.readout.bias
    h = torch.zeros(4, 5, dtype=torch.float64)
    outs = []
    for t in range(7):
        z = h @ W.T + x[:, t] @ U.T  # W h_t + U x_t
        h = torch.sign(z) * torch.relu(z.abs() + b)
        outs.append(h @ V.T + c)
    assert torch.allclose(rnn(x), torch.stack(outs, 1), atol=1e-13)
    rnn.output = "last"
    assert torch.allclose(rnn(x), outs[-1], atol=1e-13)


@pytest.mark.parametrize("K, retraction, init", [
    (5, "expm", "henaff"), (math.inf, "expm", "cayley"), (5, "cayley", "cayley"),
    (math.inf, "cayley", "cayley"),
])
def test_initial_kernel_is_expm_of_the_generator(K, retraction, init):
    task = CopyingTask(3, seed=0)
    m = build_model(model_cfg(init=init, retraction=retraction), {**OPTIM, "K": K}, task,
                    torch.Generator().manual_seed(7))
    A = generator_init(8, init, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    W = m.recurrent.weight
    assert W.dtype == torch.float32
    assert torch.allclose(W.double(), torch.linalg.matrix_exp(A), atol=2e-6)
    # float32 matrix_exp (the static map) can be off the group by ~3e-5 for some norms
    assert backend.constraint_error(m) < (1e-4 if math.isinf(K) else 1e-6)


def _count_kernel_evaluations(model):
    """Count the evaluations of the kernel's map (reads that reuse the memo are not)."""
    memoize(model)  # drops a value memoized while the model was built
    calls = []
    param = model.recurrent.parametrizations.weight[0]
    evaluate = param._evaluate

    def counting(X):
        calls.append(1)
        return evaluate(X)

    param._evaluate = counting
    return calls


@pytest.mark.parametrize("K", [3, math.inf])
def test_kernel_computed_once_per_forward(K):
    # the cell reads W at each of the 30 steps; the library's default path computes it once
    task = CopyingTask(10, seed=0)
    m = build_model(model_cfg(), {**OPTIM, "K": K}, task, torch.Generator().manual_seed(0))
    reads = []
    m.recurrent.register_forward_pre_hook(lambda *_: reads.append(1))
    calls = _count_kernel_evaluations(m)
    x, y = task.batch(4)
    out = m(x)
    assert len(reads) == x.shape[1] and len(calls) == 1
    task.loss(out, y)[0].backward()
    assert len(calls) == 1
    m(x)
    assert len(calls) == 2  # backward consumed the first value: a new forward recomputes


@pytest.mark.parametrize("K", [3, math.inf])
def test_gradients_equal_those_of_the_recompute_per_read_forward(K):
    task = CopyingTask(6, seed=0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(model_cfg(), {**OPTIM, "K": K}, task,
                                  torch.Generator().manual_seed(0)).double())
    assert memoize(models[1], False) == 1
    with torch.no_grad():
        for m in models:
            m.recurrent.parametrizations.weight.original.normal_(
                0, 0.1, generator=torch.Generator().manual_seed(3))
    x, _ = task.batch(3)
    grads = []
    for m in models:
        m(x.double()).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("optim", [
    {"K": 4}, {"K": 1, "name": "sgd", "lr_orth": 0.5}, {"K": math.inf},
    {"name": "riemannian_adam"}, {"name": "riemannian_sgd", "lr_orth": 0.5},
])
@pytest.mark.parametrize("retraction", ["expm", "cayley"])
def test_kernel_stays_orthogonal_during_training(optim, retraction):
    task = CopyingTask(4, seed=0)
    cfg = {**OPTIM, **optim}
    m = build_model(model_cfg(retraction=retraction), cfg, task,
                    torch.Generator().manual_seed(0))
    opt = backend.build_optimizer(cfg, m, retraction)
    kernel = backend.constrained_parameters(m)
    assert len(kernel) == 1 and opt.param_groups[0]["params"] == kernel
    assert opt.param_groups[0]["lr"] == cfg["lr_orth"]
    W0 = m.recurrent.weight.detach().clone()
    eye = torch.eye(8)
    for _ in range(12):
        x, y = task.batch(8)
        loss, _ = task.loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        W = m.recurrent.weight.detach()
        assert (W.T @ W - eye).abs().max() < 1e-5
    assert (W - W0).abs().max() > 1e-3  # it did train
    assert backend.constraint_error(m) == pytest.approx((W.T @ W - eye).abs().max().item(),
                                                        abs=2e-6)


def test_dynamic_refresh_every_K_steps():
    task = CopyingTask(4, seed=0)
    cfg = {**OPTIM, "K": 3}
    m = build_model(model_cfg(), cfg, task, torch.Generator().manual_seed(0))
    opt = backend.build_optimizer(cfg, m, "expm")
    original = m.recurrent.parametrizations.weight.original
    for step in range(1, 7):
        x, y = task.batch(4)
        opt.zero_grad()
        task.loss(m(x), y)[0].backward()
        opt.step()
        assert (original.abs().max() == 0) == (step % 3 == 0)


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_baselines(kind):
    seq = BaselineRNN(kind, 10, 6, 9, output="sequence")
    task = AddingTask(12, seed=0)
    last = build_model({**model_cfg(), "name": kind}, OPTIM, task, torch.Generator())
    assert seq(torch.randn(3, 5, 10)).shape == (3, 5, 9)
    assert last(task.batch(3)[0]).shape == (3, 1)
    assert backend.constraint_error(last) is None
    assert len(backend.build_optimizer(OPTIM, last).param_groups) == 1


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_baselines_equal_a_plain_torch_rnn_and_readout(kind):
    """The baseline is a tanh ``nn.RNN`` / ``nn.LSTM`` and a linear readout of every state
    (``"sequence"``) or of the final one (``"last"``, torch's ``h_n``): the same weights in
    plain torch modules give the same outputs (shapes alone missed a wrong step or tanh)."""
    torch.manual_seed(2)
    model = BaselineRNN(kind, 3, 5, 4, output="sequence").double()
    cell = (torch.nn.RNN(3, 5, batch_first=True, nonlinearity="tanh") if kind == "rnn"
            else torch.nn.LSTM(3, 5, batch_first=True)).double()
    readout = torch.nn.Linear(5, 4).double()
    cell.load_state_dict(model.rnn.state_dict())
    readout.load_state_dict(model.readout.state_dict())
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    with torch.no_grad():
        states, final = cell(x)
        h_n = final if kind == "rnn" else final[0]
        expected = {"sequence": readout(states), "last": readout(h_n[-1])}
        assert expected["sequence"].shape == (4, 7, 4) and expected["last"].shape == (4, 4)
        # states differ across steps, so a readout of another step is detected
        assert (expected["last"] - readout(states[:, 0])).abs().max() > 1e-3
        for output in ("sequence", "last"):
            model.output = output
            torch.testing.assert_close(model(x), expected[output], rtol=0, atol=1e-13)


def test_a_static_map_that_cannot_reach_the_initial_kernel_names_the_config_keys():
    # qr at the identity reaches only some orthogonal matrices; a henaff kernel is usually not
    # one of them (the library's own error alone did not say which settings to change)
    from dtriv.manifolds import Orthogonal

    failures = 0
    for seed in range(6):
        layer = torch.nn.Linear(16, 16, bias=False)
        try:
            backend.constrain_kernel(layer, Orthogonal(16), "qr", False, "henaff",
                                     torch.Generator().manual_seed(seed))
        except ValueError as err:
            failures += 1
            message = str(err)
            assert message.startswith("model.init = 'henaff' with model.retraction = 'qr' and "
                                      "optim.K = inf")
            assert "use a finite optim.K" in message
    assert failures > 0
