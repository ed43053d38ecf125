"""Tampering and crashes: altered payloads and manifests in the store's files are reported as
such and never reach the user's file; a client catches a lying server on its own; a registry
killed mid-publish leaves no half-visible version."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import grpc
import pytest

from fedweights.proto import registry_pb2 as pb
from fedweights.proto import registry_pb2_grpc as pb_grpc
from fedweights.registry import AccessPolicy, Client, IntegrityError, NotFound, WeightStore, start_registry
from fedweights.registry.manifest import digest_of
from fedweights.registry.server import spawn_registry
from fedweights.registry.service import RegistryServicer

from .registry_support import TOKEN, client, registry, save_model, write_big_model  # noqa: F401


def _edit_manifest(root, name: str, version: int, edit, keep_digest: bool = True) -> None:
    """Rewrite a stored manifest in index.sqlite (as an attacker with file access would)."""
    with sqlite3.connect(root / "index.sqlite") as db:
        (data,) = db.execute("SELECT manifest FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()
        manifest = pb.WeightManifest.FromString(data)
        edit(manifest)
        data = manifest.SerializeToString(deterministic=True)
        db.execute("UPDATE versions SET manifest = ? WHERE name = ? AND version = ?", (data, name, version))
        if not keep_digest:
            db.execute("UPDATE versions SET digest = ? WHERE name = ? AND version = ?", (digest_of(data), name, version))


def _no_output(directory, name: str) -> bool:
    return not (directory / name).exists() and not list(directory.glob(f".{name}.*"))


def test_tampered_payload_is_reported_and_nothing_is_written(client, registry, tmp_path):
    save_model(tmp_path / "m.safetensors")
    version = client.push(tmp_path / "m.safetensors", "m")
    blob = registry.store.blob_path(version.sha256)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0x01  # one bit inside the last tensor
    blob.write_bytes(bytes(data))

    (tmp_path / "out.safetensors").write_bytes(b"the user's previous file")
    with pytest.raises(IntegrityError, match="stored payload of m:1 was altered"):
        client.pull("m:1", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"the user's previous file"  # untouched
    assert not list(tmp_path.glob(".out.safetensors.*"))  # no partial file left behind
    assert client.verify(tmp_path / "m.safetensors", "m:1")[1] == []  # the manifest still vouches for the original
    problems = registry.store.check()
    last_tensor = version.manifest.tensors[-1].name  # per-tensor hashes say where the damage is
    assert len(problems) == 2 and "payload sha256" in problems[0] and f"tensor '{last_tensor}' differs" in problems[1]


def test_tampered_manifest_is_reported(client, registry, tmp_path):
    save_model(tmp_path / "m.safetensors")
    client.push(tmp_path / "m.safetensors", "m")

    def lower_epsilon(manifest):
        manifest.privacy.guarantee = pb.PrivacyCertificate.DIFFERENTIAL_PRIVACY
        manifest.privacy.record_epsilon = 0.1

    _edit_manifest(registry.store.root, "m", 1, lower_epsilon)
    for read in (lambda: client.resolve("m:1"), lambda: client.log("m"), lambda: client.pull("m", tmp_path / "o.safetensors")):
        with pytest.raises(IntegrityError, match="manifest of m:1 was altered|was altered"):
            read()
    assert _no_output(tmp_path, "o.safetensors")
    assert any("was altered" in p for p in registry.store.check())


def test_manifest_rewritten_with_its_digest_breaks_the_lineage_chain(client, registry, tmp_path):
    for seed in (1, 2):
        save_model(tmp_path / f"m{seed}.safetensors", seed=seed)
        client.push(tmp_path / f"m{seed}.safetensors", "m")
    _edit_manifest(registry.store.root, "m", 1, lambda m: m.tags.append("audited"), keep_digest=False)

    with pytest.raises(IntegrityError, match="lineage broken: m:2 names parent m:1"):
        client.pull("m:1", tmp_path / "o.safetensors")
    with pytest.raises(IntegrityError, match="lineage broken"):
        client.log("m")
    assert _no_output(tmp_path, "o.safetensors")


class _LyingServicer(RegistryServicer):
    """A registry that flips one payload bit on the way out (its own checks pass)."""

    def Get(self, request, context):
        for n, message in enumerate(super().Get(request, context)):
            if message.WhichOneof("part") == "chunk" and n == 1:
                chunk = bytearray(message.chunk)
                chunk[len(chunk) // 2] ^= 0x80
                message = pb.GetResponse(chunk=bytes(chunk))
            yield message


def test_client_detects_a_corrupt_stream_even_when_the_server_does_not(tmp_path):
    store = WeightStore(tmp_path / "store")
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(4))
    pb_grpc.add_WeightRegistryServicer_to_server(_LyingServicer(store, AccessPolicy(token=TOKEN)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", token=TOKEN) as client:
            save_model(tmp_path / "m.safetensors")
            client.push(tmp_path / "m.safetensors", "m")
            with pytest.raises(IntegrityError, match="does not match its manifest: payload sha256 .* tensor"):
                client.pull("m:1", tmp_path / "out.safetensors")
    finally:
        server.stop(0)
    assert _no_output(tmp_path, "out.safetensors")


def test_registry_killed_mid_publish_leaves_no_version(tmp_path):
    root = tmp_path / "store"
    write_big_model(tmp_path / "big.safetensors", megabytes=8)
    proc, address = spawn_registry(root, "--token-file", str(_token_file(tmp_path)))
    sent_some, hold = threading.Event(), threading.Event()

    def requests():
        yield pb.PublishRequest(header=pb.PublishHeader(name="m"))
        with open(tmp_path / "big.safetensors", "rb") as fh:
            for _ in range(3):
                yield pb.PublishRequest(chunk=fh.read(1 << 20))
        sent_some.set()
        hold.wait(30)  # the rest never comes: the registry dies first

    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.WeightRegistryStub(channel).Publish.future(requests(), metadata=[("authorization", f"Bearer {TOKEN}")])
        assert sent_some.wait(30)
        _wait_for(lambda: any(p.stat().st_size > 0 for p in (root / "tmp").iterdir()))  # upload in progress
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        hold.set()
        with pytest.raises(grpc.RpcError):
            call.result(timeout=30)

    with start_registry(root, policy=AccessPolicy(token=TOKEN)) as restarted, Client(restarted.address, token=TOKEN) as client:
        assert client.list() == [] and not list((root / "tmp").iterdir())  # the partial upload is gone
        with pytest.raises(NotFound):
            client.resolve("m")
        assert client.push(tmp_path / "big.safetensors", "m").ref == "m:1"


def test_crash_between_blob_and_index_commit_leaves_no_version(tmp_path):
    """The state a crash after the blob rename but before the SQLite commit leaves behind."""
    save_model(tmp_path / "m.safetensors")
    store = WeightStore(tmp_path / "store")
    upload = store.upload()
    upload.write((tmp_path / "m.safetensors").read_bytes())
    digest, existed = upload.commit()  # blob durable; the version transaction never runs
    assert store.blob_path(digest.sha256).is_file() and not existed

    with start_registry(tmp_path / "store", policy=AccessPolicy(token=TOKEN)) as running, Client(running.address, token=TOKEN) as client:
        assert client.list() == []
        version = client.push(tmp_path / "m.safetensors", "m")
        assert version.ref == "m:1" and version.sha256 == digest.sha256
        assert running.store.check() == []


def test_a_second_server_on_the_same_root_is_refused(registry):
    with pytest.raises(Exception, match="already served by another process"):
        start_registry(registry.store.root, policy=AccessPolicy(token=TOKEN))


def _token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_check_reports_every_problem_lost_index_rows_and_orphaned_payloads(client, registry, tmp_path):
    """fsck must not stop at a truncated payload, nor pass a store whose index lost rows."""
    for seed in (1, 2, 3):
        save_model(tmp_path / f"m{seed}.safetensors", seed=seed)
        client.push(tmp_path / f"m{seed}.safetensors", "m")  # m:2's parent is m:1, m:3's is m:2
    root, store = registry.store.root, registry.store
    truncated = store.blob_path(client.resolve("m:3").sha256)
    os.chmod(truncated, 0o644)
    truncated.write_bytes(truncated.read_bytes()[:100])
    lost = client.resolve("m:1").sha256
    with sqlite3.connect(root / "index.sqlite") as db:
        db.execute("DELETE FROM versions WHERE name = 'm' AND version = 1")
    problems = store.check()
    assert any(p.startswith("m:2: its parent m:1 is missing from the index") for p in problems)
    assert any(p.startswith("m:3: payload") for p in problems)  # reported, and the check went on
    assert any(f"payload {lost} belongs to no version" in p for p in problems)


def test_fsck_reads_without_writing(client, registry, tmp_path):
    """fsck is an inspection: a store whose index lost its tables is reported, not re-created."""
    from typer.testing import CliRunner

    from fedweights.cli import app

    save_model(tmp_path / "m.safetensors")
    client.push(tmp_path / "m.safetensors", "m")
    copy = tmp_path / "copy"
    copy.mkdir()
    with sqlite3.connect(registry.store.root / "index.sqlite") as source, sqlite3.connect(copy / "index.sqlite") as target:
        source.backup(target)
    lost_payloads = CliRunner().invoke(app, ["registry", "fsck", "--root", str(copy)])
    assert lost_payloads.exit_code != 0 and "payload" in lost_payloads.output and "is missing" in lost_payloads.output
    with sqlite3.connect(copy / "index.sqlite") as db:
        db.execute("DROP TABLE versions")
    emptied = CliRunner().invoke(app, ["registry", "fsck", "--root", str(copy)])
    assert emptied.exit_code != 0 and "no versions/tags tables" in str(emptied.exception)
    with sqlite3.connect(copy / "index.sqlite") as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'versions'").fetchone() is None
    assert not (copy / "blobs").exists() and not (copy / "tmp").exists()


def test_an_altered_manifest_is_named_by_version_and_nothing_is_built_on_it(client, registry, tmp_path):
    for seed in (1, 2):
        save_model(tmp_path / f"m{seed}.safetensors", seed=seed)
        client.push(tmp_path / f"m{seed}.safetensors", "m", tags=["prod"] if seed == 1 else [])

    def rename(manifest):
        manifest.run_id = "forged"

    _edit_manifest(registry.store.root, "m", 1, rename)
    with pytest.raises(IntegrityError, match="manifest of m:1 was altered"):  # v2's lineage runs through it
        client.pull("m:2", tmp_path / "o.safetensors")
    save_model(tmp_path / "m3.safetensors", seed=3)
    with pytest.raises(IntegrityError, match="manifest of m:1 was altered"):
        client.push(tmp_path / "m3.safetensors", "m", parent="m:1")
    with sqlite3.connect(registry.store.root / "index.sqlite") as db:
        db.execute("UPDATE tags SET version = 7 WHERE name = 'm' AND tag = 'prod'")
    problems = registry.store.check()
    assert any(p.startswith("m:1: manifest of m:1 was altered") for p in problems)
    assert "m@prod: points at version 7, which is not in the index" in problems
    assert not any("belongs to no version" in p for p in problems)  # both payloads are still in the index
