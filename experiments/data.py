"""Offline datasets for the sequential pixel tasks: scikit-learn's 8x8 digits and MNIST IDX files.

Nothing is downloaded at run time. ``load_digits`` ships with scikit-learn (1797 images of
8x8 pixels with values 0..16); full MNIST is read from the four IDX files of
http://yann.lecun.com/exdb/mnist/ (optionally gzip-compressed) in a folder the config names.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_idx", "write_idx", "load_sklearn_digits", "load_mnist", "MNIST_FILES"]

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {v.newbyteorder(">").str: k for k, v in _IDX_DTYPES.items()}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array.

    Format: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions ``d``, then ``d`` big-endian
    uint32 sizes and the data in C order, big-endian.
    """
    path = Path(path)
    with _open(path) as f:
        header = f.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES:
            raise ValueError(f"{path}: not an IDX file (magic bytes {header!r})")
        dtype, ndim = _IDX_DTYPES[header[2]], header[3]
        dims_raw = f.read(4 * ndim)
        if len(dims_raw) != 4 * ndim:
            raise ValueError(f"{path}: truncated IDX header")
        dims = struct.unpack(f">{ndim}I", dims_raw)
        count = int(np.prod(dims, dtype=np.int64))
        data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ValueError(
            f"{path}: expected {count * dtype.itemsize} data bytes for shape {dims}, "
            f"got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip when ``compress`` or the name ends in ``.gz``)."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    be = array.dtype.newbyteorder(">")
    if be.str not in _IDX_CODES:
        raise ValueError(f"array: dtype {array.dtype} has no IDX type code")
    payload = (
        bytes([0, 0, _IDX_CODES[be.str], array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(be).tobytes()
    )
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(payload) if compress else payload)


def _find(folder: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte, another common spelling
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(
        f"MNIST file {stem}[.gz] not found in {folder}. Put the four IDX files "
        f"({', '.join(MNIST_FILES.values())}, gzip-compressed or not) in that folder and "
        "point task.path at it; nothing is downloaded at run time. For an offline dataset "
        'that needs no files use task.name = "digits" (scikit-learn\'s load_digits).'
    )


def load_mnist(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """MNIST from IDX files in ``folder``.

    Returns ``{"x_train": (60000, 784) float in [0, 1], "y_train": (60000,) int64,
    "x_test", "y_test"}``.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"task.path: MNIST folder {folder} does not exist; it must hold "
            f"{', '.join(MNIST_FILES.values())} (gz or not). Nothing is downloaded at run time."
        )
    paths = {key: _find(folder, stem) for key, stem in MNIST_FILES.items()}  # all, then read
    arrays = {key: read_idx(path) for key, path in paths.items()}
    out: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match "
                "(expected (N, rows, cols) and (N,))"
            )
        x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
        out[f"x_{split}"] = x
        out[f"y_{split}"] = torch.from_numpy(labels.astype(np.int64))
    return out


def load_sklearn_digits(test_fraction: float = 0.2, split_seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn's 8x8 digits scaled to [0, 1], split by a fixed seeded permutation.

    Returns ``{"x_train": (N_train, 64), "y_train", "x_test", "y_test"}``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'task.name = "digits" needs scikit-learn (pip install scikit-learn), which ships '
            "the 8x8 digits offline; or use task.name = \"mnist\" with local IDX files"
        ) from err
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}
