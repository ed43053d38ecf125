"""HE key files: make them, load them, and never confuse the secret one with the server one.

``fedweights keys he --out DIR`` writes

* ``DIR/secret.ctx`` (mode 0600): the TenSEAL context WITH the secret key, for clients;
* ``DIR/server.ctx``: the same context with NO secret key (parameters, fixed-point scale and the
  public key only), for the coordinator; ``ts.context_from(...).has_secret_key()`` is False;
* ``DIR/params.json``: the parameters, what they allow, and the key fingerprint (for people).

The key fingerprint is the SHA-256 of ``server.ctx``; clients compute the same bytes from their
secret context, so every payload names the key pair it was made with. The fixed-point scale
lives in the context itself (TenSEAL's ``global_scale``), so each ``.ctx`` file is self-contained.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import tenseal as ts

from ..errors import UserError
from ..fileio import atomic_write_bytes
from .params import HEParams

SECRET_FILE = "secret.ctx"
SERVER_FILE = "server.ctx"
PARAMS_FILE = "params.json"
_PUBLIC_PARTS = {"save_public_key": True, "save_galois_keys": False, "save_relin_keys": False}


@dataclass(frozen=True)
class HEKey:
    """A loaded TenSEAL context with its parameters and key fingerprint.

    ``is_secret`` says whether it can decrypt (clients) or only add (the coordinator).
    """

    context: ts.Context
    params: HEParams
    fingerprint: bytes
    path: str

    @property
    def is_secret(self) -> bool:
        """True when the context holds the secret key."""
        return self.context.has_secret_key()

    @property
    def seal_context(self) -> Any:
        """The underlying ``sealapi.SEALContext``."""
        return self.context.seal_context().data


@dataclass(frozen=True)
class KeyFiles:
    """Where ``make_keys`` wrote a key pair."""

    secret: Path
    server: Path
    params: Path
    fingerprint: str


def make_keys(out_dir: str | Path, params: HEParams | None = None, overwrite: bool = False) -> KeyFiles:
    """Generate a fresh key pair under ``out_dir`` (created 0700 if missing)."""
    params = params or HEParams()
    params.validate()
    out = Path(out_dir)
    secret_path, server_path, params_path = out / SECRET_FILE, out / SERVER_FILE, out / PARAMS_FILE
    existing = [p.name for p in (secret_path, server_path) if p.exists()]
    if existing and not overwrite:
        raise UserError(
            f"{out} already holds HE keys ({', '.join(existing)}); refusing to overwrite them (updates made "
            "with them could no longer be decrypted). Choose another --out or delete the old keys first."
        )
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    context = ts.context(
        ts.SCHEME_TYPE.BFV,
        poly_modulus_degree=params.poly_modulus_degree,
        plain_modulus=params.plain_modulus,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        n_threads=1,
    )
    context.global_scale = 2.0**params.scale_bits
    server_bytes = context.serialize(save_secret_key=False, **_PUBLIC_PARTS)
    fingerprint = hashlib.sha256(server_bytes).hexdigest()
    atomic_write_bytes(secret_path, context.serialize(save_secret_key=True, **_PUBLIC_PARTS), mode=0o600)
    atomic_write_bytes(server_path, server_bytes, mode=0o644)
    record = {
        **params.describe(),
        "key_fingerprint": fingerprint,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {SECRET_FILE: "clients only (holds the secret key)", SERVER_FILE: "coordinator (no secret key)"},
    }
    atomic_write_bytes(params_path, (json.dumps(record, indent=2) + "\n").encode())
    return KeyFiles(secret_path, server_path, params_path, fingerprint)


def write_server_key(key: HEKey, path: str | Path) -> Path:
    """Write the public part (server.ctx) of a loaded key to ``path``."""
    return atomic_write_bytes(path, key.context.serialize(save_secret_key=False, **_PUBLIC_PARTS), mode=0o644)


def load_client_key(path: str | Path) -> HEKey:
    """A client's secret context. Refuses server contexts and key files others can read."""
    key = _load(str(path))
    if not key.is_secret:
        raise UserError(
            f"{path} holds no secret key (is it {SERVER_FILE}?); clients need {SECRET_FILE} to encrypt and decrypt"
        )
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise UserError(f"secret key file {path} is readable by other users (mode {mode:04o}); run: chmod 600 {path}")
    return key


def load_server_key(path: str | Path) -> HEKey:
    """The coordinator's context. Refuses any context that holds the secret key."""
    key = _load(str(path))
    if key.is_secret:
        raise UserError(
            f"{path} holds the SECRET key; the coordinator must only get {SERVER_FILE} (no secret key), "
            "otherwise it could decrypt every client's update"
        )
    return key


def _load(path: str) -> HEKey:
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UserError(f"HE key file {path} cannot be read: {exc.strerror}") from None
    return _load_cached(path, info.st_mtime_ns, info.st_size)


@lru_cache(maxsize=8)
def _load_cached(path: str, _mtime_ns: int, _size: int) -> HEKey:
    try:
        context = ts.context_from(Path(path).read_bytes(), n_threads=1)
    except Exception as exc:
        raise UserError(f"{path} is not a TenSEAL context ({exc}); make keys with `fedweights keys he`") from None
    params = params_of(context, path)
    fingerprint = hashlib.sha256(context.serialize(save_secret_key=False, **_PUBLIC_PARTS)).digest()
    return HEKey(context, params, fingerprint, path)


def params_of(context: ts.Context, path: str = "context") -> HEParams:
    """Read and validate the fedweights parameters a TenSEAL context was made with."""
    parms = context.seal_context().data.key_context_data().parms()
    if parms.scheme().name != "BFV":
        raise UserError(f"{path} is a {parms.scheme().name} context; --he needs the BFV keys from `fedweights keys he`")
    try:
        has_public = context.has_public_key()
    except ValueError:  # TenSEAL raises for symmetric-only contexts
        has_public = False
    if not has_public:
        raise UserError(f"{path} has no public key, so payloads cannot name their key pair; use `fedweights keys he`")
    scale = context.global_scale
    scale_bits = int(round(math.log2(scale))) if scale > 0 else -1
    if scale_bits < 0 or 2.0**scale_bits != scale:
        raise UserError(f"{path} has no fixed-point scale (global_scale {scale}); use keys from `fedweights keys he`")
    params = HEParams(
        poly_modulus_degree=parms.poly_modulus_degree(),
        coeff_mod_bit_sizes=tuple(m.bit_count() for m in parms.coeff_modulus()),
        plain_modulus=parms.plain_modulus().value(),
        scale_bits=scale_bits,
    )
    params.validate()
    expected = math.prod(m.value() for m in parms.coeff_modulus()[:-1])
    if expected != params.data_modulus:
        raise UserError(f"{path} uses primes other than SEAL's standard ones for {list(params.coeff_mod_bit_sizes)}")
    return params
