"""Default models. Users may pass any ``torch.nn.Module`` factory instead (see ``fedweights.Task``)."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Sequential):
    """Two hidden ReLU layers; takes flat feature vectors."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )


class SmallCNN(nn.Module):
    """Two conv layers with GroupNorm (DP-SGD compatible) for square single-channel images.

    Takes flat vectors of ``side * side`` pixels and reshapes them.
    """

    def __init__(self, in_features: int, num_classes: int, channels: int = 16) -> None:
        super().__init__()
        self.side = math.isqrt(in_features)
        if self.side * self.side != in_features:
            raise ValueError(f"SmallCNN needs square images; {in_features} features is not a square")
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.GroupNorm(4, channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.GroupNorm(4, 2 * channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(2 * channels * 16, num_classes)

    def forward(self, x):  # noqa: D102 - standard nn.Module forward
        x = x.view(-1, 1, self.side, self.side)
        return self.head(self.features(x).flatten(1))


def build_model(name: str, in_features: int, num_classes: int) -> nn.Module:
    """Make a default model by name: ``mlp`` or ``cnn``."""
    if name == "mlp":
        return MLP(in_features, num_classes)
    if name == "cnn":
        return SmallCNN(in_features, num_classes)
    raise ValueError(f"unknown model {name!r}; choose 'mlp' or 'cnn'")


def fit_problem(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> str | None:
    """Why ``model`` cannot train with cross-entropy on these examples (a batch of ``inputs`` and the
    class ``labels`` to check), or None: inputs it rejects, non-integer labels, labels beyond its logits."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return f"labels are {labels.dtype}; cross-entropy needs integer class labels 0..C-1 (e.g. y.long())"
    try:
        with torch.no_grad():
            outputs = model.eval()(inputs)
    except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises, say what it was given
        return f"examples of shape {tuple(inputs.shape[1:])} do not fit the model ({type(exc).__name__}: {exc})"
    if not torch.is_tensor(outputs) or outputs.dim() != 2:
        shape = tuple(outputs.shape) if torch.is_tensor(outputs) else type(outputs).__name__
        return f"the model must output class logits of shape (batch, classes), it output {shape}"
    classes, low, high = outputs.shape[1], int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        return f"labels run {low}..{high}, but the model outputs {classes} class logits (labels must be 0..{classes - 1})"
    return None
