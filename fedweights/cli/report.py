"""`fedweights report RUN_DIR`: the privacy report of a DP run (table, privacy.json, report.html)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError
from .app import app, console


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="A run directory (holds metrics.json and privacy-ledger.jsonl)."),
) -> None:
    """Print the privacy spent per client and (re)write privacy.json and report.html in RUN_DIR."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory" if run_dir.exists() else f"run directory not found: {run_dir}")
    from ..privacy.report import print_privacy_report  # torch, matplotlib: only when used

    print_privacy_report(run_dir, console)
