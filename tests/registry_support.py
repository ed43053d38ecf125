"""Helpers for the weight-registry tests: models on disk, an in-process registry, TLS material,
and memory readings from /proc."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedweights.models import SmallCNN
from fedweights.registry import AccessPolicy, Client, start_registry

TOKEN = "test-token-0123456789abcdef"


def save_model(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A real multi-tensor state dict (SmallCNN + an int64 buffer), saved as safetensors."""
    torch.manual_seed(seed)
    state = {k: v.detach().clone() for k, v in SmallCNN(64, 10).state_dict().items()}
    state["steps"] = torch.tensor([seed, 7], dtype=torch.int64)
    save_file(state, str(path), metadata={"seed": str(seed)})
    return state


def write_big_model(path: Path, megabytes: int, tensors: int = 4) -> None:
    """A valid safetensors file of random F32 tensors, written in 8 MiB pieces (never whole in memory)."""
    per = (megabytes << 20) // tensors // 4
    header = {f"layer{i}.weight": {"dtype": "F32", "shape": [per], "data_offsets": [i * per * 4, (i + 1) * per * 4]} for i in range(tensors)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(tensors):
            left = per * 4
            while left:
                n = min(left, 8 << 20)
                fh.write(os.urandom(n))
                left -= n


@pytest.fixture
def registry(tmp_path):
    """An in-process registry (token-protected writes) on a free port."""
    running = start_registry(tmp_path / "store", policy=AccessPolicy(token=TOKEN))
    yield running
    running.stop(grace=0)


@pytest.fixture
def client(registry):
    """A Client holding the write token."""
    with Client(registry.address, token=TOKEN) as c:
        yield c


def vm_kib(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int) -> int:
    """Reset the peak-RSS counter of a process (Linux clear_refs 5); return its current RSS in KiB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return vm_kib(pid, "VmRSS")


def make_tls(directory: Path, clients: tuple[str, ...] = ()) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1, and client certificates named ``clients``.

    Returns {"server": dir with ca.crt/server.pem/server.key, name: dir with ca.crt/client.pem/client.key}.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, issuer_key, issuer_name, key, ca: bool = False, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("test-ca", ca_key, None, ca_key, ca=True)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    dirs = {}
    for role in ("server", *clients):
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if role == "server" else None
        cert = issue(role, ca_key, ca_cert.subject, key, san=san)
        d = directory / role
        d.mkdir(parents=True)
        (d / "ca.crt").write_bytes(ca_pem)
        stem = "server" if role == "server" else "client"
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{stem}.key").write_bytes(pem_key(key))
        dirs[role] = d
    return dirs
