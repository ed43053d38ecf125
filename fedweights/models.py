"""Default models. Users may pass any ``torch.nn.Module`` factory instead (see ``fedweights.Task``)."""

from __future__ import annotations

import math

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
