"""The fedweights ServerApp: runs the round loop on whatever Grid Flower hands it."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.http_grid import HttpGrid
from rich.markup import escape

from ..errors import UserError
from ..progress import RichReporter
from .fast_grid import FastPollGrid
from .round_loop import run_federation
from .runtime import Runtime, runtime_from_context


def build_server_app(
    runtime_fn: Callable[[Context], Runtime] = runtime_from_context,
    reporter: RichReporter | None = None,
) -> ServerApp:
    """A ServerApp whose run settings come from ``runtime_fn(context)``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if not isinstance(grid, HttpGrid):
            run_federation(grid, runtime_fn(context), reporter=reporter)
            return
        try:  # deployment: poll for replies faster than Flower's 3 s
            run_federation(FastPollGrid(grid), runtime_fn(context), reporter=reporter)
        except UserError as exc:  # a clear failure (recorded in metrics.json): no ServerApp traceback
            (reporter or RichReporter()).console.print(f"[bold red]run failed:[/bold red] {escape(str(exc))}", highlight=False)

    return app


app = build_server_app()
