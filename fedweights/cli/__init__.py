"""The `fedweights` command line."""

from __future__ import annotations

import sys

from rich.markup import escape

from ..errors import UserError
from . import simulate as _simulate  # noqa: F401 - registers `fedweights simulate`
from . import he as _he  # noqa: F401 - registers `fedweights keys he`, `decrypt`, `bench he`
from . import bench_round as _bench_round  # noqa: F401 - registers `fedweights bench round`
from . import privacy as _privacy, report as _report  # noqa: F401 - `privacy plan`, `report`
from . import deploy as _deploy  # noqa: F401 - `fedweights server`, `client`, `keys tls`, `keys node`
from . import registry as _registry, weights as _weights  # noqa: F401 - `fedweights registry`, `fedweights weights`
from .app import app, err_console


PATH_HINTS = {
    FileExistsError: "a file is in the way where a folder is needed; give another path",
    NotADirectoryError: "a file is in the way where a folder is needed; give another path",
    IsADirectoryError: "that is a folder; give a file path",
}


def main() -> None:
    """Entry point: run the CLI; user errors print one clear line and exit non-zero."""
    try:
        app()
    except UserError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except OSError as exc:  # e.g. a file given where a folder belongs, or the other way round; a full disk
        where = f": {exc.filename}" if exc.filename else ""
        hint = PATH_HINTS.get(type(exc), "check the path")
        err_console.print(f"[bold red]error:[/bold red] {escape(f'{exc.strerror or exc}{where}')} ({hint})", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


__all__ = ["app", "main"]
