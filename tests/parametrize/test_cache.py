"""Once per forward: an RNN reading its constrained kernel at every step computes it once.

By default through the memo of dtriv's parametrizations (``ForwardMemo``); opt-in for any
parametrization through ``cache_per_forward`` (torch's ``cached()``). Every test compares with
the recompute-per-read forward (``memoize(model, False)``), the behaviour of torch's
parametrizations.
"""

from __future__ import annotations

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
import torch.nn.utils.parametrize as torch_parametrize
from torch import nn

import dtriv
from dtriv.manifolds import Orthogonal, Stiefel
from dtriv.parametrize import (
    ForwardMemo,
    cache_per_forward,
    cached,
    constrain,
    memoize,
    orthogonal,
    refresh,
)
from dtriv.retractions._common import backward_ran, reports_backward_of

F64 = torch.float64
STEPS = 12

# how the recurrent kernel is constrained: dtriv's trivialization, the orthogonal twin with its
# default (trivialized matrix_exp) and with the bare maps
KINDS = ["constrain", "twin", "twin-cayley-notriv"]


def constrain_kernel(layer, kind):
    if kind == "constrain":
        constrain(layer, "weight", Orthogonal(layer.weight.shape[0]))
    elif kind == "twin":
        orthogonal(layer)
    elif kind == "twin-cayley-notriv":
        orthogonal(layer, orthogonal_map="cayley", use_trivialization=False)
    else:
        raise AssertionError(kind)


class RNN(nn.Module):
    """``h <- tanh(W h + U x_t)``: reads ``recurrent.weight`` at every step."""

    def __init__(self, n_in=3, n_hidden=6, seed=0, kind="constrain", memo=True):
        super().__init__()
        torch.manual_seed(seed)
        self.input = nn.Linear(n_in, n_hidden).double()
        self.recurrent = nn.Linear(n_hidden, n_hidden, bias=False).double()
        constrain_kernel(self.recurrent, kind)
        with torch.no_grad():  # a non-trivial point of the chart
            self.recurrent.parametrizations.weight.original.normal_(0, 0.3)
        self.n_hidden = n_hidden
        memoize(self, memo)

    def forward(self, x):  # x: (steps, batch, n_in)
        h = x.new_zeros(x.shape[1], self.n_hidden)
        for x_t in x:
            h = torch.tanh(self.recurrent(h) + self.input(x_t))
        return h


def kernel_param(model):
    return model.recurrent.parametrizations.weight.original


def count_maps(model):
    """Count the evaluations of the map (memo hits are not evaluations)."""
    param = model.recurrent.parametrizations.weight[0]
    evaluate = param._evaluate
    counter = {"calls": 0}

    def counting(X):
        counter["calls"] += 1
        return evaluate(X)

    param._evaluate = counting
    return counter


def perturb_(param, seed=0, scale=0.1):
    """Add a random step in place (a constant would not change the skew part)."""
    g = torch.Generator().manual_seed(seed)
    param.add_(scale * torch.randn(param.shape, generator=g, dtype=param.dtype))


def inputs(seed=1, steps=STEPS):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(steps, 4, 3, generator=g, dtype=F64)


def loss_and_grads(model, x):
    model.zero_grad()
    loss = model(x).square().sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(grads, reference, rtol=1e-10, atol=1e-12):
    assert grads.keys() == reference.keys()
    for name in grads:
        assert torch.allclose(grads[name], reference[name], rtol=rtol, atol=atol), name


