"""Payload blobs that no version names: how a failed publish removes its own, and ``fsck --prune``.

A publish renames its payload into ``blobs/`` before the index transaction that creates its
version (store.py), so for a moment the blob is named by nothing. Whatever deletes unreferenced
blobs must never run in that moment, or it would delete the payload of a version about to exist:

* every publish holds ``.publish.lock`` *shared* from just before its payload is renamed into
  ``blobs/`` until its index transaction has committed or rolled back;
* deleting takes it *exclusively*, reads the index under it and deletes only blobs that no row
  and no manifest names. Content addressing means an identical payload may already belong to
  another version: such a blob is named by that version's row and is never deleted.

Publishers only wait for a delete in progress (milliseconds), so pruning a served store is safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..fileio import _fsync_dir
from ..proto import registry_pb2 as pb

if TYPE_CHECKING:
    from .store import WeightStore

LOCK_FILE = ".publish.lock"
SHA256 = re.compile(r"[0-9a-f]{64}")
log = logging.getLogger("fedweights.registry")


@dataclass(frozen=True)
class Unreferenced:
    """A file under ``blobs/sha256/`` that no version names."""

    path: Path
    size: int

    @property
    def is_payload(self) -> bool:
        """Whether it is named and placed like a payload (``ab/ab12…``, 64 hex digits)."""
        return bool(SHA256.fullmatch(self.path.name)) and self.path.parent.name == self.path.name[:2]

    def describe(self) -> str:
        """One line for fsck."""
        if not self.is_payload:
            return f"unexpected file {self.path} in the payload store (not named like a payload; never pruned)"
        return (
            f"payload {self.path.name} belongs to no version in the index ({self.size} bytes): left by a failed or "
            "interrupted publish, or the index lost its version's entry"
        )


@contextlib.contextmanager
def publish_lock(root: Path, exclusive: bool) -> Iterator[None]:
    """Hold ``ROOT/.publish.lock``: shared by a publish, exclusive while unreferenced blobs are deleted."""
    with open(root / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield  # closing the file releases the lock


def referenced(store: WeightStore, db: sqlite3.Connection | None = None) -> set[str]:
    """Every sha256 the index names: its sha256 column and, to be safe, what each manifest says.

    ``db``: an index connection to read with (default: a new one).
    """
    with contextlib.nullcontext(db) if db is not None else store._connect() as conn:
        rows = conn.execute("SELECT sha256, manifest FROM versions").fetchall()
    names = {sha for sha, _ in rows}
    for _, data in rows:
        with contextlib.suppress(Exception):  # an altered manifest is fsck's business, not a licence to delete
            names.add(pb.WeightManifest.FromString(data).sha256)
    return names


def unreferenced(store: WeightStore) -> list[Unreferenced]:
    """Files under ``blobs/sha256/`` that no version names, sorted by path."""
    names = referenced(store)
    return [
        Unreferenced(path, path.lstat().st_size)
        for path in sorted((store.root / "blobs" / "sha256").glob("*/*"))
        if path.name not in names
    ]


def prune(store: WeightStore) -> list[Unreferenced]:
    """Delete every payload blob that no version names, under the exclusive publish lock; return them.

    The index is read again under the lock, so a blob that a publish has just stored (or that a
    version acquired since the caller last looked) is kept. Files not named like payloads are kept.
    """
    with publish_lock(store.root, exclusive=True):
        removed = [blob for blob in unreferenced(store) if blob.is_payload]
        for blob in removed:
            blob.path.unlink(missing_ok=True)
        for parent in {blob.path.parent for blob in removed}:
            _fsync_dir(parent)
    return removed


def drop_if_unreferenced(store: WeightStore, sha256: str, db: sqlite3.Connection) -> bool:
    """After a failed publish: delete the blob it added unless a version names it; return whether deleted.

    Call without holding the publish lock. ``db`` is an index connection opened before the blob
    was stored, so it can still read when the disk is now full. When the index cannot be read
    the blob is kept (``fsck --prune`` removes it later): nothing is deleted on a guess.
    """
    try:
        with publish_lock(store.root, exclusive=True):
            if sha256 in referenced(store, db):
                return False  # an identical payload belongs to another version (or arrived meanwhile)
            path = store.blob_path(sha256)
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)
            return True
    except Exception as exc:  # noqa: BLE001 - the publish already failed; report its own error, not this one
        log.warning("kept payload %s of a failed publish (%s); `fedweights registry fsck --prune` removes it", sha256, exc)
        return False
