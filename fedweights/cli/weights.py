"""`fedweights weights …`: push, pull and inspect versioned weights in a registry."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..registry.certificate import describe_guarantee
from ..registry.client import ENV_ADDRESS, ENV_TLS_DIR, ENV_TOKEN_FILE, Client
from ..registry.diff import diff_files, total_change
from ..registry.manifest import IntegrityError
from .app import app, console

weights_app = typer.Typer(help="Publish, fetch and inspect versioned weights in a registry.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")

REGISTRY = typer.Option(None, "--registry", envvar=ENV_ADDRESS, help=f"Registry HOST:PORT (default: ${ENV_ADDRESS}).")
TOKEN_FILE = typer.Option(None, "--token-file", envvar=ENV_TOKEN_FILE, help="File holding the registry token.")
TLS_DIR = typer.Option(None, "--tls-dir", envvar=ENV_TLS_DIR, help="TLS: ca.crt (+ client.pem, client.key for mTLS).")


def _client(registry: str | None, token_file: Path | None, tls_dir: Path | None) -> Client:
    return Client(registry, token_file=token_file, tls_dir=tls_dir)


@weights_app.command("push")
def push_command(
    file: Path = typer.Argument(..., help="The safetensors file to publish."),
    name: str = typer.Option(..., "--name", help="Model name; the registry assigns the next version."),
    tags: list[str] = typer.Option([], "--tag", help="Tag for this version (repeatable); `name@tag` resolves to it."),
    from_run: Optional[Path] = typer.Option(None, "--from-run", help="Run directory: its id, round and privacy report go into the manifest."),
    parent: Optional[str] = typer.Option(None, "--parent", help="Parent NAME:VERSION, or 'none' (default: the newest version of --name)."),
    registry: Optional[str] = REGISTRY,
    token_file: Optional[Path] = TOKEN_FILE,
    tls_dir: Optional[Path] = TLS_DIR,
) -> None:
    """Publish a safetensors file as the next version of a model."""
    with _client(registry, token_file, tls_dir) as client:
        version = client.push(file, name, tags=tags, parent=parent, from_run=from_run)
    console.print(f"published [bold]{version.ref}[/bold] sha256:{version.sha256} (privacy: {describe_guarantee(version.privacy)})", highlight=False)


@weights_app.command("pull")
def pull_command(
    ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME@TAG."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the safetensors file."),
    registry: Optional[str] = REGISTRY,
    token_file: Optional[Path] = TOKEN_FILE,
    tls_dir: Optional[Path] = TLS_DIR,
) -> None:
    """Download a version; the file is written only after every hash is verified."""
    with _client(registry, token_file, tls_dir) as client:
        version = client.pull(ref, out)
    console.print(f"{version.ref} → {escape(str(out))} (sha256:{version.sha256}, {len(version.manifest.tensors)} tensors verified)", highlight=False)


@weights_app.command("list")
def list_command(
    registry: Optional[str] = REGISTRY,
    token_file: Optional[Path] = TOKEN_FILE,
    tls_dir: Optional[Path] = TLS_DIR,
) -> None:
    """Every model in the registry with its newest version.

    A table when it fits the terminal; otherwise one block per model (no column is cut short).
    """
    with _client(registry, token_file, tls_dir) as client:
        models = client.list()
    if not models:
        console.print("the registry holds no models yet")
        return
    table = Table("name", "versions", "latest", "size", "tags", "privacy", "created")
    blocks = []
    for model in models:
        m = model.latest.manifest
        rows = [("versions", str(model.versions)), ("latest", str(m.version)), ("size", _size(m.size_bytes)),
                ("tags", ",".join(m.tags)), ("privacy", describe_guarantee(m.privacy)), ("created", _when(m))]
        table.add_row(escape(model.name), *(escape(value) for _, value in rows))
        blocks.append((model.name, rows))
    _print_table_or_blocks(table, blocks)


@weights_app.command("log")
def log_command(
    ref: str = typer.Argument(..., help="NAME for all its versions; NAME:VERSION or NAME@TAG for that version's lineage."),
    registry: Optional[str] = REGISTRY,
    token_file: Optional[Path] = TOKEN_FILE,
    tls_dir: Optional[Path] = TLS_DIR,
) -> None:
    """Versions (newest first) with hash, parent, tags and privacy; lineage links are verified.

    A table when it fits the terminal; otherwise one block per version (no column is cut short).
    """
    with _client(registry, token_file, tls_dir) as client:
        versions = client.log(ref)
    table = Table("version", "sha256", "manifest", "parent", "tags", "privacy", "run / round", "created")
    blocks = []
    for v in versions:
        m = v.manifest
        run = f"{m.run_id} / {m.round}" if m.run_id else ""
        table.add_row(escape(v.ref), m.sha256[:12], _short(v.digest), escape(v.parent or "-"), escape(",".join(m.tags)),
                      escape(describe_guarantee(m.privacy)), escape(run), _when(m))  # fmt: skip
        rows = [("sha256", m.sha256[:12]), ("manifest", _short(v.digest)), ("parent", v.parent or "-"),
                ("tags", ", ".join(m.tags)), ("privacy", describe_guarantee(m.privacy)),
                ("run", f"{m.run_id}, round {m.round}" if m.run_id else ""), ("created", _when(m))]  # fmt: skip
        blocks.append((v.ref, rows))
    _print_table_or_blocks(table, blocks, always=("parent",))


def _print_table_or_blocks(table: Table, blocks: list[tuple[str, list[tuple[str, str]]]], always=()) -> None:
    """``table`` when its natural width fits the terminal; otherwise each (title, [(label, value)])
    block, values folded to the width (empty values left out unless their label is in ``always``)."""
    if Measurement.get(console, console.options.update_width(1 << 16), table).maximum <= console.width:
        console.print(table)
        return
    for n, (title, rows) in enumerate(blocks):
        if n:
            console.print()
        _print_wrapped(Text(title, style="bold"), "", 0)
        for label, value in rows:
            if value or label in always:
                _print_wrapped(Text(value), f"  {label:<10}", 12)


def _print_wrapped(text: Text, prefix: str, indent: int) -> None:
    """``prefix`` then ``text`` folded to the console width, continuation lines indented by ``indent``."""
    for i, line in enumerate(text.wrap(console, max(console.width - indent, 20), overflow="fold")):
        line.rstrip()
        console.print(Text(prefix if i == 0 else " " * indent, style="dim") + line, highlight=False)


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


@weights_app.command("diff")
def diff_command(
    a: str = typer.Argument(..., help="Old: NAME:VERSION (or NAME@TAG, or a local .safetensors file)."),
    b: str = typer.Argument(..., help="New: NAME:VERSION (or NAME@TAG, or a local .safetensors file)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    registry: Optional[str] = REGISTRY,
    token_file: Optional[Path] = TOKEN_FILE,
    tls_dir: Optional[Path] = TLS_DIR,
) -> None:
    """Per-tensor change from A to B: L2 norm of B-A and relative change ||B-A|| / ||A||."""
    if Path(a).is_file() and Path(b).is_file():  # two local files: no registry needed
        changes = diff_files(a, b)
    else:
        with _client(registry, token_file, tls_dir) as client:
            changes = client.diff(a, b)
    change, relative = total_change(changes)
    if as_json:
        rows = [{**c.__dict__, "shape": list(c.shape), "relative_change": _finite(c.relative_change)} for c in changes]
        print(json.dumps({"a": a, "b": b, "tensors": rows, "l2_change": change, "relative_change": _finite(relative)}, indent=2))
        return
    table = Table("tensor", "shape", "status", "L2 change", "relative change", title=f"{a} → {b}")
    for c in changes:
        table.add_row(c.name, "×".join(map(str, c.shape)), c.status, _num(c.l2_change), _num(c.relative_change))
    table.add_section()
    table.add_row("[bold]model[/bold]", "", "", _num(change), _num(relative))
    console.print(table)


@weights_app.command("verify")
def verify_command(
    file: Path = typer.Argument(..., help="Local safetensors file."),
    name: str = typer.Option(..., "--name", help="The version it should be: NAME:VERSION (or NAME@TAG)."),
    registry: Optional[str] = REGISTRY,
    token_file: Optional[Path] = TOKEN_FILE,
    tls_dir: Optional[Path] = TLS_DIR,
) -> None:
    """Check that a local file is exactly a published version (whole-file and per-tensor sha256)."""
    with _client(registry, token_file, tls_dir) as client:
        version, problems = client.verify(file, name)
    if problems:
        for problem in problems:
            console.print(f"[red]✗[/red] {escape(problem)}", highlight=False)
        raise IntegrityError(f"{file} is not {version.ref}")
    console.print(f"[green]✓[/green] {escape(str(file))} is {version.ref} (sha256:{version.sha256}, {len(version.manifest.tensors)} tensors)", highlight=False)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _when(manifest) -> str:
    return manifest.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if manifest.HasField("created_at") else ""


def _num(x: float | None) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:.4g}")


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isinf(x) else x


__all__ = ["weights_app"]
