"""`fedweights registry …`: run a weight registry and look after its store."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..errors import UserError
from ..registry.auth import AccessPolicy, read_token
from ..registry.manifest import IntegrityError
from ..registry.blobs import prune as prune_blobs
from ..registry.blobs import unreferenced
from ..registry.server import serve
from ..registry.store import WeightStore
from .app import app, bench_app, console

registry_app = typer.Typer(help="Run a versioned weight registry (gRPC) and check its store.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("serve")
def serve_command(
    root: Path = typer.Option(..., "--root", help="Store directory (created if missing)."),
    address: str = typer.Option("127.0.0.1:9600", "--address", help="HOST:PORT to listen on (0.0.0.0:PORT for remote clients)."),
    tls_dir: Optional[Path] = typer.Option(None, "--tls-dir", help="TLS: ca.crt, server.pem, server.key (as `fedweights keys tls` writes)."),
    mtls: bool = typer.Option(False, "--mtls", help="Require client certificates signed by TLS_DIR/ca.crt; such clients may write."),
    writers: list[str] = typer.Option([], "--writer", help="With --mtls: only these certificate names may write (repeatable)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Token that writes (and protected reads) must present."),
    protect_reads: bool = typer.Option(False, "--protect-reads", help="Reads need the token or a client certificate too."),
) -> None:
    """Serve a weight registry until Ctrl-C / SIGTERM. Writes always need a token or mTLS."""
    policy = AccessPolicy(
        token=read_token(token_file) if token_file else None,
        mtls=mtls,
        protect_reads=protect_reads,
        writers=frozenset(writers),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(root, address, policy, tls_dir)


@registry_app.command("token")
def token_command(out: Path = typer.Option(..., "--out", help="Where to write the token (mode 0600).")) -> None:
    """Make a random registry token (256 bits) in a file only you can read."""
    if out.exists():
        raise UserError(f"{out} exists; remove it first (a registry may be using that token)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    console.print(f"wrote {out} (give it to `registry serve --token-file` and to publishers)")


@registry_app.command("fsck")
def fsck_command(
    root: Path = typer.Option(..., "--root", help="Store directory to check."),
    prune: bool = typer.Option(False, "--prune", help="Delete payloads no version names (only if everything else verifies)."),
) -> None:
    """Re-verify every manifest digest, lineage link and payload hash in a store; list payloads no
    version names (left by a failed or interrupted publish) and, with --prune, delete them."""
    if not (root / "index.sqlite").is_file():
        raise UserError(f"{root} is not a registry store (no index.sqlite)")
    store = WeightStore(root, read_only=True)
    problems = store.check_versions()
    for problem in problems:
        console.print(f"[red]✗[/red] {escape(problem)}", highlight=False)
    orphans = unreferenced(store)
    for orphan in orphans:
        console.print(f"[yellow]![/yellow] {escape(orphan.describe())}", highlight=False)
    if prune and problems:
        raise IntegrityError(
            f"{len(problems)} problem(s) in {root}; not pruning: while the index does not verify, a payload no "
            "version names may be the only copy of a version whose index entry was lost. Restore index.sqlite "
            "or fix the problems first"
        )
    if prune:
        removed = prune_blobs(store)  # re-reads the index under the publish lock: safe while serving
        for blob in removed:
            console.print(f"removed {blob.path.name} ({blob.size} bytes)", highlight=False)
        kept = len(unreferenced(store))
        console.print(f"[green]✓[/green] {escape(str(root))}: every manifest, lineage link and payload verifies; "
                      f"removed {len(removed)} unreferenced payload(s), {sum(b.size for b in removed)} bytes"
                      + (f" ({kept} unexpected file(s) left alone)" if kept else ""), highlight=False)  # fmt: skip
        return
    if problems:
        extra = f" and {len(orphans)} unreferenced file(s)" if orphans else ""
        raise IntegrityError(f"{len(problems)} problem(s){extra} in {root}")
    if orphans:
        raise IntegrityError(
            f"{len(orphans)} file(s) in {root} belong to no version ({sum(o.size for o in orphans)} bytes); every version "
            f"verifies, so `fedweights registry fsck --root {root} --prune` can delete the unreferenced payloads"
        )
    console.print(f"[green]✓[/green] {escape(str(root))}: every manifest, lineage link and payload verifies", highlight=False)


@bench_app.command("registry")
def bench_registry_command(
    megabytes: int = typer.Option(100, "--megabytes", help="Model size."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per operation (the median is reported)."),
) -> None:
    """Registry push/pull throughput vs a plain file copy (registry in its own process, loopback)."""
    if megabytes < 1 or repeats < 1:
        raise UserError(f"--megabytes and --repeats must be >= 1, got {megabytes} and {repeats}")
    from ..registry.bench import run

    console.print_json(json.dumps(run(megabytes, repeats)))


__all__ = ["registry_app"]
