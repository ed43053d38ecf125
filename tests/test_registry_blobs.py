"""A publish that fails after its payload is stored leaves no unreferenced blob behind (and never
removes a payload another version shares); what a crash leaves, `registry fsck` reports and
`fsck --prune` deletes, never a payload a version names or one a publish is committing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from fedweights.cli import app
from fedweights.proto import registry_pb2 as pb
from fedweights.registry import AccessPolicy, Client, IntegrityError, start_registry
from fedweights.registry.server import spawn_registry

from .registry_support import TOKEN, client, registry, save_model  # noqa: F401


def _blobs(root) -> set[str]:
    return {p.name for p in (root / "blobs" / "sha256").glob("*/*")}


@contextmanager
def _index_write_locked(root):
    """Another SQLite writer holds the index (a real lock: readers go on, writers wait, then fail)."""
    holder = sqlite3.connect(root / "index.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def _fsck(root, *args: str):
    return CliRunner().invoke(app, ["registry", "fsck", "--root", str(root), *args])


def _models(tmp_path, *seeds: int) -> None:
    for seed in seeds:
        save_model(tmp_path / f"m{seed}.safetensors", seed=seed)


def test_a_publish_refused_for_an_altered_newest_version_stores_nothing(client, registry, tmp_path):
    """The implicit parent (the name's newest version) is checked before the payload is stored."""
    _models(tmp_path, 1, 2, 3)
    client.push(tmp_path / "m1.safetensors", "m")
    shared = client.push(tmp_path / "m2.safetensors", "x")
    with sqlite3.connect(registry.store.root / "index.sqlite") as db:
        (data,) = db.execute("SELECT manifest FROM versions WHERE name = 'm'").fetchone()
        manifest = pb.WeightManifest.FromString(data)
        manifest.run_id = "forged"
        db.execute("UPDATE versions SET manifest = ? WHERE name = 'm'", (manifest.SerializeToString(deterministic=True),))
    before = _blobs(registry.store.root)
    for payload in ("m3", "m2"):  # a new payload, and one x:1 already has
        with pytest.raises(IntegrityError, match="manifest of m:1 was altered"):
            client.push(tmp_path / f"{payload}.safetensors", "m")
    assert _blobs(registry.store.root) == before
    assert [p for p in registry.store.check() if "belongs to no version" in p] == []
    client.pull("x:1", tmp_path / "x.safetensors")
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "m2.safetensors").read_bytes() and shared.ref == "x:1"


