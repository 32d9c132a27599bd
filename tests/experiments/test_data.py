"""Offline datasets: scikit-learn's digits and the IDX reader for MNIST files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from experiments.data import MNIST_FILES, load_mnist, load_sklearn_digits, read_idx, write_idx


def test_sklearn_digits_split():
    d = load_sklearn_digits()
    assert d["x_train"].shape == (1438, 64) and d["x_test"].shape == (359, 64)  # 20 % test
    assert d["x_train"].dtype == torch.float32 and d["y_train"].dtype == torch.int64
    assert d["x_train"].min() >= 0 and d["x_train"].max() <= 1
    assert set(d["y_train"].tolist()) == set(range(10))
    ref = load_digits()
    x = torch.cat([d["x_train"], d["x_test"]]) * 16
    y = torch.cat([d["y_train"], d["y_test"]])
    # the split is a permutation of the whole dataset: every image once, labels kept
    rows = {tuple(r): int(t) for r, t in zip(ref.data.astype(int).tolist(), ref.target)}
    ours = [tuple(r) for r in x.round().int().tolist()]
    assert len(ours) == len(ref.data)
    assert all(rows[r] == t for r, t in zip(ours, y.tolist()))
    again = load_sklearn_digits()
    assert torch.equal(again["x_test"], d["x_test"])  # deterministic


def _idx_bytes(code: int, array: np.ndarray, fmt: str) -> bytes:
    """An IDX file built by hand with struct (independent of write_idx)."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + struct.pack(f">{array.size}{fmt}", *array.reshape(-1).tolist())


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_hand_written(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7
    labels = np.array([3, 9], dtype=np.uint8)
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    shorts = np.array([-300, 0, 1200], dtype=np.int16)
    for name, (code, arr, fmt) in {"img": (0x08, images, "B"), "lab": (0x08, labels, "B"),
                                   "flt": (0x0D, floats, "f"), "sh": (0x0B, shorts, "h")}.items():
        raw = _idx_bytes(code, arr, fmt)
        path = tmp_path / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw) if gz else raw)
        got = read_idx(path)
        assert got.shape == arr.shape and got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)


def test_write_idx_round_trip_and_errors(tmp_path):
    arr = np.random.default_rng(0).normal(size=(3, 2, 2))
    write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(0x08, np.zeros(10, np.uint8), "B")[:-3])
    with pytest.raises(ValueError, match="expected 10 data bytes"):
        read_idx(tmp_path / "short")


def _write_mnist(folder, n_train=5, n_test=3, gz=(True, False, False, True)):
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for (key, stem), z in zip(MNIST_FILES.items(), gz):
        code_fmt = (0x08, "B")
        raw = _idx_bytes(code_fmt[0], arrays[key], code_fmt[1])
        path = folder / (stem + (".gz" if z else ""))
        path.write_bytes(gzip.compress(raw) if z else raw)
    return arrays


def test_load_mnist_from_idx_files(tmp_path):
    arrays = _write_mnist(tmp_path)
    d = load_mnist(tmp_path)
    assert d["x_train"].shape == (5, 784) and d["x_test"].shape == (3, 784)
    assert torch.allclose(d["x_train"] * 255,
                          torch.from_numpy(arrays["train_images"].reshape(5, -1)).float())
    assert d["y_test"].tolist() == arrays["test_labels"].tolist()
    assert d["y_train"].dtype == torch.int64


def test_load_mnist_missing_files_say_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path / "nowhere")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte.*task.path"):
        load_mnist(tmp_path)
