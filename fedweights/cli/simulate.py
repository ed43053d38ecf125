"""`fedweights simulate`: a whole federation in this process on Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import app, console
from .run_options import build_run_config, run_options


@app.command("simulate")
@run_options(exclude=("he_server_key",))
def simulate_command(
    config: Optional[Path] = typer.Option(None, "--config", help="Run config TOML; CLI options override it."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower and Ray logs."),
    overrides: Optional[dict] = None,
) -> None:
    """Run a federation in-process (Flower simulation engine, Ray backend)."""
    run_config = build_run_config(config, overrides or {})
    from ..flower.simulation import simulate  # heavy (torch, Flower): only when a run starts
    from ..progress import RichReporter

    result = simulate(run_config, reporter=RichReporter(console), verbose=verbose)
    console.print(f"Run directory: [bold]{escape(str(result.run_dir))}[/bold]")
    if run_config.dp.enabled or run_config.user_dp.enabled:  # end with the privacy report and where report.html is
        from ..privacy.report import print_privacy_report

        print_privacy_report(result.run_dir, console)
