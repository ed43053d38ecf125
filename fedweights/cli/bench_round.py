"""`fedweights bench round`: wall time per round, fedweights versus stock Flower FedAvg."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import bench_app, console


@bench_app.command("round")
def bench_round(
    rounds: int = typer.Option(3, help="Rounds per run."),
    repeats: int = typer.Option(2, help="Runs of each app, alternating; all rounds count."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    workdir: Optional[Path] = typer.Option(None, help="Keep logs and run directories here (default: a temp dir)."),
) -> None:
    """Seconds per round of fedweights versus a stock Flower FedAvg app on one local federation."""
    from ..bench_round.bench import run

    result = run(rounds=rounds, repeats=repeats, workdir=workdir)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    for name, setup in result["setups"].items():
        console.print(f"{name:>13}: {setup['mean_s']:.2f} s/round  (rounds: {setup['seconds_per_round']})")
    console.print(f"ratio {result['ratio']:.3f} of means, {result['ratio_median']:.3f} of medians  (target ≤ 1.1×: {'met' if result['met'] else 'not met'})")
    per_round = result["breakdown"]["per_round"]
    console.print("a round (stock Flower, s): " + ", ".join(f"{k} {v:.2f}" for k, v in per_round.items())
                  + f"  → dominated by {result['breakdown']['dominant']}")
