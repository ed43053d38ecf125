"""FedProx's client side: the proximal term (mu/2)·||w - w_global||² added to the local loss."""

from __future__ import annotations

import torch
from torch import nn

PROXIMAL_MU_KEY = "proximal-mu"  # where Flower's FedProx puts mu in the train ConfigRecord


class ProximalLoss(nn.Module):
    """Cross-entropy plus ``mu/2 · ||w - w_global||²`` over ``model``'s trainable parameters.

    ``w_global`` is a frozen copy of the parameters taken when the loss is built, i.e. right
    after the received global model was loaded and before local training starts.
    """

    def __init__(self, model: nn.Module, mu: float) -> None:
        super().__init__()
        self.mu = mu
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]
        self.base = nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.anchor and self.anchor[0].device != self.params[0].device:
            self.anchor = [a.to(p.device) for p, a in zip(self.params, self.anchor)]
        drift = sum(torch.sum((p - a) ** 2) for p, a in zip(self.params, self.anchor))
        return self.base(logits, targets) + 0.5 * self.mu * drift


def local_criterion(model: nn.Module, mu: float) -> nn.Module | None:
    """The loss a client trains with: the proximal loss when the server sent ``mu > 0``, else the default."""
    return ProximalLoss(model, mu) if mu > 0 else None
