"""`fedweights simulate`: a whole federation in this process on Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import load_config
from ..errors import UserError
from .app import app, console, given


@app.command("simulate")
def simulate_command(
    config: Optional[Path] = typer.Option(None, "--config", help="Run config TOML; CLI options override it."),
    clients: Optional[int] = typer.Option(None, help="Number of simulated clients (default: 4)."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds (default: 5)."),
    local_epochs: Optional[int] = typer.Option(None, help="Local epochs per round (default: 1)."),
    batch_size: Optional[int] = typer.Option(None, help="Local batch size (default: 16)."),
    lr: Optional[float] = typer.Option(None, help="Local SGD learning rate (default: 0.1)."),
    partition: Optional[str] = typer.Option(None, help="iid | dirichlet (default: iid)."),
    alpha: Optional[float] = typer.Option(None, help="Dirichlet concentration; small = label skew (default: 0.5)."),
    seed: Optional[int] = typer.Option(None, help="Seed for splits, init and sampling (default: 0)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda (default: auto)."),
    dataset: Optional[str] = typer.Option(None, help="digits | fashion-mnist (default: digits)."),
    model: Optional[str] = typer.Option(None, help="mlp | cnn (default: mlp)."),
    task: Optional[str] = typer.Option(None, help="Your own task: 'package.module:function' returning fedweights.Task."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<timestamp>)."),
    dp: Optional[bool] = typer.Option(None, "--dp/--no-dp", help="Record-level DP-SGD on clients."),
    noise_multiplier: Optional[float] = typer.Option(None, help="DP: noise multiplier σ (default 1.0)."),
    target_epsilon: Optional[float] = typer.Option(None, help="DP: calibrate σ so the whole run spends this ε."),
    max_grad_norm: Optional[float] = typer.Option(None, help="DP: per-example clipping norm C (default 1.0)."),
    delta: Optional[float] = typer.Option(None, help="DP: δ (default: 1/n_k² rounded down to 10^-k, at most 1e-5)."),
    accountant: Optional[str] = typer.Option(None, help="DP: pld (tight, default) | rdp."),
    max_epsilon: Optional[float] = typer.Option(None, help="DP: per-client budget; a client stops before exceeding it."),
    he: Optional[bool] = typer.Option(None, "--he/--no-he", help="Homomorphically encrypted aggregation."),
    he_key: Optional[Path] = typer.Option(None, "--he-key", help="With --he: use this secret.ctx instead of fresh keys."),
    publish: Optional[str] = typer.Option(None, "--publish", help="Weight registry HOST:PORT: publish the final global model there."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name in the registry (with --publish)."),
    publish_every_round: Optional[bool] = typer.Option(None, "--publish-every-round", help="Also publish each round's model."),
    strategy: Optional[str] = typer.Option(
        None, help="Aggregation: fedavg | fedavgm | fedprox | fedadam | median | trimmed-mean | krum | multi-krum, "
        "or your own 'package.module:Class' (default: fedavg).",
    ),
    max_norm: Optional[float] = typer.Option(None, help="Reject updates whose L2 norm exceeds this (default: no bound)."),
    malicious: Optional[int] = typer.Option(None, help="Simulated attackers: partitions 0..K-1 misbehave (default: 0)."),
    attack: Optional[str] = typer.Option(None, help="sign-flip | scale | gaussian | label-flip (default: sign-flip)."),
    attack_scale: Optional[float] = typer.Option(None, help="Attack strength: update multiplier or noise std (default: 10)."),
    user_dp: Optional[bool] = typer.Option(None, "--user-dp/--no-user-dp", help="User-level DP-FedAvg on the server."),
    clients_per_round: Optional[int] = typer.Option(None, help="user-dp: expected clients per round m, q = m/clients."),
    user_noise_multiplier: Optional[float] = typer.Option(None, help="user-dp: noise multiplier z (default: 1.0)."),
    user_clipping_norm: Optional[float] = typer.Option(None, help="user-dp: clipping norm S of an update (default: 1.0)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower and Ray logs."),
) -> None:
    """Run a federation in-process (Flower simulation engine, Ray backend)."""
    overrides = given(
        {
            "clients": clients,
            "rounds": rounds,
            "local_epochs": local_epochs,
            "batch_size": batch_size,
            "lr": lr,
            "partition": partition,
            "alpha": alpha,
            "seed": seed,
            "device": device,
            "dataset": dataset,
            "model": model,
            "task": task,
            "out": str(out) if out else None,
            "dp.enabled": dp,
            "dp.noise_multiplier": noise_multiplier,
            "dp.target_epsilon": target_epsilon,
            "dp.max_grad_norm": max_grad_norm,
            "dp.delta": delta,
            "dp.accountant": accountant,
            "dp.max_epsilon": max_epsilon,
            "he.enabled": he,
            "he.key": str(he_key) if he_key else None,
            "publish.registry": publish,
            "publish.name": name,
            "publish.every_round": publish_every_round,
            "strategy.name": strategy,
            "strategy.max_norm": max_norm,
            "attack.malicious": malicious,
            "attack.kind": attack,
            "attack.scale": attack_scale,
            "user_dp.enabled": user_dp,
            "user_dp.clients_per_round": clients_per_round,
            "user_dp.noise_multiplier": user_noise_multiplier,
            "user_dp.clipping_norm": user_clipping_norm,
        }
    )
    run_config = load_config(config, overrides)
    dp_options = [k for k in overrides if k.startswith("dp.") and k != "dp.enabled"]
    if dp_options and not run_config.dp.enabled:
        names = ", ".join("--" + k.removeprefix("dp.").replace("_", "-") for k in dp_options)
        raise UserError(f"{names} only apply to DP runs: add --dp (or dp.enabled = true in the config)")
    from ..flower.simulation import simulate  # heavy (torch, Flower): only when a run starts
    from ..progress import RichReporter

    result = simulate(run_config, reporter=RichReporter(console), verbose=verbose)
    console.print(f"Run directory: [bold]{result.run_dir}[/bold]")
    if run_config.dp.enabled or run_config.user_dp.enabled:  # end with the privacy report and where report.html is
        from ..privacy.report import print_privacy_report

        print_privacy_report(result.run_dir, console)