def test_an_index_commit_that_fails_removes_only_the_blob_it_added(client, registry, tmp_path):
    """The payload is stored, then the index transaction fails for real (another writer holds the index)."""
    _models(tmp_path, 1, 2)
    first = client.push(tmp_path / "m1.safetensors", "m")
    registry.store.busy_timeout = 0.5
    before = _blobs(registry.store.root)
    with _index_write_locked(registry.store.root):
        for payload, name in (("m2", "m"), ("m1", "n")):  # a new payload; one m:1 shares (must stay)
            refused = f"registry storage error: cannot record the new version of {name} .*database is locked.*nothing was published"
            with pytest.raises(Exception, match=refused):
                client.push(tmp_path / f"{payload}.safetensors", name)
            assert _blobs(registry.store.root) == before
    assert registry.store.check() == [] and not list((registry.store.root / "tmp").iterdir())
    client.pull("m:1", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == (tmp_path / "m1.safetensors").read_bytes()
    assert client.push(tmp_path / "m2.safetensors", "m").ref == "m:2" and first.ref == "m:1"
    assert registry.store.check() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_at_the_index_commit_leaves_no_blob(tmp_path):
    """A real ENOSPC: the store on a 4 MiB tmpfs, filled so the payload fits but the index commit does not."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        _models(tmp_path, 1, 2)
        with start_registry(mount / "store", policy=AccessPolicy(token=TOKEN)) as running, Client(running.address, token=TOKEN) as c:
            c.push(tmp_path / "m1.safetensors", "m")
            before = _blobs(running.store.root)
            payload_pages = -(-(tmp_path / "m2.safetensors").stat().st_size // 4096) * 4096
            with sqlite3.connect(running.store.root / "index.sqlite"):  # its -shm counted as used, as in a publish
                stat = os.statvfs(mount)
                with open(mount / "filler", "wb") as fh:
                    fh.write(b"\0" * (stat.f_bavail * stat.f_frsize - payload_pages))
            with pytest.raises(Exception, match="registry storage error"):
                c.push(tmp_path / "m2.safetensors", "m")
            assert _blobs(running.store.root) == before
            (mount / "filler").unlink()
            assert running.store.check() == [] and [v.ref for v in c.log("m")] == ["m:1"]
            assert c.push(tmp_path / "m2.safetensors", "m").ref == "m:2"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_registry_killed_between_blob_and_index_commit_then_fsck_prune(tmp_path):
    """SIGKILL while the publish waits for the index: fsck names the unreferenced payload; --prune deletes
    exactly it; every version still verifies and pulls."""
    _models(tmp_path, 1, 2)
    root = tmp_path / "store"
    (tmp_path / "token").write_text(TOKEN + "\n")
    proc, address = spawn_registry(root, "--token-file", str(tmp_path / "token"))
    try:
        with Client(address, token=TOKEN) as c:
            c.push(tmp_path / "m1.safetensors", "m")
            c.push(tmp_path / "m1.safetensors", "alias")  # the same payload under a second name
        kept = _blobs(root)
        with _index_write_locked(root):
            pusher = threading.Thread(target=_push_ignoring_errors, args=(address, tmp_path / "m2.safetensors"), daemon=True)
            pusher.start()
            _wait_for(lambda: len(_blobs(root)) == len(kept) + 1)  # stored; its version is waiting for the index
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        pusher.join(30)
    finally:
        proc.kill()
    (orphan,) = _blobs(root) - kept

    found = _fsck(root)
    assert found.exit_code != 0 and f"payload {orphan} belongs to no version" in found.output
    assert "--prune` can delete the unreferenced payloads" in str(found.exception) and "✗" not in found.output
    pruned = _fsck(root, "--prune")
    assert pruned.exit_code == 0, pruned.output
    assert f"removed {orphan}" in pruned.output and "removed 1 unreferenced payload(s)" in pruned.output
    assert _blobs(root) == kept and _fsck(root).exit_code == 0
    with start_registry(root, policy=AccessPolicy(token=TOKEN)) as running, Client(running.address, token=TOKEN) as c:
        for ref in ("m:1", "alias:1"):
            c.pull(ref, tmp_path / "back.safetensors")
            assert (tmp_path / "back.safetensors").read_bytes() == (tmp_path / "m1.safetensors").read_bytes()


def test_prune_refuses_while_the_index_does_not_verify(client, registry, tmp_path):
    """A payload whose index row was lost is the only copy of that version: --prune keeps it."""
    _models(tmp_path, 1, 2)
    client.push(tmp_path / "m1.safetensors", "m")
    lost = client.push(tmp_path / "m2.safetensors", "m")
    with sqlite3.connect(registry.store.root / "index.sqlite") as db:
        db.execute("DELETE FROM versions WHERE version = 2")
        db.execute("INSERT INTO tags VALUES ('m', 'prod', 2)")
    refused = _fsck(registry.store.root, "--prune")
    assert refused.exit_code != 0 and "not pruning" in str(refused.exception)
    assert "m@prod: points at version 2" in refused.output and f"payload {lost.sha256} belongs to no version" in refused.output
    assert registry.store.blob_path(lost.sha256).is_file()


def test_prune_waits_for_a_publish_that_is_committing_and_keeps_its_payload(client, registry, tmp_path):
    _models(tmp_path, 1, 2)
    client.push(tmp_path / "m1.safetensors", "m")
    root = registry.store.root
    with _index_write_locked(root):
        pusher = threading.Thread(target=client.push, args=(tmp_path / "m2.safetensors", "m"), daemon=True)
        pusher.start()
        _wait_for(lambda: len(_blobs(root)) == 2)  # its payload is stored, no version names it yet
        results = []
        pruner = threading.Thread(target=lambda: results.append(_fsck(root, "--prune")), daemon=True)
        pruner.start()
        time.sleep(1.0)
        assert pruner.is_alive()  # waiting for the publish, not deleting its payload
    pusher.join(60)
    pruner.join(60)
    assert results[0].exit_code == 0 and "removed 0 unreferenced payload(s)" in results[0].output
    client.pull("m:2", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == (tmp_path / "m2.safetensors").read_bytes()


def _push_ignoring_errors(address, path) -> None:
    try:
        with Client(address, token=TOKEN) as c:
            c.push(path, "m")
    except Exception:  # noqa: BLE001 - the registry is killed under it
        pass


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
