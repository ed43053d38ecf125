"""The root typer app; each command module registers itself on it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(
    name="fedweights",
    help="Federated, privacy-preserving weight exchange on Flower.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def given(options: Mapping[str, Any]) -> dict[str, Any]:
    """The CLI options the user actually gave (those not None), as flat config overrides."""
    return {key: value for key, value in options.items() if value is not None}


@app.callback()
def _root() -> None:
    """Federated, privacy-preserving weight exchange on Flower."""
