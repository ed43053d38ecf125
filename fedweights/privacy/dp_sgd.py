"""DP-SGD glue: make a model trainable with DP, pick the per-sample gradient mode, and train one
round with Poisson sampling while one accountant history carries across rounds.

Plain stacks of Linear layers train with :mod:`.fused_dp_sgd` (Opacus' step computed directly,
4x faster on the default model); every other model trains through Opacus. Traps handled here
(see DESIGN.md, "Opacus 1.6"): the client's history is extended with the steps taken this round,
never restarted from zero (each round's ``PrivacyEngine`` is fresh and its accountant unused);
ghost clipping is always used with Opacus' DP loss wrapper (a plain loss would silently skip
clipping); the trained weights are read from the unwrapped model, so their keys carry no
``_module.`` prefix.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..task import Task
from .accounting import Entry, merge_history
from .fused_dp_sgd import FusedDPSGD, fused_layers

# Importing Opacus runs ``logging.basicConfig`` (opacus/utils/module_utils.py), which adds a root
# handler: every Flower log line then printed twice, once with Opacus' format. Only that handler goes.
_OPACUS_LOG_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def _remove_opacus_root_handler() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        formatter = handler.formatter
        if formatter is not None and formatter._fmt == _OPACUS_LOG_FORMAT:
            root.removeHandler(handler)


_remove_opacus_root_handler()

# Ghost clipping computes per-sample gradient NORMS without materialising per-sample gradients,
# but only for the layer types Opacus has norm samplers for (Linear, Embedding); other layers
# fall back to per-sample gradients plus a second backward pass. It pays when most parameters
# sit in such layers (measured: 1M-param MLP hooks 92x slower than plain, ghost 2.2x).
GHOST_MIN_PARAM_SHARE = 0.5


class DPModelFixWarning(UserWarning):
    """The model had layers DP-SGD cannot train (e.g. BatchNorm) and was changed to train it."""


@dataclass(frozen=True)
class RoundPlan:
    """Everything one client's DP-SGD round needs and reports (one history entry per round)."""

    noise_multiplier: float
    sample_rate: float
    steps: int  # optimizer steps this round: local_epochs × batches per epoch
    max_grad_norm: float
    batch_size: int  # the configured batch size; Poisson batches have n_examples·q examples on average
    local_epochs: int
    n_examples: int

    @property
    def entry(self) -> Entry:
        """This round's (σ, q, steps) history entry."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def expected_batch_size(self) -> int:
        """The divisor of each step's noisy gradient sum: Opacus' int(n·q) (``make_private``), with
        the floor taken up to float error. Opacus' own is 0 where n·q is 1 in exact arithmetic but
        0.999… in floats (batch 1, n = 49, 98, 103, …: 216 sizes below 2,000), and every mode then
        divided by zero and trained the model to inf."""
        return max(1, int(self.n_examples * self.sample_rate + 1e-9))


@dataclass
class PrivateRound:
    """What one private round produced."""

    state_dict: dict[str, torch.Tensor]  # the trained weights, keys as in the unwrapped model
    train_loss: float
    history: list[Entry]  # the accountant's full history after this round
    grad_sample_mode: str


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Return ``model`` unchanged if Opacus can train it, else fixed with ``ModuleValidator.fix``
    (e.g. BatchNorm → GroupNorm) and a visible :class:`DPModelFixWarning`."""
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model
    fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise UserError(f"the model cannot be trained with DP-SGD: {'; '.join(map(str, remaining))}")
    reasons = sorted({str(e).split(":")[0] for e in errors})
    warnings.warn(
        f"DP-SGD cannot train this model as is ({'; '.join(reasons)}); fixed with opacus "
        "ModuleValidator.fix (e.g. BatchNorm → GroupNorm). The federation trains and saves the "
        "fixed architecture.",
        DPModelFixWarning,
        stacklevel=2,
    )
    return fixed


def dp_compatible_task(task: Task) -> Task:
    """The same task with every model passed through :func:`make_dp_compatible`."""
    model_fn = task.model_fn
    return dataclasses.replace(task, model_fn=lambda: make_dp_compatible(model_fn()))


def ghost_param_share(model: nn.Module) -> float:
    """Share of trainable parameters in layers with Opacus ghost-norm samplers (Linear, Embedding)."""
    ghost_types = tuple(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ghost = sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, ghost_types)
        for p in m.parameters(recurse=False)
        if p.requires_grad
    )
    return ghost / total if total else 0.0


def choose_grad_sample_mode(model: nn.Module, requested: str = "auto") -> str:
    """``fused`` for plain stacks of Linear layers (:mod:`.fused_dp_sgd`), else ``ghost`` when most
    parameters sit in ghost-clippable layers, else ``hooks``; or as requested.

    Opacus' ``ew`` (torch ExpandedWeights) is never chosen: it raises on an empty batch, which
    Poisson sampling draws (bench/bench_dp.py measures every mode).
    """
    fusable = fused_layers(model) is not None
    if requested == "fused" and not fusable:
        raise UserError("grad_sample_mode 'fused' trains only nn.Sequential stacks of nn.Linear layers and "
                        "parameter-free activations; use 'auto', 'ghost' or 'hooks' for this model")
    if requested in ("fused", "ghost", "hooks"):
        return requested
    if fusable:
        return "fused"
    return "ghost" if ghost_param_share(model) >= GHOST_MIN_PARAM_SHARE else "hooks"


