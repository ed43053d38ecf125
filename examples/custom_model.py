"""Bring your own model and dataset: federated training of a custom torch model on your data.

Run it:  .venv/bin/python examples/custom_model.py [RUN_DIR]
It trains a small logistic-regression-style network on scikit-learn's breast-cancer data
split among 3 clients, and prints the final accuracy and where the run's files are.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset

import fedweights


class TabularDataset(Dataset):
    """Any torch Dataset works; exposing `.targets` lets fedweights make label-skewed splits fast."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = torch.tensor(features, dtype=torch.float32)
        self.targets = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.features[index], self.targets[index]


class TinyNet(nn.Module):
    """Your own model: anything that maps a batch of inputs to class logits."""

    def __init__(self, in_features: int = 30) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x):
        return self.body(x)


def make_task() -> fedweights.Task:
    """Build the Task (a config file can name such a factory: task = "my_package.my_module:make_task")."""
    data = load_breast_cancer()
    x = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)
    x_train, x_test, y_train, y_test = train_test_split(x, data.target, test_size=0.25, random_state=0, stratify=data.target)
    return fedweights.Task(
        model_fn=TinyNet,
        train_data=TabularDataset(x_train, y_train),
        test_data=TabularDataset(x_test, y_test),
        name="breast-cancer",
    )


def main(out: str | None = None) -> fedweights.RunResult:
    config = fedweights.RunConfig(clients=3, rounds=3, lr=0.05, partition="dirichlet", alpha=1.0, out=out)
    result = fedweights.simulate(config, task=make_task())
    print(f"final accuracy {result.final_accuracy:.3f}; files in {result.run_dir}")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1] if len(sys.argv) > 1 else None)
