"""The `fedweights` command line."""

from __future__ import annotations

import sys

from ..errors import UserError
from . import simulate as _simulate  # noqa: F401 - registers `fedweights simulate`
from . import he as _he  # noqa: F401 - registers `fedweights keys he`, `decrypt`, `bench he`
from . import bench_round as _bench_round  # noqa: F401 - registers `fedweights bench round`
from . import privacy as _privacy, report as _report  # noqa: F401 - `privacy plan`, `report`
from . import deploy as _deploy  # noqa: F401 - `fedweights server`, `client`, `keys tls`, `keys node`
from . import registry as _registry, weights as _weights  # noqa: F401 - `fedweights registry`, `fedweights weights`
from .app import app, err_console


def main() -> None:
    """Entry point: run the CLI; user errors print one clear line and exit non-zero."""
    try:
        app()
    except UserError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


__all__ = ["app", "main"]
