"""Encrypted aggregation (``--he``) on the Flower side: what the ClientApp, the round loop and
``simulate`` call. The cryptography lives in ``fedweights.crypto``.

* A client decrypts the encrypted global model it receives (the coordinator's sum of last
  round's updates) and divides by the total weight, trains, and replies with its own encrypted,
  example-weighted update. Round 1's initial model arrives in plaintext.
* Server steps beyond the weighted mean (FedAvgM momentum, distributed DP-FedAvg noise) run on
  the clients; their state travels encrypted with the model (``encrypted_state.py``).
* The coordinator writes the final aggregate, still encrypted, to ``model.he``.
* ``simulate --he`` holds the secret key it made (or was given), so it decrypts ``model.he`` into
  ``model.safetensors``; in a deployment a client does that with ``fedweights decrypt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message

from ..config import RunConfig
from ..crypto.codec import encrypt_update, layout_of
from ..crypto.envelope import HEADER_KEY, EnvelopeError, is_encrypted, load_envelope, save_envelope
from ..crypto.keys import SERVER_FILE, HEKey, load_client_key, make_keys, write_server_key
from ..errors import UserError
from ..run_dir import RunDir
from ..strategies.encrypted import NORMALISER, NOISE_ONLY
from .encrypted_state import UPDATE, client_payload, decrypt_global, section_of
from .runtime import NODE_HE_KEY, Runtime

ARRAYS = "arrays"
CONFIG = "config"
ENCRYPTED_MODEL_FILE = "model.he"
KEYS_DIR = "keys"

_last_decrypted: dict[bytes, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}


def received_state(
    msg: Message, context: Context, runtime: Runtime, model: torch.nn.Module
) -> Mapping[str, torch.Tensor]:
    """The global model's state_dict from a train/evaluate message, decrypting it when encrypted.

    ``model`` (a fresh instance of the task's model) tells which layout to expect.
    """
    return _received(msg, context, runtime, model)[0]


def _received(msg: Message, context: Context, runtime: Runtime, model: torch.nn.Module):
    arrays = msg.content[ARRAYS]
    if not is_encrypted(arrays):
        return arrays.to_torch_state_dict(), {}  # round 1: the initial model travels in plaintext
    key = client_key(context, runtime.config)
    digest = hashlib.sha256(key.fingerprint + arrays[HEADER_KEY].data).digest()
    if digest not in _last_decrypted:  # train and evaluate of consecutive rounds share one aggregate
        try:
            decrypted = decrypt_global(key, arrays, layout_of(model.state_dict()))
        except EnvelopeError as exc:
            raise UserError(f"cannot decrypt the global model: {exc}") from None
        _last_decrypted.clear()
        _last_decrypted[digest] = decrypted
    return _last_decrypted[digest]


def plaintext_global(msg: Message, context: Context, runtime: Runtime, model: torch.nn.Module) -> ArrayRecord:
    """The received global model as plaintext arrays (under ``--he`` from the cached decryption)."""
    arrays = msg.content[ARRAYS]
    if not is_encrypted(arrays):
        return arrays
    return ArrayRecord(dict(received_state(msg, context, runtime, model)))


def reply_arrays(
    state: Mapping[str, torch.Tensor], num_examples: int, msg: Message, context: Context, runtime: Runtime,
    model: torch.nn.Module,
) -> ArrayRecord:
    """The trained weights to send back: plaintext, or (with ``--he``) the encrypted weighted update.
    ``model`` is the task's model (its layout, should the received global model need decrypting)."""
    if not runtime.config.he.enabled:
        return ArrayRecord(dict(state))
    config = msg.content[CONFIG]
    if NORMALISER not in config:
        raise UserError("--he is on but the coordinator sent no weight normaliser: is it running without --he?")
    key = client_key(context, runtime.config)
    normaliser, server_round = int(config[NORMALISER]), int(config.get("server-round", 0))
    section = section_of(runtime.config)
    if section is not None:  # server state computed here (FedAvgM momentum, DP-FedAvg noise share)
        previous, momentum = _received(msg, context, runtime, model)  # cached: train_reply decrypted it
        noise_only = bool(config.get(NOISE_ONLY, False))
        state = client_payload(runtime.config, previous, momentum, state, normaliser, noise_only)
        if section == UPDATE:
            num_examples = 1  # DP-FedAvg: every client counts equally, the cohort size is the normaliser
    return encrypt_update(key, state, num_examples, normaliser, server_round, compact=runtime.config.he.compact)


def client_key(context: Context, config: RunConfig) -> HEKey:
    """This node's secret context: node config ``he-key``, else the run config's ``he.key``."""
    path = context.node_config.get(NODE_HE_KEY) or config.he.key
    if not path:
        raise UserError(
            "--he is on but this node has no secret key: start it with `fedweights client --he-key DIR/secret.ctx` "
            f"(node config {NODE_HE_KEY}=...) or set he.key"
        )
    return load_client_key(str(path))


def prepare_simulation_keys(config: RunConfig, run_dir: Path) -> RunConfig:
    """For ``simulate --he``: a fresh key pair in ``RUN/keys/`` unless ``he.key`` names one.

    Returns the config with ``he.key`` and ``he.server_key`` set. Without ``--he``, unchanged.
    """
    if not config.he.enabled:
        return config
    keys_dir = run_dir / KEYS_DIR
    if config.he.key is None:
        files = make_keys(keys_dir, overwrite=True)  # a reused run directory gets a fresh pair for the new run
        secret, server = str(files.secret), config.he.server_key or str(files.server)
    else:
        key = load_client_key(config.he.key)
        secret = str(Path(config.he.key).resolve())
        server = config.he.server_key or str(write_server_key(key, keys_dir / SERVER_FILE))
    return dataclasses.replace(config, he=dataclasses.replace(config.he, key=secret, server_key=server))


def own_keys(config: RunConfig, run_dir: Path) -> tuple[str, ...]:
    """``(KEYS_DIR,)`` when this run's HE keys live in ``RUN/keys/`` (``simulate --he`` made them
    there just before), else ``()``: what a new run keeps when it archives an earlier run's results."""
    keys = (Path(run_dir) / KEYS_DIR).resolve()
    paths = [Path(p).resolve() for p in (config.he.key, config.he.server_key) if p]
    return (KEYS_DIR,) if any(keys in p.parents for p in paths) else ()


def save_encrypted_model(run_dir: RunDir, arrays: ArrayRecord) -> Path:
    """The coordinator's final step under ``--he``: keep the encrypted global model as ``model.he``."""
    return save_envelope(run_dir.path / ENCRYPTED_MODEL_FILE, arrays)


def decrypt_model_file(
    path: str | Path, key_path: str | Path, model: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Decrypt a ``model.he`` with a client's ``secret.ctx`` (checked against ``model`` if given)."""
    key = load_client_key(key_path)
    try:
        arrays = load_envelope(path)
        layout = layout_of(model.state_dict()) if model is not None else None
        return decrypt_global(key, arrays, layout)[0]
    except (EnvelopeError, OSError) as exc:
        raise UserError(f"cannot decrypt {path}: {exc}") from None


DECRYPTED_SHA256 = "decrypted_from_sha256"
"""Safetensors metadata key of a decrypted model: the sha256 of the model.he it came from, so a
registry push with ``--from-run`` can check the file is that run's model."""


def decryption_metadata(encrypted: str | Path) -> dict[str, str]:
    """Metadata for the safetensors file a decryption of ``encrypted`` is written to."""
    digest = hashlib.sha256(Path(encrypted).read_bytes()).hexdigest()
    return {"decrypted_from": Path(encrypted).name, DECRYPTED_SHA256: digest}


def write_decrypted_model(run_dir: RunDir, config: RunConfig, model: torch.nn.Module) -> Path | None:
    """``simulate --he``: decrypt ``RUN/model.he`` with the run's secret key into ``model.safetensors``.

    None when the run stopped before any encrypted aggregate (the round loop then saved the
    plaintext initial model itself).
    """
    if not (run_dir.path / ENCRYPTED_MODEL_FILE).exists():
        return None
    state = decrypt_model_file(run_dir.path / ENCRYPTED_MODEL_FILE, config.he.key, model)
    model.load_state_dict(state)
    metadata = {"rounds": str(config.rounds), "format": "pt", **decryption_metadata(run_dir.path / ENCRYPTED_MODEL_FILE)}
    return run_dir.save_model(model.state_dict(), metadata)


__all__ = [
    "ENCRYPTED_MODEL_FILE",
    "NORMALISER",
    "client_key",
    "decrypt_model_file",
    "is_encrypted",
    "plaintext_global",
    "prepare_simulation_keys",
    "received_state",
    "reply_arrays",
    "save_encrypted_model",
    "write_decrypted_model",
]