def make_plan_loader(data: Dataset, batch_size: int) -> DataLoader:
    """The loader Opacus turns into a Poisson sampler: q = 1/len(loader), ``len`` batches per epoch."""
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def train_private_round(
    model: nn.Module,
    data: Dataset,
    plan: RoundPlan,
    history: Sequence[Entry],
    device: torch.device,
    lr: float,
    momentum: float,
    grad_sample_mode: str = "auto",
    proximal_mu: float = 0.0,
) -> PrivateRound:
    """Train ``model`` on ``data`` for one round of DP-SGD (Poisson sampling, flat clipping).

    ``history`` is the client's accountant history so far; the returned history extends it with
    the steps actually taken. Sampling and noise use fresh OS randomness (never the run seed).
    With ``proximal_mu`` > 0 (FedProx), each DP step is followed by the proximal step
    ``w -= lr·mu·(w - w_global)``: it uses no data, so it costs no privacy (Opacus would drop a
    data-independent loss term from the per-example gradients).
    """
    mode = choose_grad_sample_mode(model, grad_sample_mode)
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loader = make_plan_loader(data, plan.batch_size)
    # Noise and Poisson sampling must not be predictable from a seed someone set (the run seed,
    # user code): draw them from generators seeded with OS entropy, and restore the global RNG.
    cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(secrets.randbits(63))  # the Poisson sampler draws from the global generator
        noise_generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        step, dp_loader = make_dp_step(model, optimizer, loader, plan, mode, noise_generator)
        if abs(dp_loader.sample_rate - plan.sample_rate) > 1e-12 or plan.n_examples != len(data):  # must agree
            raise RuntimeError(f"Opacus samples {len(data)} examples at q={dp_loader.sample_rate}, planned "
                               f"{plan.n_examples} at {plan.sample_rate}")
        proximal = _proximal_step(model, lr * proximal_mu) if proximal_mu > 0 else None
        loss, taken = _run_epochs(step, dp_loader, plan.local_epochs, device, proximal)
    trained = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Record the rate actually sampled at: Opacus' Poisson loader has int(1/q) batches, one fewer
    # than planned for some n (n=93, b=1: q=1/93, 92 batches), and its own accountant would record
    # q = 1/92. Every step taken is recorded, empty batches included.
    new_history = merge_history([*history, (plan.noise_multiplier, dp_loader.sample_rate, taken)])
    return PrivateRound(trained, loss, new_history, mode)


def make_dp_step(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, plan: RoundPlan,
                 mode: str, noise_generator: torch.Generator):
    """DP-SGD for ``model`` in ``mode`` (``fused``, ``ghost`` or ``hooks``): a function taking one
    step on a batch and returning its mean loss, and the Poisson loader drawing the batches from
    ``loader``'s data (through the global torch generator)."""
    if mode == "fused":
        fused = FusedDPSGD(model, optimizer, plan.noise_multiplier, plan.max_grad_norm, plan.expected_batch_size,
                           noise_generator)
        return fused.step, DPDataLoader.from_data_loader(loader)
    private = PrivacyEngine(accountant="rdp").make_private(  # ε comes from accounting.py, not this accountant
        module=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        clipping="flat",
        grad_sample_mode=mode,
        noise_generator=noise_generator,
    )
    if mode == "ghost":  # four objects: the DP loss wrapper does both backward passes
        dp_model, dp_optimizer, criterion, dp_loader = private
    else:
        (dp_model, dp_optimizer, dp_loader), criterion = private, nn.CrossEntropyLoss()
    dp_optimizer.expected_batch_size = plan.expected_batch_size  # never Opacus' 0 (see RoundPlan)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dp_optimizer.zero_grad(set_to_none=True)
        loss = criterion(dp_model(inputs), targets)
        loss.backward()
        dp_optimizer.step()
        return loss.detach()

    return step, dp_loader


def _proximal_step(model: nn.Module, rate: float):
    """A function pulling ``model``'s parameters towards their current values by ``rate``."""
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step() -> None:
        for p, a in zip(params, anchor):
            p.sub_(rate * (p - a))

    return step


def _run_epochs(step, loader, epochs: int, device, after_step=None) -> tuple[float, int]:
    """DP-SGD epochs: the last epoch's mean loss and the steps taken. Empty Poisson batches still
    take a (noise-only) step: skipping them would release a different mechanism than the one
    accounted for."""
    mean_loss, taken = float("nan"), 0
    with _quiet_opacus_empty_batch_warning():
        for _ in range(epochs):
            total, count = 0.0, 0
            for inputs, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                loss = step(inputs, targets)
                taken += 1
                if after_step is not None:
                    after_step()
                if len(targets):
                    total += float(loss) * len(targets)
                    count += len(targets)
            mean_loss = total / count if count else float("nan")
    return mean_loss, taken


class _quiet_opacus_empty_batch_warning:
    """Opacus logs a warning for every empty first batch; with Poisson sampling that is expected."""

    def __enter__(self):
        self._logger = logging.getLogger("opacus.data_loader")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)

