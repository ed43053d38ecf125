"""`fedweights simulate`: a whole federation on Flower's simulation engine, in a child process
watched by this one (``fedweights.flower.supervisor``), so a run killed mid-way is marked failed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import app, console, err_console
from .run_options import run_config_for, run_options


@app.command("simulate")
@run_options(exclude=("he_server_key",))
def simulate_command(
    config: Optional[Path] = typer.Option(None, "--config", help="Run config TOML; CLI options override it."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the run in this directory after its last checkpointed round."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower and Ray logs."),
    overrides: Optional[dict] = None,
) -> None:
    """Run a federation in-process (Flower simulation engine, Ray backend)."""
    from ..flower.supervisor import child_config, child_signals, supervise

    run_config = child_config()
    if run_config is None:  # the command a user typed: check, then watch the child that runs it
        run_config = run_config_for(config, resume, overrides or {})
        outcome = supervise(run_config, verbose)
        if outcome.message:
            err_console.print(f"[bold red]error:[/bold red] {escape(outcome.message)}", highlight=False)
        raise typer.Exit(outcome.code)
    child_signals()
    from ..flower.simulation import simulate  # heavy (torch, Flower): only when a run starts
    from ..progress import RichReporter

    result = simulate(run_config, reporter=RichReporter(console), verbose=verbose)
    console.print(f"Run directory: [bold]{escape(str(result.run_dir))}[/bold]")
    if run_config.dp.enabled or run_config.user_dp.enabled:  # end with the privacy report and where report.html is
        from ..privacy.report import print_privacy_report

        print_privacy_report(result.run_dir, console)
