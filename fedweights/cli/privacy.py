"""`fedweights privacy plan`: the ε a DP-SGD run would spend, or the σ a target ε needs; with
``--user-level``, the same for a user-level DP-FedAvg run (Poisson-sampled rounds)."""

from __future__ import annotations

import json
import math
from typing import Optional

import typer

from ..errors import UserError
from ..privacy.ledger import format_epsilon
from .app import console, privacy_app


@privacy_app.command("plan")
def plan_command(
    sample_rate: Optional[float] = typer.Option(None, "--sample-rate", "-q", help="Poisson sampling rate q (batch / examples)."),
    noise_multiplier: Optional[float] = typer.Option(None, "--noise-multiplier", help="Noise multiplier σ."),
    target_epsilon: Optional[float] = typer.Option(None, "--target-epsilon", help="Find the smallest σ meeting this ε."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Number of DP-SGD steps."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs instead of steps (steps = ceil(epochs/q))."),
    delta: float = typer.Option(..., "--delta", help="Target δ."),
    accountant: str = typer.Option("pld", "--accountant", help="pld (tight, default) | rdp."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    user_level: bool = typer.Option(False, "--user-level", help="Plan user-level DP-FedAvg rounds instead of DP-SGD steps."),
    population: Optional[int] = typer.Option(None, "--population", help="User-level: number of clients N."),
    clients_per_round: Optional[int] = typer.Option(None, "--clients-per-round", help="User-level: expected clients per round m (q = m/N)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="User-level: number of rounds T."),
) -> None:
    """Print the ε a run spends, or (with --target-epsilon) the smallest noise multiplier that meets it.

    Uses the same accounting code as fedweights runs (dp-accounting PLD or RDP). With --user-level:
    T rounds of a Poisson-subsampled Gaussian (q = m/N, z), as ``--user-dp`` runs are accounted.
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise UserError("give exactly one of --noise-multiplier and --target-epsilon")
    if user_level:
        _plan_user_level(population, clients_per_round, rounds, noise_multiplier, target_epsilon, delta, accountant,
                         as_json, sample_rate, steps, epochs)
        return
    if population is not None or clients_per_round is not None or rounds is not None:
        raise UserError("--population, --clients-per-round and --rounds plan user-level runs: add --user-level")
    if sample_rate is None:
        raise UserError("give --sample-rate (or --user-level with --population and --clients-per-round)")
    if (steps is None) == (epochs is None):
        raise UserError("give exactly one of --steps and --epochs")
    from ..privacy.accounting import (  # dp-accounting (and SciPy): seconds to import, so only here
        PLD_EPSILON_CEILING, calibrate_noise, check_accountant, check_delta, check_entry, epsilon, steps_for_epochs,
    )

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
    label = _label(accountant, spent, PLD_EPSILON_CEILING)
    if label != accountant:  # machines must see the label people see
        result["epsilon_bound"] = "rdp"
    _show_plan(
        result, target_epsilon, as_json, "epsilon",
        f"epsilon = [bold]{format_epsilon(spent, 6)}[/bold] at delta = {delta:g} ({label}) for {total_steps} steps "
        f"at sample rate {sample_rate:.6g} with noise multiplier {_round_up(noise_multiplier):.6g}",
    )


def _label(accountant: str, spent: float, pld_ceiling: float) -> str:
    if accountant == "pld" and spent > pld_ceiling * (1 + 1e-6):
        return f"pld; the RDP upper bound, as PLD is not computed above epsilon {pld_ceiling:g}: no meaningful protection"
    return accountant


def _plan_user_level(population, clients_per_round, rounds, noise_multiplier, target_epsilon, delta, accountant,
                     as_json, sample_rate, steps, epochs) -> None:
    """``privacy plan --user-level``: ε (or z) of T Poisson-sampled DP-FedAvg rounds."""
    from ..privacy.user_level import plan_run

    if population is None or clients_per_round is None or rounds is None:
        raise UserError("--user-level needs --population, --clients-per-round and --rounds")
    if sample_rate is not None or steps is not None or epochs is not None:
        raise UserError("--sample-rate, --steps and --epochs are for record-level plans; --user-level uses "
                        "--population, --clients-per-round and --rounds")
    if accountant != "pld":
        raise UserError("--user-level plans use the pld accountant (as user-level runs report)")
    if population < 1 or rounds < 1:
        raise UserError(f"--population and --rounds must be >= 1, got {population} and {rounds}")
    plan = plan_run(population, clients_per_round, rounds, delta, noise_multiplier=noise_multiplier,
                    target_epsilon=target_epsilon)
    result = {
        "epsilon": plan.epsilon,
        "delta": delta,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": rounds,
        "accountant": "pld",
        "level": "user",
        "rounds": rounds,
        "population": population,
        "clients_per_round": clients_per_round,
    }
    _show_plan(
        result, target_epsilon, as_json, "user-level epsilon",
        f"user-level epsilon = [bold]{format_epsilon(plan.epsilon, 6)}[/bold] at delta = {delta:g} (pld) for {rounds} "
        f"rounds sampling {clients_per_round} of {population} clients on average (q = {plan.sample_rate:.6g}) "
        f"with noise multiplier {_round_up(plan.noise_multiplier):.6g}",
    )


def _show_plan(result: dict, target_epsilon: float | None, as_json: bool, what: str, summary: str) -> None:
    """Print a plan as one JSON object, or as the calibrated noise (if asked for) and a summary line."""
    if target_epsilon is not None:
        result["target_epsilon"] = target_epsilon
    if as_json:
        typer.echo(json.dumps(result))
        return
    if target_epsilon is not None:
        shown = _round_up(result["noise_multiplier"])  # a copied value must still meet the target
        console.print(f"smallest noise multiplier for {what} <= {target_epsilon:g}: [bold]{shown:.6g}[/bold]")
    console.print(summary)


def _round_up(value: float, digits: int = 6) -> float:
    """``value`` rounded up to ``digits`` significant digits."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(abs(value))))
    return math.ceil(value * scale) / scale
