"""Who may write and read: bearer tokens, protected reads, TLS and mutual TLS with writer names."""

from __future__ import annotations

import pytest

from fedweights.errors import UserError
from fedweights.registry import AccessPolicy, Client, start_registry
from fedweights.registry.auth import read_token

from .registry_support import TOKEN, client, make_tls, registry, save_model  # noqa: F401


def test_writes_without_the_right_token_are_refused(registry, tmp_path):
    save_model(tmp_path / "m.safetensors")
    with Client(registry.address) as anonymous:
        with pytest.raises(UserError, match="refused: publishing needs a registry token"):
            anonymous.push(tmp_path / "m.safetensors", "m")
        with pytest.raises(UserError, match="refused"):
            anonymous.check_access(write=True)
        assert anonymous.check_access(write=False) == "anonymous"  # reads are open by default
    with Client(registry.address, token="wrong-token-0123456789") as wrong:
        with pytest.raises(UserError, match="refused: publishing refused: the registry token is wrong"):
            wrong.push(tmp_path / "m.safetensors", "m")
    assert registry.store.models() == [] and not list((registry.store.root / "tmp").iterdir())
    with Client(registry.address, token=TOKEN) as writer:
        assert writer.check_access(write=True) == "token"
        assert writer.push(tmp_path / "m.safetensors", "m").ref == "m:1"


def test_protected_reads_need_the_token(tmp_path):
    save_model(tmp_path / "m.safetensors")
    with start_registry(tmp_path / "store", policy=AccessPolicy(token=TOKEN, protect_reads=True)) as running:
        with Client(running.address, token=TOKEN) as writer:
            writer.push(tmp_path / "m.safetensors", "m")
            assert [m.name for m in writer.list()] == ["m"]
        with Client(running.address) as anonymous:
            for read in (anonymous.list, lambda: anonymous.log("m"), lambda: anonymous.pull("m", tmp_path / "o.safetensors")):
                with pytest.raises(UserError, match="reading needs a registry token"):
                    read()
    assert not (tmp_path / "o.safetensors").exists()


def test_mutual_tls_identifies_writers_by_certificate(tmp_path):
    tls = make_tls(tmp_path / "tls", clients=("alice", "bob"))
    save_model(tmp_path / "m.safetensors")
    policy = AccessPolicy(mtls=True, writers=frozenset({"alice"}))
    with start_registry(tmp_path / "store", "localhost:0", policy, tls_dir=tls["server"]) as running:
        with Client(running.address, tls_dir=tls["alice"]) as alice:
            version = alice.push(tmp_path / "m.safetensors", "m")
            assert version.manifest.publisher == "alice"  # set by the registry from the verified certificate
        with Client(running.address, tls_dir=tls["bob"]) as bob:
            assert bob.resolve("m").ref == "m:1"  # any CA-signed client may read
            with pytest.raises(UserError, match="client certificate 'bob' may not write"):
                bob.push(tmp_path / "m.safetensors", "m")
        no_cert = tmp_path / "tls" / "no-cert"
        no_cert.mkdir()
        (no_cert / "ca.crt").write_bytes((tls["server"] / "ca.crt").read_bytes())
        with Client(running.address, tls_dir=no_cert, timeout=5) as stranger:
            with pytest.raises(UserError, match="cannot reach the registry"):  # the TLS handshake fails
                stranger.list()
        with Client(running.address, timeout=5) as plaintext:
            with pytest.raises(UserError, match="cannot reach the registry"):
                plaintext.list()


def test_server_tls_with_a_token(tmp_path):
    tls = make_tls(tmp_path / "tls")
    save_model(tmp_path / "m.safetensors")
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    (client_dir / "ca.crt").write_bytes((tls["server"] / "ca.crt").read_bytes())
    with start_registry(tmp_path / "store", "localhost:0", AccessPolicy(token=TOKEN), tls_dir=tls["server"]) as running:
        with Client(running.address, token=TOKEN, tls_dir=client_dir) as writer:
            assert writer.push(tmp_path / "m.safetensors", "m").manifest.publisher == "token"


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        (AccessPolicy(), "writes need authentication"),
        (AccessPolicy(token=TOKEN, writers=frozenset({"alice"})), "--writer names TLS client certificates"),
        (AccessPolicy(mtls=True), "--mtls needs --tls-dir"),
    ],
)
def test_a_registry_open_to_anonymous_writes_is_refused(tmp_path, policy, fragment):
    with pytest.raises(UserError, match=fragment):
        start_registry(tmp_path / "store", policy=policy)


def test_short_or_missing_token_files_are_refused(tmp_path, monkeypatch):
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(UserError, match="holds 3 characters; use at least 16"):
        read_token(tmp_path / "short")
    with pytest.raises(UserError, match="cannot read token file"):
        read_token(tmp_path / "missing")
    monkeypatch.delenv("FEDWEIGHTS_REGISTRY", raising=False)
    with pytest.raises(UserError, match="no registry address"):
        Client(None)


def test_a_missing_tls_directory_is_named_not_a_handshake_failure(tmp_path):
    with pytest.raises(UserError, match="TLS directory .*nosuch does not exist"):
        Client("127.0.0.1:9", tls_dir=tmp_path / "nosuch")


def test_an_empty_writer_name_is_refused():
    with pytest.raises(UserError, match="--writer got an empty name"):
        AccessPolicy(mtls=True, writers=frozenset({"alice", " "})).validate()
