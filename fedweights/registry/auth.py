"""Who may read and write a registry: a bearer token and/or TLS client certificates.

* Token: the client sends ``authorization: Bearer <token>`` metadata; the registry compares it
  in constant time with the token in its ``--token-file``.
* Mutual TLS (``--mtls``): every connection must present a certificate signed by the CA in
  ``TLS_DIR/ca.crt``; gRPC verifies it during the handshake. Any such client may write unless
  ``--writer NAME`` limits writes to certificates with those common names.

Writes always need one of the two; reads are open unless ``--protect-reads``.
TLS directory layout (as ``fedweights keys tls`` writes it): ``ca.crt``, ``server.pem``,
``server.key`` on the registry; ``ca.crt`` (+ ``client.pem``, ``client.key`` for mTLS) on clients.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ..errors import UserError

MIN_TOKEN_CHARS = 16
CA_FILE, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY = "ca.crt", "server.pem", "server.key", "client.pem", "client.key"


def read_token(path: str | Path) -> str:
    """The token in a token file (surrounding whitespace ignored)."""
    path = Path(path)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise UserError(f"cannot read token file {path}: {exc.strerror}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(
            f"token file {path} holds {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
            "(make one with `fedweights registry token --out FILE`)"
        )
    return token


def tls_file(tls_dir: str | Path, name: str, required: bool = True) -> bytes | None:
    """Read one PEM file of a TLS directory."""
    path = Path(tls_dir) / name
    if not path.is_file():
        if required:
            raise UserError(f"TLS directory {tls_dir} has no {name} (expected ca.crt, server.pem, server.key)")
        return None
    return path.read_bytes()


def server_credentials(tls_dir: str | Path, mtls: bool) -> grpc.ServerCredentials:
    """TLS credentials of the registry; with ``mtls`` clients must present a CA-signed certificate."""
    pair = (tls_file(tls_dir, SERVER_KEY), tls_file(tls_dir, SERVER_CERT))
    ca = tls_file(tls_dir, CA_FILE) if mtls else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=mtls)


def channel_credentials(tls_dir: str | Path) -> grpc.ChannelCredentials:
    """TLS credentials of a client: trust ``ca.crt`` (system roots if absent); present a client cert if there."""
    if not Path(tls_dir).is_dir():
        raise UserError(f"TLS directory {tls_dir} does not exist (it should hold the registry's ca.crt, and "
                        f"{CLIENT_CERT}/{CLIENT_KEY} for mTLS)")
    cert, key = tls_file(tls_dir, CLIENT_CERT, required=False), tls_file(tls_dir, CLIENT_KEY, required=False)
    if (cert is None) != (key is None):
        raise UserError(f"TLS directory {tls_dir} must hold both {CLIENT_CERT} and {CLIENT_KEY}, or neither")
    return grpc.ssl_channel_credentials(tls_file(tls_dir, CA_FILE, required=False), key, cert)


@dataclass(frozen=True)
class AccessPolicy:
    """The registry's rules for reads and writes."""

    token: str | None = None
    mtls: bool = False
    protect_reads: bool = False
    writers: frozenset[str] = field(default_factory=frozenset)

    def validate(self) -> None:
        """Refuse configurations where writes would be open to anyone."""
        if self.token is None and not self.mtls:
            raise UserError("writes need authentication: give --token-file, or --tls-dir with --mtls")
        if self.writers and not self.mtls:
            raise UserError("--writer names TLS client certificates: it needs --tls-dir with --mtls")
        if any(not name.strip() for name in self.writers):
            raise UserError("--writer got an empty name: give the common name of a client certificate")

    def authorize(self, context: grpc.ServicerContext, write: bool) -> str:
        """The caller's identity if allowed; otherwise abort the call (UNAUTHENTICATED/PERMISSION_DENIED)."""
        presented = _bearer(context)
        token_ok = self.token is not None and presented is not None and hmac.compare_digest(
            presented.encode(), self.token.encode()
        )
        cert_name = _certificate_name(context) if self.mtls else None
        if not write and (not self.protect_reads or token_ok or cert_name):
            return cert_name or ("token" if token_ok else "anonymous")
        if token_ok:
            return cert_name or "token"
        if write and cert_name and (not self.writers or cert_name in self.writers):
            return cert_name
        action = "publishing" if write else "reading"
        if presented is not None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{action} refused: the registry token is wrong")
        if cert_name:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{action} refused: client certificate {cert_name!r} may not write")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{action} needs a registry token: `fedweights weights COMMAND ... --token-file FILE`"
                      " or $FEDWEIGHTS_REGISTRY_TOKEN_FILE, or for runs `[publish] token_file`")
        raise AssertionError("unreachable")  # context.abort raises


def _bearer(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ")
    return None


def _certificate_name(context: grpc.ServicerContext) -> str | None:
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name") or auth.get("x509_subject_alternative_name") or []
    return names[0].decode() if names else None
