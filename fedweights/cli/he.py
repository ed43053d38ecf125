"""`fedweights keys he`, `fedweights decrypt` and `fedweights bench he`: encrypted aggregation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..errors import UserError
from .app import app, bench_app, console, keys_app


@keys_app.command("he")
def keys_he(
    out: Path = typer.Option(..., "--out", help="Directory for secret.ctx (clients), server.ctx (coordinator)."),
    poly_modulus_degree: int = typer.Option(8192, help="BFV ring degree N = values per ciphertext (4096..32768)."),
    coeff_mod_bit_sizes: str = typer.Option("40,60", help="Coefficient modulus prime sizes; the last is SEAL's special one."),
    plain_modulus_bits: int = typer.Option(28, help="Size of the plain modulus t (a batching prime is chosen)."),
    scale_bits: int = typer.Option(24, help="Fixed-point fraction bits: resolution 2^-bits, range ±t/2^(bits+1)."),
    force: bool = typer.Option(False, "--force", help="Replace keys already in --out."),
) -> None:
    """Make a key pair for encrypted aggregation (--he)."""
    from ..crypto.keys import make_keys
    from ..crypto.params import HEParams

    try:
        bits = tuple(int(b) for b in coeff_mod_bit_sizes.split(","))
    except ValueError:
        raise UserError(f"--coeff-mod-bit-sizes must be comma-separated integers, got {coeff_mod_bit_sizes!r}") from None
    params = HEParams.create(poly_modulus_degree, bits, plain_modulus_bits, scale_bits)
    files = make_keys(out, params, overwrite=force)
    console.print(f"secret key (clients only, mode 0600): [bold]{files.secret}[/bold]")
    console.print(f"server key (coordinator, no secret key): [bold]{files.server}[/bold]")
    console.print(
        f"fingerprint {files.fingerprint[:16]}…  range ±{params.max_abs_value:.4f}  "
        f"at most {params.max_summands} updates per round  (details: {files.params})"
    )


@app.command("decrypt")
def decrypt(
    model: Path = typer.Argument(..., help="An encrypted global model (model.he from a --he run)."),
    he_key: Path = typer.Option(..., "--he-key", help="A client's secret.ctx."),
    out: Path = typer.Option(..., "--out", help="Where to write the decrypted model (.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Decrypt an encrypted global model with a client's secret key."""
    from safetensors.torch import save

    from ..fileio import atomic_write_bytes
    from ..flower.encryption import decrypt_model_file, decryption_metadata

    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give the file to write, e.g. {out / 'model.safetensors'}")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    state = decrypt_model_file(model, he_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = save({k: v.contiguous() for k, v in state.items()}, metadata=decryption_metadata(model))
    atomic_write_bytes(out, payload)  # an interrupted write never leaves a torn model at --out
    console.print(f"decrypted {len(state)} tensors → [bold]{escape(str(out))}[/bold]")


@bench_app.command("he")
def bench_he(
    params: int = typer.Option(1_000_000, help="Model size (values per client)."),
    clients: int = typer.Option(10, help="Number of client updates to aggregate."),
    repeats: int = typer.Option(3, help="Server passes and decryptions per setup; the fastest counts."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
) -> None:
    """fedweights' encrypted aggregation versus NVIDIA FLARE's TenSEAL setup, side by side."""
    from ..crypto.bench import run

    if params < 1000 or clients < 1 or repeats < 1:
        raise UserError("--params must be >= 1000, --clients and --repeats >= 1")
    result = run(params=params, clients=clients, repeats=repeats)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    ours, theirs = result["setups"]["fedweights"], result["setups"]["nvflare"]
    compact = result["setups"]["fedweights_compact"]
    console.print(f"{'':>20}  {'fedweights':<11} {'(compact)':<11} nvflare")
    for key in ("bytes_per_param", "client_encrypt_s", "server_aggregate_s", "decrypt_s", "max_abs_error"):
        console.print(f"{key:>20}: {ours[key]:<11g} {compact[key]:<11g} {theirs[key]:g}")
    console.print(f"targets met: {result['met']}")
