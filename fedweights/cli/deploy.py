"""`fedweights server`, `fedweights client`, `fedweights keys tls` and `fedweights keys node`:
a federation across machines (Flower SuperLink + SuperNodes, TLS and node authentication)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import app, console, err_console, keys_app
from .run_options import run_config_for, run_options


@app.command("server")
@run_options(exclude=("he_key",))
def server_command(
    address: str = typer.Option("0.0.0.0:9092", "--address", help="HOST:PORT the SuperLink listens on for clients."),
    config: Optional[Path] = typer.Option(None, "--config", help="Run config TOML; CLI options override it."),
    tls_dir: Optional[Path] = typer.Option(None, "--tls-dir", help="ca.crt, server.pem, server.key (`fedweights keys tls`)."),
    authorized_nodes: Optional[Path] = typer.Option(
        None, "--authorized-nodes", help="Directory of node public keys (NAME.pub) allowed to join."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS, no node authentication (trusted test networks only)."),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="Continue the run in this directory after its last checkpointed round."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's logs."),
    overrides: Optional[dict] = None,
) -> None:
    """Start a Flower SuperLink and run a federation on the clients that connect to it."""
    from ..deploy.server import ServerSecurity, run_server

    run_config = run_config_for(config, resume, overrides or {})
    security = ServerSecurity(tls_dir, authorized_nodes, insecure)
    result = run_server(run_config, address, security, console=console, verbose=verbose)
    console.print(f"Run directory: [bold]{escape(str(result.run_dir))}[/bold]")
    if run_config.he.enabled:
        console.print("The global model is encrypted (model.he): a client decrypts it with "
                      "`fedweights decrypt RUN/model.he --he-key DIR/secret.ctx --out model.safetensors`.")


@app.command("client")
def client_command(
    server: str = typer.Option(..., "--server", help="The server's HOST:PORT (its --address)."),
    partition: Optional[str] = typer.Option(None, "--partition", help="i/n: train on partition i of n of the built-in data."),
    data: Optional[Path] = typer.Option(None, "--data", help="This node's own data: .npz with x_train, y_train[, x_test, y_test]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda (default: the run's device)."),
    he_key: Optional[Path] = typer.Option(None, "--he-key", help="This node's HE secret key (DIR/secret.ctx) for --he runs."),
    root_cert: Optional[Path] = typer.Option(None, "--root-cert", help="The CA certificate (ca.crt) the server's TLS uses."),
    node_key: Optional[Path] = typer.Option(None, "--node-key", help="This node's private key (`fedweights keys node`)."),
    state_dir: Optional[Path] = typer.Option(
        None, "--state-dir", help="Where this node keeps state across restarts (default: ~/.fedweights/nodes/NAME)."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Talk to an --insecure server (no TLS)."),
    register_wait: float = typer.Option(
        60.0, "--register-wait", help="Seconds to keep retrying while the server refuses this node's key."
    ),
) -> None:
    """Start a Flower SuperNode that trains on this node's data whenever the server runs a round."""
    from ..deploy.client import ClientSecurity, NodeSettings, run_client

    security = ClientSecurity(root_cert, node_key, insecure)
    settings = NodeSettings(partition, data, device, he_key, state_dir)
    run_client(server, security, settings, console=console, register_wait=register_wait)


@keys_app.command("tls")
def keys_tls(
    out: Path = typer.Option(..., "--out", help="Directory for ca.crt, server.pem, server.key (and ca.key)."),
    host: Optional[list[str]] = typer.Option(
        None, "--host", help="A name or IP clients use to reach the server (repeatable; localhost is always in)."
    ),
    client: bool = typer.Option(False, "--client", help="Also make client.pem/client.key (mutual-TLS registry clients)."),
    force: bool = typer.Option(False, "--force", help="Replace files already in --out."),
) -> None:
    """Make a CA and a server certificate for TLS (Flower SuperLink and the weight registry)."""
    from ..deploy.keys import make_tls

    files = make_tls(out, host or [], client=client, overwrite=force)
    console.print(f"CA certificate (give to every client): [bold]{files.ca_cert}[/bold]")
    console.print(f"server certificate and key (server only): [bold]{files.server_cert}[/bold], {files.server_key}")
    if files.client_cert:
        console.print(f"client certificate and key: [bold]{files.client_cert}[/bold], {files.client_key}")
    err_console.print(f"keep {Path(out) / 'ca.key'} offline: whoever holds it can impersonate the server")


@keys_app.command("node")
def keys_node(
    out: Path = typer.Option(..., "--out", help="Directory for the key pair."),
    name: str = typer.Option(..., "--name", help="The node's name: files NAME (private) and NAME.pub."),
    force: bool = typer.Option(False, "--force", help="Replace a key pair of that name."),
) -> None:
    """Make an ECDSA P-384 key pair that authenticates a client node to the server."""
    from ..deploy.keys import make_node_key

    files = make_node_key(out, name, overwrite=force)
    console.print(f"private key (stays on the node, mode 0600): [bold]{files.private}[/bold]")
    console.print(f"public key (copy to the server's --authorized-nodes directory): [bold]{files.public}[/bold]")