# ------------------------------------------------------------------ the default memo
@pytest.mark.parametrize("kind", KINDS)
def test_default_computes_once_per_forward_with_the_uncached_gradients(kind):
    x = inputs()
    plain = RNN(seed=2, kind=kind, memo=False)
    counter_plain = count_maps(plain)
    loss_plain, grads_plain = loss_and_grads(plain, x)
    assert counter_plain["calls"] == STEPS  # torch's behaviour: one map per read

    model = RNN(seed=2, kind=kind)
    counter = count_maps(model)
    loss, grads = loss_and_grads(model, x)
    assert counter["calls"] == 1
    assert torch.allclose(loss, loss_plain, rtol=1e-12, atol=0)
    assert_same_grads(grads, grads_plain)
    # backward consumed the graph: the memo is gone, the next forward computes afresh
    assert model.recurrent.parametrizations.weight[0]._memo.value is None
    model(x)
    assert counter["calls"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_through_the_memo(kind):
    # three reads of the weight per call share one memoized value; gradcheck perturbs its input
    # through ``.data`` (invisible to version counters), so each call reads a fresh tensor
    model = RNN(n_hidden=4, seed=3, kind=kind)
    x = inputs(steps=3)[:, :2]
    key = "recurrent.parametrizations.weight.original"
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    counter = count_maps(model)

    def f(X):
        return torch.func.functional_call(
            model, {**params, **buffers, key: X.clone()}, (x,)
        )

    X = kernel_param(model).detach().clone().requires_grad_()
    f(X)
    assert counter["calls"] == 1  # functional_call goes through the memo (3 reads)
    assert torch.autograd.gradcheck(f, (X,))


@pytest.mark.parametrize("kind", KINDS)
def test_a_value_without_graph_sees_writes_through_data(kind):
    """``.data`` writes bypass the version counter; a value read under ``no_grad`` (a target
    network's, which no backward ever drops) checks a sample of the parameter's entries, so a
    soft update ``p.data.copy_(...)`` is seen, as are writes to one row or one column."""
    model = RNN(seed=21, kind=kind)
    X = kernel_param(model)
    with torch.no_grad():
        first = model.recurrent.weight.clone()
        assert model.recurrent.weight is model.recurrent.weight  # memoized
        X.data.copy_(0.9 * X.data + 0.1 * torch.ones_like(X))  # a soft update
        soft = model.recurrent.weight.clone()
        assert not torch.allclose(soft, first)
        X.data[:, 4].add_(0.5)  # one column
        column = model.recurrent.weight.clone()
        assert not torch.allclose(column, soft)
        X.data[2].add_(0.5)  # one row
        assert not torch.allclose(model.recurrent.weight, column)
        memoize(model, False)  # the recomputed value agrees with the memoized one
        fresh = model.recurrent.weight
        memoize(model, True)
        assert torch.equal(model.recurrent.weight, fresh)


@pytest.mark.parametrize("kind", KINDS)
def test_an_eval_read_after_a_fused_adam_step_sees_the_step(kind):
    """torch's fused Adam writes the parameters without bumping their version counters (torch
    2.13, CPU): the sample of the entries tells the memoized eval value is stale. (The
    gradient is set by hand: a forward in grad mode would replace the eval value.)"""
    model = RNN(seed=23, kind=kind)
    X = kernel_param(model)
    opt = torch.optim.Adam([X], lr=0.05, fused=True)
    with torch.no_grad():
        before = model.recurrent.weight.clone()
    X.grad = torch.randn(X.shape, generator=torch.Generator().manual_seed(3), dtype=X.dtype)
    opt.step()  # bumps no version counter
    with torch.no_grad():
        after = model.recurrent.weight
        memoize(model, False)
        assert torch.equal(after, model.recurrent.weight)
    assert not torch.allclose(after, before)


def test_a_value_with_graph_sees_writes_through_data_after_backward_or_clear():
    """The documented limit of a value read in grad mode: it has no sample (taking one costs
    more than a small map's forward can spare), so a write through ``.data`` is seen once
    backward has consumed the value, or after ``memoize(model)``."""
    model = RNN(seed=22)
    X = kernel_param(model)
    stale = model.recurrent.weight
    X.data.mul_(0.9).add_(0.01)
    assert model.recurrent.weight is stale
    memoize(model)  # clears
    fresh = model.recurrent.weight
    assert not torch.allclose(fresh, stale)
    fresh.sum().backward()
    X.data.mul_(0.9)
    assert not torch.allclose(model.recurrent.weight, fresh)


def test_a_write_that_misses_the_sample_is_the_documented_limit():
    from dtriv.parametrize.cache import _sample_index

    layer = nn.Linear(64, 64, bias=False).double()
    constrain_kernel(layer, "constrain")
    X = layer.parametrizations.weight.original
    sampled = set((_sample_index(X.numel(), X.element_size()) // X.element_size()).tolist())
    missed = next(i for i in range(X.numel()) if i not in sampled)
    with torch.no_grad():
        stale = layer.weight
        X.data.view(-1)[missed] += 0.5  # one entry outside the sample
        assert layer.weight is stale  # not seen
        memoize(layer)  # clears
        assert not torch.allclose(layer.weight, stale)


@pytest.mark.parametrize("kind", KINDS)
def test_two_forwards_one_backward(kind):
    x1, x2 = inputs(1), inputs(2)

    def run(model):
        model.zero_grad()
        (model(x1).sum() + model(x2).square().sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = RNN(seed=4, kind=kind, memo=False)
    model = RNN(seed=4, kind=kind)
    counter = count_maps(model)
    assert_same_grads(run(model), run(plain))
    assert counter["calls"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_twice_without_a_step(kind):
    x = inputs()
    plain = RNN(seed=5, kind=kind, memo=False)
    model = RNN(seed=5, kind=kind)
    counter = count_maps(model)
    for _ in range(2):  # gradient accumulation: no "backward through the graph a second time"
        model(x).square().sum().backward()
        plain(x).square().sum().backward()
    assert counter["calls"] == 2
    assert_same_grads({n: p.grad for n, p in model.named_parameters()},
                      {n: p.grad for n, p in plain.named_parameters()})


@pytest.mark.parametrize("kind", KINDS)
def test_autograd_grad_consumes_the_memo(kind):
    # torch.autograd.grad frees the graph without touching any .grad of the parameters: the
    # next forward must still compute a fresh value (no "backward a second time" error)
    x = inputs()
    plain = RNN(seed=8, kind=kind, memo=False)
    model = RNN(seed=8, kind=kind)
    counter = count_maps(model)
    for _ in range(2):
        got = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
        want = torch.autograd.grad(plain(x).square().sum(), list(plain.parameters()))
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert counter["calls"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_backward_drops_the_memoized_value(kind):
    # backward reaches the memoized value: its node records it (dtriv's own nodes set a flag;
    # on any other node a pre-hook sees d loss / d W, unchanged, not copied into W.grad, which
    # stays None as for torch's parametrized tensors), and the memo no longer hands it out
    model = RNN(seed=9, kind=kind)
    W = model.recurrent.weight
    C = torch.randn(W.shape, dtype=F64)
    memo = model.recurrent.parametrizations.weight[0]._memo
    assert memo.value is W
    node = W.grad_fn
    own = reports_backward_of(node)
    assert own == (kind == "twin-cayley-notriv")  # the others end in a product with the base
    assert memo._entry[5] is node if own else memo._entry[5] == []
    assert not backward_ran(node)
    ((W * C).sum() + (W * C).sum()).backward()  # two reads of one value
    assert not W.retains_grad
    if own:
        assert backward_ran(node)
    else:
        (grads,) = memo._entry[5]
        assert torch.equal(grads[W.output_nr], 2 * C)
    assert memo.value is None
    W2 = model.recurrent.weight
    assert W2 is not W and not W2.retains_grad
    assert torch.equal(W2, W)


def test_retain_graph_backward_twice():
    x = inputs()
    plain, model = RNN(seed=6, memo=False), RNN(seed=6)
    for m in (plain, model):
        loss = m(x).square().sum()
        loss.backward(retain_graph=True)
        loss.backward()
    assert_same_grads({n: p.grad for n, p in model.named_parameters()},
                      {n: p.grad for n, p in plain.named_parameters()})


def test_separate_backwards_of_two_forwards_share_one_graph():
    # the documented limit (that of torch's cached()): two forwards with nothing changed between
    # them share the graph of the map, which the first backward frees
    x = inputs()
    model = RNN(seed=7)
    a, b = model(x).sum(), model(x).square().sum()
    a.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        b.backward()
    # retain_graph on the first one, or the opt-out, make it work
    model.zero_grad()
    a, b = model(x).sum(), model(x).square().sum()
    a.backward(retain_graph=True)
    b.backward()
    memoize(model, False)
    a, b = model(x).sum(), model(x).square().sum()
    a.backward()
    b.backward()


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.05, foreach=True),
    "adam-for-loop": lambda p: torch.optim.Adam(p, lr=0.05, foreach=False),
}


@pytest.mark.parametrize("kind, opt_name", list(zip(KINDS, OPTIMIZERS)))
def test_optimizer_step_invalidates(kind, opt_name):
    make_opt = OPTIMIZERS[opt_name]
    x = inputs()
    model = RNN(seed=8, kind=kind)
    plain = RNN(seed=8, kind=kind, memo=False)
    opts = [make_opt(model.parameters()), make_opt(plain.parameters())]
    for _ in range(2):
        for m, opt in zip((model, plain), opts):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
        # a read in no_grad mode after the step (as an evaluation would do)
        with torch.no_grad():
            assert torch.allclose(model(x), plain(x), rtol=1e-10, atol=1e-12)
    assert torch.allclose(model.recurrent.weight, plain.recurrent.weight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["constrain", "twin"])
def test_refresh_invalidates(kind):
    x = inputs()
    model = RNN(seed=9, kind=kind)
    counter = count_maps(model)
    with torch.no_grad():
        before = model(x)
        memo = model.recurrent.parametrizations.weight[0]._memo
        assert memo.value is not None
        assert refresh(model) == 1
        assert memo.value is None  # dropped explicitly
        after = model(x)
    assert counter["calls"] == 2
    assert torch.allclose(before, after, rtol=1e-9, atol=1e-11)
    assert not kernel_param(model).any()


def test_assignment_and_in_place_edits_invalidate():
    model = RNN(seed=10)
    W = model.recurrent.weight.detach()
    Q = Orthogonal(6).sample(generator=torch.Generator().manual_seed(0), dtype=F64)
    model.recurrent.weight = Q
    assert torch.allclose(model.recurrent.weight, Q, atol=1e-12)
    model.recurrent.weight = W
    # the memoized value edited in place by the user is not handed out again
    with torch.no_grad():
        value = model.recurrent.weight
        value.mul_(2)
    assert torch.allclose(model.recurrent.weight, W, atol=1e-12)


@pytest.mark.parametrize("kind", ["constrain", "twin"])
def test_grad_modes(kind):
    x = inputs()
    plain = RNN(seed=11, kind=kind, memo=False)
    _, grads_plain = loss_and_grads(plain, x)
    model = RNN(seed=11, kind=kind)
    counter = count_maps(model)
    with torch.no_grad():
        model(x)
    with torch.inference_mode():
        model(x)
    assert counter["calls"] == 2
    assert model.recurrent.weight.requires_grad
    _, grads = loss_and_grads(model, x)  # not the no-grad value
    assert_same_grads(grads, grads_plain)
    # a parameter that stops requiring grad
    kernel_param(model).requires_grad_(False)
    assert not model.recurrent.weight.requires_grad
    kernel_param(model).requires_grad_(True)
    assert model.recurrent.weight.requires_grad


def test_no_grad_reads_are_memoized():
    model = RNN(seed=12)
    counter = count_maps(model)
    with torch.no_grad():
        model(inputs())
        model(inputs())
    assert counter["calls"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_an_inference_value_edited_in_place_is_not_handed_out_again(kind):
    # inference tensors have no version counter: the memo samples the value itself
    model = RNN(seed=13, kind=kind)
    with torch.no_grad():
        reference = model.recurrent.weight.clone()
    counter = count_maps(model)
    with torch.inference_mode():
        model(inputs())  # one map for every step of the sequence
        assert counter["calls"] == 1
        W = model.recurrent.weight
        W.mul_(2)  # an edit of the read value (say, for an export)
        again = model.recurrent.weight
    assert counter["calls"] == 2
    torch.testing.assert_close(again, reference, rtol=0, atol=0)


def test_dtype_change_and_data_assignment_invalidate():
    model = RNN(seed=13)
    model.recurrent.weight
    model.float()
    assert model.recurrent.weight.dtype == torch.float32
    model.double()
    W = model.recurrent.weight.detach().clone()
    param = kernel_param(model)
    param.data = torch.zeros_like(param)  # no version bump, a new storage
    assert not torch.allclose(model.recurrent.weight, W)


@pytest.mark.parametrize("kind", ["constrain", "twin"])
def test_functional_call(kind):
    x = inputs()
    model = RNN(seed=14, kind=kind)
    own = model(x).detach()
    key = "recurrent.parametrizations.weight.original"
    params = {n: p.detach() for n, p in model.named_parameters()}
    X = torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = torch.func.functional_call(model, {**params, **dict(model.named_buffers()), key: X},
                                     (x,))
    reference = RNN(seed=14, kind=kind, memo=False)
    with torch.no_grad():
        kernel_param(reference).copy_(X)
    assert torch.allclose(out, reference(x), rtol=1e-10, atol=1e-12)
    # the module's own parameter is read again afterwards
    assert torch.allclose(model(x), own, rtol=1e-12, atol=1e-14)


def test_torch_func_grad_and_vmap_bypass_the_memo():
    model = RNN(n_hidden=4, seed=15)
    x = inputs(steps=4)
    key = "recurrent.parametrizations.weight.original"
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(X):
        return torch.func.functional_call(model, {**params, **buffers, key: X}, (x,)).sum()

    X = kernel_param(model).detach().clone()
    grad = torch.func.grad(loss)(X)
    model.zero_grad()
    model(x).sum().backward()
    assert torch.allclose(grad, kernel_param(model).grad, rtol=1e-10, atol=1e-12)
    Xs = X + 0.1 * torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    batched = torch.func.vmap(loss)(Xs)
    for X_i, value in zip(Xs, batched):
        assert torch.allclose(loss(X_i), value, rtol=1e-10, atol=1e-12)


def test_jit_trace_bypasses_the_memo():
    model = RNN(n_hidden=4, seed=16)
    x = inputs(steps=3)
    model(x)  # a memoized value exists
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)
    with torch.no_grad():
        perturb_(kernel_param(model), scale=0.01)
    # the trace recorded the map, not the memoized tensor as a constant
    assert torch.allclose(traced(x), model(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["constrain", "twin"])
def test_deepcopy_pickle_and_state_dict(kind):
    x = inputs()
    model = RNN(seed=17, kind=kind)
    out = model(x)  # a live memo with its graph
    clone = copy.deepcopy(model)
    assert torch.allclose(clone(x), out, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        perturb_(kernel_param(clone))
    assert not torch.allclose(clone(x), out)
    assert torch.allclose(model(x), out, rtol=1e-12, atol=1e-14)
    # a parametrization pickles without its memo (torch pickles parametrized modules only
    # through state_dict)
    parametrization = model.recurrent.parametrizations.weight[0]
    assert parametrization._memo.value is not None
    buffer = io.BytesIO()
    torch.save(parametrization, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded._memo.value is None
    X = kernel_param(model).detach()
    assert torch.allclose(loaded(X), model.recurrent.weight, rtol=1e-12, atol=1e-14)
    # loading the clone's state invalidates the memo
    model(x)
    model.load_state_dict(clone.state_dict())
    assert model.recurrent.parametrizations.weight[0]._memo.value is None
    assert torch.allclose(model(x), clone(x), rtol=1e-12, atol=1e-14)


def memoized_and_reference(kind, seed):
    """Inputs, a memoizing RNN (its map evaluations counted, gradients zeroed) and the
    gradients of the same RNN without the memo."""
    x = inputs()
    _, reference = loss_and_grads(RNN(seed=seed, kind=kind, memo=False), x)
    model = RNN(seed=seed, kind=kind)
    counter = count_maps(model)
    model.zero_grad()
    return x, model, counter, reference


def checkpointed_forward(model, x, chunk, reentrant):
    """``model``'s RNN forward with every ``chunk`` steps in one ``torch.utils.checkpoint``."""
    from torch.utils.checkpoint import checkpoint

    def steps(h, xs):
        for x_t in xs:
            h = torch.tanh(model.recurrent(h) + model.input(x_t))
        return h

    h = x.new_zeros(x.shape[1], model.n_hidden).requires_grad_(reentrant)
    for i in range(0, x.shape[0], chunk):
        h = checkpoint(steps, h, x[i:i + chunk], use_reentrant=reentrant)
    return h


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk,reentrant", [(1, False), (4, False), (4, True)])
def test_checkpointed_regions_recompute_what_their_forward_computed(kind, chunk, reentrant):
    """Non-reentrant checkpointing runs each region again in backward and requires the same
    tensors to be saved: the memo is shared within a region only (one map per region), so the
    recomputation computes the map where the forward did. (Sharing it across regions raised
    CheckpointError for the twin: 6 tensors saved in the forward, 2 in the recomputation.)"""
    x, model, counter, reference = memoized_and_reference(kind, seed=31)
    loss = checkpointed_forward(model, x, chunk, reentrant).square().sum()
    # the forward: one map per region; reentrant checkpointing runs it under no_grad, with
    # no hooks, so one map in all (its backward recomputes each region with grad enabled)
    assert counter["calls"] == (1 if reentrant else STEPS // chunk)
    loss.backward()
    assert_same_grads({n: p.grad for n, p in model.named_parameters()}, reference)


@pytest.mark.parametrize("kind", KINDS)
def test_one_map_per_forward_under_save_on_cpu(kind):
    x, model, counter, reference = memoized_and_reference(kind, seed=32)
    with torch.autograd.graph.save_on_cpu():
        loss = model(x).square().sum()
    loss.backward()
    assert counter["calls"] == 1
    assert_same_grads({n: p.grad for n, p in model.named_parameters()}, reference)


def test_memo_holds_no_reference_cycle():
    model = RNN(seed=18)
    value = weakref.ref(model.recurrent.weight)
    memo = weakref.ref(model.recurrent.parametrizations.weight[0]._memo)
    assert value() is not None
    del model
    gc.collect()
    assert value() is None and memo() is None


def test_tall_stiefel_and_batched_weights():
    layer = nn.Linear(3, 5, bias=False).double()
    constrain(layer, "weight", Stiefel(5, 3), "cayley")
    ref = nn.Linear(3, 5, bias=False).double()
    constrain(ref, "weight", Stiefel(5, 3), "cayley")
    memoize(ref, False)
    with torch.no_grad():
        layer.parametrizations.weight.original.normal_(0, 0.3)
        ref.parametrizations.weight.original.copy_(layer.parametrizations.weight.original)
        ref.parametrizations.weight[0].base.copy_(layer.parametrizations.weight[0].base)
    x = torch.randn(7, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    for m in (layer, ref):
        m(m(x).tanh()[:, :3]).square().sum().backward()
    g, g_ref = (m.parametrizations.weight.original.grad for m in (layer, ref))
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)


def test_memoize_switch_and_errors():
    model = RNN(seed=19)
    assert memoize(model, False) == 1
    assert model.recurrent.parametrizations.weight[0].memoize is False
    counter = count_maps(model)
    model(inputs())
    assert counter["calls"] == STEPS
    assert memoize(model) == 1
    model(inputs())
    assert counter["calls"] == STEPS + 1
    with pytest.raises(ValueError, match="model: expected a torch.nn.Module, got int"):
        memoize(3)
    with pytest.raises(ValueError, match="enabled: expected True or False, got 1"):
        memoize(model, 1)
    assert isinstance(copy.deepcopy(ForwardMemo()), ForwardMemo)


# ------------------------------------------------------------------ cache_per_forward
def test_cache_per_forward_computes_once_with_equal_gradients():
    x = inputs()
    plain = RNN(seed=2, memo=False)
    loss_plain, grads_plain = loss_and_grads(plain, x)

    model = RNN(seed=2, memo=False)
    counter = count_maps(model)
    handle = cache_per_forward(model)
    loss, grads = loss_and_grads(model, x)
    assert counter["calls"] == 1
    assert torch.allclose(loss, loss_plain, rtol=1e-12, atol=0)
    assert_same_grads(grads, grads_plain)
    # the cache lives for one forward: the next forward recomputes (once)
    assert torch_parametrize._cache_enabled == 0 and torch_parametrize._cache == {}
    model(x)
    assert counter["calls"] == 2
    # removing the hooks restores the uncached behaviour
    handle.remove()
    model(x)
    assert counter["calls"] == 2 + STEPS


@pytest.mark.parametrize("memo", [True, False])
def test_cache_per_forward_and_cached_compose_with_the_memo(memo):
    x = inputs()
    plain = RNN(seed=20, memo=False)
    _, grads_plain = loss_and_grads(plain, x)
    model = RNN(seed=20, memo=memo)
    counter = count_maps(model)
    with cache_per_forward(model):
        _, grads = loss_and_grads(model, x)
        assert_same_grads(grads, grads_plain)
        with cached():
            model(x)
            model(x)
    assert counter["calls"] == 2
    _, grads = loss_and_grads(model, x)
    assert_same_grads(grads, grads_plain)


def test_cache_sees_parameter_updates_between_forwards():
    x = inputs()
    model = RNN(seed=3, memo=False)
    cache_per_forward(model)
    before = model(x).detach()
    step = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        kernel_param(model).add_(step)
    after = model(x).detach()
    reference = RNN(seed=3)
    with torch.no_grad():
        kernel_param(reference).add_(step)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, reference(x).detach(), rtol=1e-12, atol=1e-14)


def test_exception_in_forward_leaves_the_cache():
    class Failing(RNN):
        def forward(self, x):
            super().forward(x)
            raise KeyError("boom")

    model = Failing(seed=4)
    cache_per_forward(model)
    with pytest.raises(KeyError, match="boom"):
        model(inputs())
    assert torch_parametrize._cache_enabled == 0 and torch_parametrize._cache == {}


def test_context_manager_removes_hooks_and_nests_with_cached():
    x = inputs()
    model = RNN(seed=5, memo=False)
    counter = count_maps(model)
    with cache_per_forward(model):
        model(x)
        assert counter["calls"] == 1
        # inside an explicit cached() the value lives until the outer block ends
        with cached():
            model(x)
            model(x)
            assert torch_parametrize._cache_enabled == 1
        assert counter["calls"] == 2
    assert torch_parametrize._cache_enabled == 0
    assert not model._forward_pre_hooks and not model._forward_hooks
    model(x)
    assert counter["calls"] == 2 + STEPS


def test_hooks_on_a_submodule_and_on_the_model_compose():
    x = inputs()
    model = RNN(seed=6, memo=False)
    counter = count_maps(model)
    cache_per_forward(model)
    cache_per_forward(model.recurrent)  # inner hooks nest inside the outer ones
    model(x)
    assert counter["calls"] == 1
    assert torch_parametrize._cache_enabled == 0


# ------------------------------------------------------------------ fast reads
@pytest.mark.parametrize("kind", ["constrain", "twin", "twin-cayley-notriv"])
def test_fast_read_serves_the_memo_and_defers_to_torch_otherwise(kind):
    model = RNN(seed=22, kind=kind)
    layer = model.recurrent
    assert type(layer).__dict__["weight"].fget._dtriv_fast_read
    W = layer.weight
    assert layer.weight is W  # served from the memo
    # a forward hook on the parametrization sees every read (the fast path steps aside)
    seen = []
    handle = layer.parametrizations.weight[0].register_forward_hook(lambda *_: seen.append(1))
    layer.weight
    layer.weight
    assert len(seen) == 2
    handle.remove()
    # a second parametrization in the list is applied
    torch_parametrize.register_parametrization(layer, "weight", Scale())
    assert torch.allclose(layer.weight, 2 * W, rtol=1e-12, atol=0)
    torch_parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    assert type(layer) is nn.Linear
    assert torch.allclose(layer.weight, 2 * W.detach(), rtol=1e-12, atol=0)
    assert isinstance(layer.weight, nn.Parameter)


class Scale(nn.Module):
    def forward(self, X):
        return 2 * X


def test_fast_read_after_remove_and_register_again():
    layer = nn.Linear(4, 4).double()
    constrain(layer, "weight", Orthogonal(4))
    torch_parametrize.remove_parametrizations(layer, "weight")  # leaves the orthogonal value
    assert type(layer) is nn.Linear
    orthogonal(layer)
    assert type(layer).__dict__["weight"].fget._dtriv_fast_read
    W = layer.weight
    assert torch.allclose(W.mT @ W, torch.eye(4, dtype=F64), atol=1e-12)
    layer.weight = torch.eye(4, dtype=F64)  # torch's setter
    assert torch.allclose(layer.weight, torch.eye(4, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 8), (8, 3)])
def test_inference_reads_of_a_transposed_value_are_memoized(shape):
    # a wide weight is the transpose of the tall map's value: it is sampled through it
    m = nn.Linear(shape[1], shape[0])
    orthogonal(m)
    with torch.inference_mode():
        first = m.weight
        assert m.weight is first
        first.mul_(2)
        assert m.weight is not first


def test_an_in_place_edit_of_a_read_value_is_not_handed_out():
    """A memoized value edited in place by the caller is not returned to later reads (its
    version changed): the next read recomputes the point of the manifold."""
    torch.manual_seed(0)
    m = constrain(nn.Linear(4, 4).double(), "weight", Orthogonal(4))
    with torch.no_grad():
        w = m.weight
        before = w.clone()
        w.mul_(2)
        after = m.weight
    assert Orthogonal(4).check(after)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_a_write_to_the_base_from_outside_is_seen():
    """A write to the base (``p.base.copy_``, as a re-projection does) invalidates the memo:
    with the parameter at zero the next read is the new base, not the stale cached weight."""
    torch.manual_seed(0)
    m = constrain(nn.Linear(4, 4).double(), "weight", Orthogonal(4))
    stale = m.weight
    assert m.weight is stale  # memoized
    Q = Orthogonal(4).sample(generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        m.parametrizations.weight[0].base.copy_(Q)
    torch.testing.assert_close(m.weight.detach(), Q, atol=1e-14, rtol=0)
    # a new storage through ``.data`` (no version bump) is seen as well
    m.parametrizations.weight[0].base.data = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(m.weight.detach(), torch.eye(4, dtype=torch.float64),
                               atol=1e-14, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_parameter_that_stops_requiring_grad_between_two_reads(kind):
    """A value read in grad mode is not handed out once its parameter stops requiring grad
    (frozen between two reads, no backward in between), nor the other way round."""
    layer = nn.Linear(4, 4).double()
    constrain_kernel(layer, kind)
    assert layer.weight.requires_grad
    param = layer.parametrizations.weight.original
    param.requires_grad_(False)
    assert not layer.weight.requires_grad
    param.requires_grad_(True)
    assert layer.weight.requires_grad


@pytest.mark.parametrize("numel", [17, 20, 100, 1000, 4097])
def test_sample_index_spans_the_first_and_the_last_entry(numel):
    """The sampled runs reach both ends of the tensor (a write to the last entries is
    sampled): runs of 16 consecutive whole entries, the first at entry 0, the last ending at
    entry ``numel - 1``."""
    from dtriv.parametrize.cache import SAMPLE_RUN, _sample_index

    itemsize = 8
    index = _sample_index(numel, itemsize)
    assert index.min() == 0 and index.max() == numel * itemsize - 1
    entries = sorted(set((index // itemsize).tolist()))
    assert len(index) % (SAMPLE_RUN * itemsize) == 0
    assert entries[:SAMPLE_RUN] == list(range(SAMPLE_RUN))
    assert entries[-SAMPLE_RUN:] == list(range(numel - SAMPLE_RUN, numel))


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_through_functional_call_with_the_memo_on(kind):
    """``gradcheck`` through ``torch.func.functional_call`` perturbs the tensor passed in
    place of the parameter one entry at a time through ``.data`` (no version bump) and never
    backpropagates its finite differences: the memo compares such a tensor whole, so the
    numerical Jacobian is the map's (it read zero), while the RNN's reads of one forward still
    share one evaluation of the map."""
    model = RNN(kind=kind)
    key = "recurrent.parametrizations.weight.original"
    X = kernel_param(model).detach().clone().requires_grad_()
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(3), dtype=F64)

    def f(X):
        return torch.func.functional_call(model, {key: X}, (x,))

    assert torch.autograd.gradcheck(f, (X,))
    counter = count_maps(model)
    f(X)
    assert counter["calls"] == 1


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
    lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True),
], ids=["adam-fused", "adamw-fused", "sgd-fused", "adam-foreach"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_fused_step_after_a_forward_never_backpropagated(make, kind):
    """torch's fused optimizers bump no version counter: with a metric computed by a forward
    in grad mode between ``backward`` and ``step`` (never backpropagated), the next forward
    must not reuse the weight from before the step. The trajectory equals the memo-off one
    (the global step hook clears the memos of a fused step's parameters)."""
    trajectories = []
    for memo in (True, False):
        model = RNN(kind=kind, memo=memo)
        opt = make(list(model.parameters()))
        losses = []
        for step in range(4):
            x = inputs(seed=step, steps=3)
            opt.zero_grad()
            loss = model(x).pow(2).sum()
            loss.backward()
            model(x).abs().sum().item()  # the metric: a forward never backpropagated
            opt.step()
            losses.append(loss.item())
        trajectories.append((losses, model.recurrent.weight.detach().clone()))
    (a, wa), (b, wb) = trajectories
    assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(wa, wb, rtol=1e-12, atol=1e-12)


def test_a_memo_fed_a_new_tensor_at_each_call_keeps_one_key():
    """The registry the step hook reads holds one entry per memo, however many tensors it has
    been fed (``functional_call`` passes a new one at each call)."""
    from dtriv.parametrize import cache as cache_mod

    model = RNN()
    key = "recurrent.parametrizations.weight.original"
    memo = model.recurrent.parametrizations.weight[0]._memo
    x = inputs(steps=2)
    for _ in range(20):
        X = kernel_param(model).detach().clone().requires_grad_()
        torch.func.functional_call(model, {key: X}, (x,)).sum().backward()
    assert [k for k, m in cache_mod._MEMO_OF.items() if m is memo] == [memo._key]


@pytest.mark.parametrize("kind", KINDS)
def test_threads_sharing_a_module_get_their_own_values(kind):
    """Forward and backward of one module from four threads at once (each its own input and
    loss): no thread's backward frees the graph of a value another thread's forward took
    (torch's "backward through the graph a second time"), and every gradient equals the one
    computed alone."""
    from concurrent.futures import ThreadPoolExecutor

    model = RNN(kind=kind)
    param = kernel_param(model)
    xs = [inputs(seed=i, steps=3) for i in range(24)]

    def job(x):
        return torch.autograd.grad(model(x).sin().sum(), param)[0]

    alone = [job(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(job, xs))
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpointed_region_recomputed_by_another_thread(kind):
    """Non-reentrant checkpoint, the weight read before and inside the region, backward called
    from another thread (which then runs the recomputation): the region's recomputation still
    reads the forward's value (the same saved tensors; no checkpoint error), and the gradient
    equals the memo-off one."""
    import threading

    from torch.utils.checkpoint import checkpoint

    grads = []
    for memo in (True, False):
        model = RNN(kind=kind, memo=memo)
        x = inputs(steps=4)
        h0 = torch.tanh(model.recurrent(model.input(x[0])))  # a read before the region
        out = checkpoint(lambda h, m=model: m.recurrent(torch.tanh(m.recurrent(h))), h0,
                         use_reentrant=False)
        loss = out.pow(2).sum()
        errors = []

        def run_backward(loss=loss, errors=errors):
            try:
                loss.backward()
            except Exception as e:  # reported below
                errors.append(e)

        thread = threading.Thread(target=run_backward)
        thread.start()
        thread.join()
        assert not errors, errors
        grads.append(kernel_param(model).grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", ["orthogonal", "spectral_norm", "weight_norm", "constrain"])
@pytest.mark.parametrize("where", ["parametrization", "global"])
def test_backward_hooks_see_the_parametrization(make, where):
    """A full backward hook on the parametrization module (or a global module backward hook)
    fires as with torch's parametrizations: the fast read skipped Module.__call__, which
    attaches those hooks, whenever no forward hook was registered."""
    from dtriv.manifolds import Stiefel
    from dtriv.parametrize import twins

    layer = nn.Linear(4, 6)
    if make == "constrain":
        dtriv.constrain(layer, "weight", Stiefel(6, 4))
    else:
        getattr(twins, make)(layer)
    parametrization = layer.parametrizations.weight[0]
    fired = []
    hook = lambda module, grad_in, grad_out: fired.append(type(module).__name__)  # noqa: E731
    if where == "parametrization":
        handle = parametrization.register_full_backward_hook(hook)
    else:
        handle = nn.modules.module.register_module_full_backward_hook(hook)
    try:
        with warnings.catch_warnings():  # (torch: "no inputs require gradients" for some)
            warnings.simplefilter("ignore")
            layer(torch.randn(2, 4)).sum().backward()
    finally:
        handle.remove()
    assert type(parametrization).__name__ in fired
