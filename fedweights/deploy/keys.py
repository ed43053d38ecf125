"""Key material for a deployment: a TLS CA with server (and client) certificates, and node keys.

TLS directory layout (shared with the weight registry, see ``fedweights.registry.auth``):
``ca.crt`` (everyone trusts it), ``server.pem`` + ``server.key`` (SuperLink / registry) and,
with ``client=True``, ``client.pem`` + ``client.key`` (mutual-TLS registry clients). CA and
server key stay on the coordinator; nodes only need ``ca.crt``.

A node key is an ECDSA P-384 private key in OpenSSH format (``NAME``, mode 0600) with its
public half (``NAME.pub``, one OpenSSH line), what Flower's SuperNode authentication expects.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm as UnsupportedAlgorithmError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import UserError
from ..fileio import atomic_write_bytes
from ..registry.auth import CA_FILE, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY

CA_KEY = "ca.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 825  # the longest TLS server certificate lifetime clients commonly accept
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class TLSFiles:
    """Paths written by ``make_tls``."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None = None
    client_key: Path | None = None


def make_tls(out: str | Path, hosts: list[str] | None = None, client: bool = False, overwrite: bool = False) -> TLSFiles:
    """A fresh CA and a server certificate valid for ``hosts`` (names or IPs; localhost always included)."""
    out = Path(out)
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *(check_host(h) for h in hosts or [])]))
    targets = [CA_FILE, CA_KEY, SERVER_CERT, SERVER_KEY] + ([CLIENT_CERT, CLIENT_KEY] if client else [])
    _refuse_overwrite(out, targets, overwrite)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedweights CA")])
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key, server_cert = _leaf("fedweights server", names, ExtendedKeyUsageOID.SERVER_AUTH, ca_key, ca_cert, now)
    _write_key(out / CA_KEY, ca_key)
    atomic_write_bytes(out / CA_FILE, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / SERVER_KEY, server_key)
    atomic_write_bytes(out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    files = TLSFiles(out / CA_FILE, out / SERVER_CERT, out / SERVER_KEY)
    if client:
        client_key, client_cert = _leaf("fedweights client", [], ExtendedKeyUsageOID.CLIENT_AUTH, ca_key, ca_cert, now)
        _write_key(out / CLIENT_KEY, client_key)
        atomic_write_bytes(out / CLIENT_CERT, client_cert.public_bytes(serialization.Encoding.PEM))
        files = TLSFiles(files.ca_cert, files.server_cert, files.server_key, out / CLIENT_CERT, out / CLIENT_KEY)
    return files


@dataclass(frozen=True)
class NodeKeyFiles:
    """Paths written by ``make_node_key``."""

    private: Path
    public: Path


def make_node_key(out: str | Path, name: str, overwrite: bool = False) -> NodeKeyFiles:
    """An ECDSA P-384 key pair for SuperNode authentication: ``OUT/NAME`` (0600) and ``OUT/NAME.pub``."""
    check_node_name(name)
    out = Path(out)
    _refuse_overwrite(out, [name, f"{name}.pub"], overwrite)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(out / name, private, mode=0o600)
    atomic_write_bytes(out / f"{name}.pub", public + f" {name}\n".encode())
    return NodeKeyFiles(out / name, out / f"{name}.pub")


def check_node_name(name: str) -> None:
    """Node names become file names: letters, digits, ``.``, ``_``, ``-`` (at most 64)."""
    if not NODE_NAME.match(name) or name.endswith(".pub"):
        raise UserError(f"node name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (and not end in .pub)")


def authorized_keys(directory: str | Path) -> list[Path]:
    """The ``*.pub`` files of an ``--authorized-nodes`` directory (each an ECDSA public key)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--authorized-nodes {directory} is not a directory (put each node's NAME.pub there)")
    keys = sorted(directory.glob("*.pub"))
    if not keys:
        raise UserError(f"--authorized-nodes {directory} holds no *.pub files (make them with `fedweights keys node`)")
    for path in keys:
        try:
            loaded = serialization.load_ssh_public_key(path.read_bytes())
        except (ValueError, UnsupportedAlgorithmError) as exc:
            raise UserError(f"{path} is not an OpenSSH public key: {exc}") from None
        if not isinstance(loaded, ec.EllipticCurvePublicKey):
            raise UserError(f"{path} is not an ECDSA key (make node keys with `fedweights keys node`)")
    return keys


def _leaf(common_name, hosts, usage, ca_key, ca_cert, now):
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA384())


def _builder(subject, issuer, public_key, now):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def check_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS name (letters, digits, '-', dots; '*.' allowed first)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.removeprefix("*.").split(".")
    if not host or len(host) > 253 or not all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", x) for x in labels):
        raise UserError(f"--host {host!r} is not an IP address or a DNS name (e.g. fl.example.org, 10.0.0.5)")
    return host


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_bytes(path, data, mode=0o600)


def _refuse_overwrite(out: Path, names: list[str], overwrite: bool) -> None:
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds {', '.join(existing)}: pass --force to replace them")

