"""Local training and evaluation loops, and device selection. Same code path on CPU and CUDA."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import UserError


def select_device(preference: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` fails clearly when there is no GPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was requested but torch sees no CUDA GPU; use --device auto or cpu")
    if preference not in ("cpu", "cuda"):
        raise UserError(f"unknown device {preference!r}; choose auto, cpu or cuda")
    return torch.device(preference)


def make_optimizer(model: nn.Module, lr: float, momentum: float) -> torch.optim.Optimizer:
    """The optimizer every client uses (SGD; Opacus wraps it under DP)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def train_loader(data: Dataset, batch_size: int, model: nn.Module, generator: torch.Generator) -> DataLoader:
    """Shuffled batches of ``data``. With BatchNorm in ``model``, a last batch of one example is
    dropped (BatchNorm cannot normalise a single example in training mode: the client crashed every
    round); shuffling drops a different example each epoch. A shard of one example still fails."""
    lone_last = len(data) % batch_size == 1 and len(data) > batch_size
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    drop_last = lone_last and has_batch_norm
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, drop_last=drop_last)


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    criterion: nn.Module | None = None,
) -> float:
    """Train for ``epochs`` passes; return the mean per-example loss of the last epoch."""
    criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
    model.to(device).train()
    mean_loss = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for inputs, targets in loader:
            if len(targets) == 0:  # Poisson sampling can draw an empty batch
                continue
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(targets)
            count += len(targets)
        mean_loss = total / max(count, 1)
    return mean_loss


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float, int]:
    """Return (mean loss, accuracy, number of examples) of ``model`` on ``loader``."""
    criterion = nn.CrossEntropyLoss(reduction="sum")
    model.to(device).eval()
    loss, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        loss += float(criterion(logits, targets))
        correct += int((logits.argmax(dim=1) == targets).sum())
        count += len(targets)
    if count == 0:
        return float("nan"), float("nan"), 0
    return loss / count, correct / count, count
