"""The fedweights ServerApp: runs the round loop on whatever Grid Flower hands it."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.http_grid import HttpGrid

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
        if isinstance(grid, HttpGrid):  # deployment: poll for replies faster than Flower's 3 s
            grid = FastPollGrid(grid)
        run_federation(grid, runtime_fn(context), reporter=reporter)

    return app


app = build_server_app()
