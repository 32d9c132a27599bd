"""Task generators: exact formats, baselines and reproducible, checkpointable streams."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from experiments.tasks import (
    ADDING_BASELINE,
    AddingTask,
    CopyingTask,
    PixelTask,
    adding_batch,
    baseline_of,
    copying_baseline,
    copying_batch,
)


@pytest.mark.parametrize("L", [0, 1, 7, 100])
def test_copying_layout(L):
    g = torch.Generator().manual_seed(0)
    x, y = copying_batch(64, L, g)
    assert x.shape == y.shape == (64, L + 20) and x.dtype == y.dtype == torch.int64
    symbols = x[:, :10]
    assert ((symbols >= 1) & (symbols <= 8)).all()
    assert (x[:, 10:L + 10] == 0).all()
    assert (x[:, L + 10] == 9).all()
    assert (x[:, L + 11:] == 0).all()
    assert (y[:, :L + 10] == 0).all()
    assert torch.equal(y[:, L + 10:], symbols)


def test_copying_symbols_uniform():
    x, _ = copying_batch(4000, 3, torch.Generator().manual_seed(1))
    counts = torch.bincount(x[:, :10].reshape(-1), minlength=10)
    assert counts[0] == 0 and counts[9] == 0
    freq = counts[1:9].double() / counts.sum()
    assert torch.allclose(freq, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)


@pytest.mark.parametrize("L", [10, 1000])
def test_copying_baseline_is_the_memoryless_loss(L):
    task = CopyingTask(L, seed=0)
    assert task.baseline == pytest.approx(10 * math.log(8) / (L + 20), rel=1e-15)
    assert copying_baseline(L) == task.baseline
    assert baseline_of({"name": "copying", "length": L})[0] == task.baseline
    # The memoryless strategy: certain blank for L + 10 steps, uniform over 1..8 afterwards.
    x, y = task.batch(16)
    logits = torch.full((16, L + 20, task.output_size), -1e4, dtype=torch.float64)
    logits[:, :L + 10, 0] = 0.0
    logits[:, L + 10:, 1:9] = 0.0
    loss, _ = task.loss(logits, y)
    assert loss.item() == pytest.approx(task.baseline, rel=1e-12)


def test_copying_one_hot_inputs_and_accuracy():
    task = CopyingTask(4, seed=0)
    x, y = task.batch(5)
    assert x.shape == (5, 24, 10) and torch.equal(x.sum(-1), torch.ones(5, 24))
    perfect = F.one_hot(y, task.output_size).float() * 50
    loss, acc = task.loss(perfect, y)
    assert acc == 1.0 and loss.item() < 1e-10


@pytest.mark.parametrize("L", [0, 4, 30])
def test_copying_accuracy_scores_only_the_recall_window(L):
    """The accuracy is the fraction of the last 10 steps (the recall of s_1..s_10) whose
    argmax is the target; the L + 10 blank steps before are not scored (a mean over every
    step would reward predicting blanks)."""
    task = CopyingTask(L, seed=1)
    _, y = task.batch(6)
    right = F.one_hot(y, task.output_size).float() * 50
    wrong = F.one_hot((y + 1) % task.output_size, task.output_size).float() * 50
    window = torch.zeros(L + 20, dtype=torch.bool)
    window[-10:] = True

    def accuracy(correct):  # correct: (batch, L + 20) bool, where the prediction is right
        return task.loss(torch.where(correct.unsqueeze(-1), right, wrong), y)[1]

    only_window = window.expand(6, -1)
    assert accuracy(only_window) == 1.0
    assert accuracy(~only_window) == 0.0
    half = only_window.clone()
    half[:3, -10:] = False  # half of the sequences wrong at every recall step
    assert accuracy(half) == 0.5
    half = only_window.clone()
    half[:, -10::2] = False  # every sequence wrong at every other recall step
    assert accuracy(half) == 0.5
    half[:, :-10] = False  # the blank steps do not count
    assert accuracy(half) == 0.5


def test_pixel_loss_and_accuracy():
    """The pixel tasks' loss is torch's cross-entropy of the final logits and their accuracy
    the fraction of argmax hits (3 of 4 here)."""
    task = PixelTask(_pixel_data(), seed=0)
    target = torch.tensor([3, 0, 9, 5])
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(4), target] = 10.0
    logits[2, 1] = 20.0  # the third is wrong
    loss, acc = task.loss(logits, target)
    assert acc == 0.75
    nll = logits.logsumexp(-1) - logits[torch.arange(4), target]  # -log softmax at the target
    assert loss.item() == pytest.approx(nll.mean().item(), rel=1e-6)


@pytest.mark.parametrize("T", [2, 3, 10, 101])
def test_adding_marks(T):
    x, y = adding_batch(256, T, torch.Generator().manual_seed(2))
    assert x.shape == (256, T, 2) and y.shape == (256, 1)
    values, marks = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert torch.equal(marks.sum(1), torch.full((256,), 2.0))
    half = T // 2
    assert torch.equal(marks[:, :half].sum(1), torch.ones(256))
    assert torch.equal(marks[:, half:].sum(1), torch.ones(256))
    assert torch.allclose(y[:, 0], (values * marks).sum(1))


def test_adding_baseline():
    assert ADDING_BASELINE == pytest.approx(0.167, abs=5e-4)
    task = AddingTask(50, seed=4)
    x, y = task.batch(200_000)
    loss, acc = task.loss(torch.ones_like(y), y)  # predict the mean sum, 1
    assert acc is None
    assert loss.item() == pytest.approx(task.baseline, rel=0.01)
    with pytest.raises(ValueError, match="task.length"):
        adding_batch(2, 1)


@pytest.mark.parametrize("make", [lambda s: CopyingTask(6, s), lambda s: AddingTask(9, s)])
def test_streams_are_seeded_and_resumable(make):
    a, b = make(11), make(11)
    for _ in range(3):
        xa, ya = a.batch(4)
        xb, yb = b.batch(4)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    state = a.state_dict()
    ahead = [a.batch(4) for _ in range(2)]
    b.load_state_dict(state)
    for xa, ya in ahead:
        xb, yb = b.batch(4)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(make(12).batch(4)[1], make(11).batch(4)[1])


def _pixel_data(n_train=10, n_test=4, T=6):
    x = torch.arange((n_train + n_test) * T, dtype=torch.float32).reshape(-1, T)
    y = torch.arange(n_train + n_test) % 10
    return {"x_train": x[:n_train], "y_train": y[:n_train],
            "x_test": x[n_train:], "y_test": y[n_train:]}


def test_pixel_task_epochs_and_state():
    data = _pixel_data()
    task = PixelTask(data, seed=0)
    assert task.seq_len == 6 and task.baseline == pytest.approx(math.log(10))
    seen = torch.cat([task.batch(5)[1] for _ in range(2)])  # exactly one epoch
    assert sorted(seen.tolist()) == sorted(data["y_train"].tolist())
    x, y = task.batch(3)
    assert x.shape == (3, 6, 1)
    assert torch.equal(x[..., 0], data["x_train"][y])  # label i <-> row i here
    state = task.state_dict()
    ahead = [task.batch(7) for _ in range(3)]  # crosses an epoch boundary
    other = PixelTask(data, seed=0)
    other.load_state_dict(state)
    for xa, ya in ahead:
        xb, yb = other.batch(7)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    test = list(task.test_batches(3))
    assert [len(b[1]) for b in test] == [3, 1]


def test_pixel_task_fixed_permutation():
    data = _pixel_data(T=16)
    a = PixelTask(data, seed=0, permuted=True, permute_seed=5)
    b = PixelTask(data, seed=9, permuted=True, permute_seed=5)
    c = PixelTask(data, seed=0, permuted=True, permute_seed=6)
    assert torch.equal(a.pixel_order, b.pixel_order)
    assert not torch.equal(a.pixel_order, c.pixel_order)
    assert sorted(a.pixel_order.tolist()) == list(range(16))
    x, y = a.batch(4)
    assert torch.equal(x[..., 0], data["x_train"][y][:, a.pixel_order])
    xt, yt = next(a.test_batches(2))
    assert torch.equal(xt[..., 0], data["x_test"][:2][:, a.pixel_order])
    assert a.name == "digits-permuted"
