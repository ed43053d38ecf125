"""Embedded datasets that need no download: scikit-learn digits, and Debian's Fashion-MNIST."""

from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import UserError

FASHION_MNIST_DIR = Path(os.environ.get("FEDWEIGHTS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


@lru_cache(maxsize=4)
def load_digits_split(seed: int, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 8x8 digits (1797 images, 10 classes) as a stratified train/test split
    (cached per process: callers share the tensors and must not modify them).

    Pixels are scaled to [0, 1]; images are flat 64-vectors.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return _tensors(x_train, y_train), _tensors(x_test, y_test)


def load_fashion_mnist(directory: Path = FASHION_MNIST_DIR) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST (60k/10k, 28x28) from Debian's ``dataset-fashion-mnist`` idx files.

    Images are flattened to 784-vectors scaled to [0, 1].
    """
    names = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    missing = [n for pair in names.values() for n in pair if not (directory / n).is_file()]
    if missing:
        raise UserError(
            f"Fashion-MNIST not found in {directory} (missing {', '.join(missing)}). "
            "Install it with `apt-get install dataset-fashion-mnist` or set FEDWEIGHTS_FASHION_MNIST "
            "to a folder holding the idx .gz files; or use dataset = \"digits\"."
        )
    splits = []
    for images, labels in names.values():
        x = _read_idx(directory / images).reshape(-1, 784).astype(np.float32)
        x /= 255.0  # in place: a second 188 MB array made this ~10x slower (it ran in every ClientApp task)
        y = _read_idx(directory / labels).astype(np.int64)
        splits.append(_tensors(x, y))
    return splits[0], splits[1]


def labels_of(dataset: Dataset) -> np.ndarray:
    """Class label of every example (needed for label-skewed partitions)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    _zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise UserError(f"{path} is not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
