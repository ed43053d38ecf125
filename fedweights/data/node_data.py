"""A node's own data for ``fedweights client --data FILE.npz``.

The file holds NumPy arrays ``x_train`` (examples × features, numbers) and ``y_train`` (integer
class labels from 0), and optionally ``x_test``/``y_test`` for evaluation. The client checks the
file when it starts; once the run's model is known, ``check_fits_model`` makes sure the examples
fit it (the built-in ``digits`` MLP takes 64 values in [0, 1] and has 10 classes), so a wrong file
fails with a message naming it rather than deep inside training.
"""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import UserError
from ..models import fit_problem

EXPECTED = "expected an .npz with x_train, y_train[, x_test, y_test]"


@lru_cache(maxsize=2)
def load_node_data(path: str) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets from an ``.npz`` file; test is empty when the file has none."""
    if Path(path).is_file() and not zipfile.is_zipfile(path):
        raise UserError(f"node data {path} is not an .npz archive ({EXPECTED}; write one with numpy.savez)")
    try:
        with np.load(Path(path), allow_pickle=False) as arrays:
            found = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"cannot read node data {path}: {exc} ({EXPECTED})") from None
    missing = [k for k in ("x_train", "y_train") if k not in found]
    if missing:
        raise UserError(f"node data {path} lacks {', '.join(missing)} ({EXPECTED})")
    if ("x_test" in found) != ("y_test" in found):
        raise UserError(f"node data {path} has only one of x_test, y_test: give both or neither")
    train = _dataset(path, "train", found["x_train"], found["y_train"])
    if len(train) == 0:
        raise UserError(f"node data {path}: x_train holds no examples")
    if "x_test" in found:
        test = _dataset(path, "test", found["x_test"], found["y_test"])
        if test.tensors[0].shape[1:] != train.tensors[0].shape[1:]:
            raise UserError(f"node data {path}: x_test examples have shape {tuple(test.tensors[0].shape[1:])}, "
                            f"x_train's {tuple(train.tensors[0].shape[1:])}")
        return train, test
    return train, TensorDataset(train.tensors[0][:0], train.tensors[1][:0])


def check_fits_model(path: str, train: TensorDataset, model: torch.nn.Module) -> None:
    """Raise a clear error when the examples do not fit ``model`` (input shape, number of classes)."""
    x, y = train.tensors
    problem = fit_problem(model, x[:1], y)
    if problem is not None:
        raise UserError(f"node data {path}: {problem}; export the features and labels the run trains on")


def _dataset(path: str, split: str, x: np.ndarray, y: np.ndarray) -> TensorDataset:
    if x.ndim < 2 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"node data {path}: x_{split} must be a numeric array of examples × features, "
                        f"got dtype {x.dtype} and shape {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"node data {path}: y_{split} must be a 1-D array of integer class labels, "
                        f"got dtype {y.dtype} and shape {y.shape}")
    if len(x) != len(y):
        raise UserError(f"node data {path}: x_{split} has {len(x)} examples but y_{split} {len(y)} labels")
    if not np.isfinite(x).all():
        raise UserError(f"node data {path}: x_{split} contains NaN or infinite values")
    if len(y) and y.min() < 0:
        raise UserError(f"node data {path}: y_{split} has negative label {int(y.min())}; labels are classes 0, 1, ...")
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))
