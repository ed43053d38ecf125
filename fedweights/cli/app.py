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
# Command groups shared by several features; each feature module adds its commands to them.
keys_app = typer.Typer(help="Make key material: HE contexts, TLS certificates, node keys.", no_args_is_help=True)
privacy_app = typer.Typer(help="Plan privacy budgets.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks comparing fedweights with the field's reference setups.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(privacy_app, name="privacy")
app.add_typer(bench_app, name="bench")

console = Console(soft_wrap=True)  # long paths and round lines stay whole when output is piped
err_console = Console(stderr=True, soft_wrap=True)


def given(options: Mapping[str, Any]) -> dict[str, Any]:
    """The CLI options the user actually gave (those not None), as flat config overrides."""
    return {key: value for key, value in options.items() if value is not None}


@app.callback()
def _root() -> None:
    """Federated, privacy-preserving weight exchange on Flower."""
