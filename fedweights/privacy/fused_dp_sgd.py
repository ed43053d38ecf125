"""DP-SGD for plain stacks of Linear layers (the default MLP), computed directly in torch.

Opacus' per-step bookkeeping (activation hooks, per-parameter clipping and noise calls) costs a
fixed ~1.4 ms per step, four times a whole plain step of the default 27k-parameter MLP at batch
16 (bench/bench_dp.py). For an ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free
elementwise activations, the same DP-SGD step takes a handful of tensor operations:

- one forward pass keeping each Linear layer's input ``a`` and output ``z``;
- one backward pass for ``g = ∂(Σᵢ lossᵢ)/∂z``: row i of ``g`` depends on example i only;
- per-example gradient norms without per-example gradients (the ghost-norm identity Opacus'
  ghost clipping uses): ``‖gᵢaᵢᵀ‖² + ‖gᵢ‖² = ‖gᵢ‖²(‖aᵢ‖² + 1)``, summed over layers;
- Opacus' flat clipping factor ``min(1, C / (‖∇ᵢ‖ + 1e-6))``, the clipped sum ``(g·f)ᵀa``,
  Gaussian noise N(0, (σC)²) on every coordinate, divided by Opacus' expected batch size.

The result is Opacus' ``DPOptimizer`` step (tests compare the two); Opacus' Poisson loader still
draws the batches and dp-accounting still computes ε. Any other model trains through Opacus.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

# Modules without parameters that act on each example's row alone (so row i of every
# intermediate depends on example i only, which the per-example norms rely on).
PER_EXAMPLE_MODULES = (
    nn.Identity, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Softplus, nn.Mish, nn.Dropout,
)


def fused_layers(model: nn.Module) -> list[nn.Module] | None:
    """``model``'s layers if fused DP-SGD can train it, else None: an ``nn.Sequential`` (or a
    subclass keeping its ``forward``) of ``nn.Linear`` layers and :data:`PER_EXAMPLE_MODULES`,
    with no hooks and every parameter trainable, ending in a Linear layer."""
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward or len(model) == 0:
        return None
    layers = list(model.children())
    if not isinstance(layers[-1], nn.Linear) or not all(
        type(layer) is nn.Linear or type(layer) in PER_EXAMPLE_MODULES for layer in layers
    ):
        return None
    if any(not p.requires_grad for p in model.parameters()) or any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()
    ):
        return None
    return layers


class FusedDPSGD:
    """One DP-SGD step at a time for a model :func:`fused_layers` accepts: clipped per-example
    gradients plus noise, set as ``.grad`` and applied by ``optimizer`` (momentum included)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, generator: torch.Generator) -> None:
        layers = fused_layers(model)
        if layers is None:
            raise ValueError("fused DP-SGD trains only nn.Sequential stacks of Linear layers and activations")
        self.layers, self.optimizer, self.generator = layers, optimizer, generator
        self.linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
        self.params = [p for layer in self.linears for p in (layer.weight, layer.bias) if p is not None]
        self.sizes = [p.numel() for p in self.params]  # one noise draw per step, split per parameter
        self.noise_std, self.max_grad_norm = noise_multiplier * max_grad_norm, max_grad_norm
        self.expected_batch_size = expected_batch_size

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Take one DP-SGD step on this (Poisson) batch, which may be empty; returns the mean loss."""
        captured_inputs, outputs, h = [], [], inputs
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                if h.dim() != 2:
                    raise UserError(f"fused DP-SGD needs (batch, features) inputs to every Linear layer, got shape "
                                    f"{tuple(h.shape)}; set [dp] grad_sample_mode = \"ghost\" to train this model")
                captured_inputs.append(h)
                h = layer(h)
                outputs.append(h)
            else:
                h = layer(h)
        loss_sum = nn.functional.cross_entropy(h, targets, reduction="sum")
        grads = torch.autograd.grad(loss_sum, outputs)
        with torch.no_grad():
            squared = grads[0].new_zeros(len(targets))
            for layer, g, a in zip(self.linears, grads, captured_inputs):
                squared += g.pow(2).sum(1) * (a.pow(2).sum(1) + (1.0 if layer.bias is not None else 0.0))
            factor = (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0).unsqueeze(1)
            noise = torch.normal(0.0, self.noise_std, (sum(self.sizes),),
                                 generator=self.generator, device=grads[0].device, dtype=grads[0].dtype)
            clipped = []
            for layer, g, a in zip(self.linears, grads, captured_inputs):
                g = g * factor
                clipped.append(g.t() @ a)
                if layer.bias is not None:
                    clipped.append(g.sum(0))
            for p, summed, part in zip(self.params, clipped, noise.split(self.sizes)):
                p.grad = (summed + part.view_as(p)) / self.expected_batch_size
        self.optimizer.step()
        return loss_sum.detach() / max(len(targets), 1)
