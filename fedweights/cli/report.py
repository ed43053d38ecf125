"""`fedweights report RUN_DIR`: the privacy report of a DP run (table, privacy.json, report.html)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

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

    _print_run_status(run_dir)
    print_privacy_report(run_dir, console)


def _print_run_status(run_dir: Path) -> None:
    """A line on a run that did not complete; a run left ``running`` by a dead coordinator is
    marked ``interrupted`` first (``run_lock.settle``)."""
    import json

    from ..run_lock import settle

    settle(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        status = metrics["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if status != "completed":
        detail = f": {metrics['error']}" if metrics.get("error") else ""
        console.print(f"[yellow]run {escape(str(status))}[/yellow]{escape(detail)}", highlight=False)
