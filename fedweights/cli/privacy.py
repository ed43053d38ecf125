"""`fedweights privacy plan`: the ε a DP-SGD run would spend, or the σ a target ε needs."""

from __future__ import annotations

import json
import math
from typing import Optional

import typer

from ..errors import UserError
from ..privacy.accounting import calibrate_noise, check_accountant, check_delta, check_entry, epsilon, steps_for_epochs
from ..privacy.ledger import format_epsilon
from .app import console, privacy_app


@privacy_app.command("plan")
def plan_command(
    sample_rate: float = typer.Option(..., "--sample-rate", "-q", help="Poisson sampling rate q (batch / examples)."),
    noise_multiplier: Optional[float] = typer.Option(None, "--noise-multiplier", help="Noise multiplier σ."),
    target_epsilon: Optional[float] = typer.Option(None, "--target-epsilon", help="Find the smallest σ meeting this ε."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Number of DP-SGD steps."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs instead of steps (steps = ceil(epochs/q))."),
    delta: float = typer.Option(..., "--delta", help="Target δ."),
    accountant: str = typer.Option("pld", "--accountant", help="pld (tight, default) | rdp."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Print the ε a run spends, or (with --target-epsilon) the smallest noise multiplier that meets it.

    Uses the same accounting code as fedweights runs (dp-accounting PLD or RDP).
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise UserError("give exactly one of --noise-multiplier and --target-epsilon")
    if (steps is None) == (epochs is None):
        raise UserError("give exactly one of --steps and --epochs")
    check_accountant(accountant)
    check_delta(delta)
    check_entry(noise_multiplier if noise_multiplier is not None else 1.0, sample_rate, steps or 0)
    total_steps = steps if steps is not None else steps_for_epochs(sample_rate, epochs)
    if target_epsilon is not None:
        noise_multiplier = calibrate_noise(target_epsilon, sample_rate, total_steps, delta, accountant)
    spent = epsilon([(noise_multiplier, sample_rate, total_steps)], delta, accountant)
    result = {
        "epsilon": spent,
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "sample_rate": sample_rate,
        "steps": total_steps,
        "accountant": accountant,
    }
    if target_epsilon is not None:
        result["target_epsilon"] = target_epsilon
    if as_json:
        typer.echo(json.dumps(result))
        return
    if target_epsilon is not None:
        shown = _round_up(noise_multiplier)  # a copied value must still meet the target
        console.print(f"smallest noise multiplier for epsilon <= {target_epsilon:g}: [bold]{shown:.6g}[/bold]")
    console.print(
        f"epsilon = [bold]{format_epsilon(spent, 6)}[/bold] at delta = {delta:g} ({accountant}) for {total_steps} steps "
        f"at sample rate {sample_rate:.6g} with noise multiplier {noise_multiplier:.6g}"
    )


def _round_up(value: float, digits: int = 6) -> float:
    """``value`` rounded up to ``digits`` significant digits."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(abs(value))))
    return math.ceil(value * scale) / scale
