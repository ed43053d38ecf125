"""The registry's storage: content-addressed payload blobs plus a SQLite index of versions.

Layout of a registry root::

    index.sqlite            versions(name, version, digest, manifest, sha256, created_at), tags
    blobs/sha256/ab/ab12…   each distinct payload once, named by its sha256, read-only
    tmp/                    uploads in progress (emptied when a server opens the root)

Publishing is crash-safe: the payload is streamed into ``tmp/``, fsynced and renamed to its
hash; only then does ONE SQLite transaction assign the version number and insert the manifest.
No version is ever half visible. Every check that can refuse a publish runs before the payload
is stored; if the index transaction still fails (disk full, I/O error), the publish deletes the
blob it added unless a version names it (blobs.py). Only a crash between the two steps leaves an
unreferenced blob, which ``fedweights registry fsck`` reports and ``--prune`` deletes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from google.protobuf.timestamp_pb2 import Timestamp

from ..errors import UserError
from ..fileio import _fsync_dir
from ..proto import registry_pb2 as pb
from .blobs import drop_if_unreferenced, publish_lock, unreferenced
from .manifest import IntegrityError, Ref, check_chain, decode, encode, payload_mismatches, tensor_entries
from .payload import PayloadDigest, PayloadHasher, iter_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL, manifest BLOB NOT NULL,
    sha256 TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL, tag TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (name, tag, version));
"""


class NotFound(UserError):
    """The model, version or tag does not exist in the registry."""


class StorageError(Exception):
    """The store's disk or index failed (not the caller's fault); nothing was published."""


class Upload:
    """A payload being received: written to ``tmp/`` and hashed as it arrives."""

    def __init__(self, store: WeightStore) -> None:
        self._store = store
        # Opened before any byte is written: after a failed publish it can still read the index to
        # prove its blob unreferenced, even when the upload has filled the disk.
        self.index = store._connect()
        fd, self._path = tempfile.mkstemp(dir=store.root / "tmp", suffix=".upload")
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._hasher = PayloadHasher()

    def write(self, chunk: bytes) -> None:
        """Append and hash the next chunk (raises PayloadError on a malformed payload)."""
        self._hasher.update(chunk)
        self._file.write(chunk)

    def commit(self, expected_sha256: str = "") -> tuple[PayloadDigest, bool]:
        """Make the payload durable under its hash; return its digest and whether it was stored already.

        Raises PayloadError for a malformed payload and IntegrityError when it does not hash to
        ``expected_sha256`` (what the sender computed); nothing is stored then.
        """
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = self._hasher.finish()
        if expected_sha256 and expected_sha256 != digest.sha256:
            raise IntegrityError(
                f"upload corrupted in transit: received bytes hash to {digest.sha256}, the sender computed {expected_sha256}"
            )
        target = self._store.blob_path(digest.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        existed = target.exists()
        os.chmod(self._path, 0o444)
        os.replace(self._path, target)  # also replaces a damaged copy with the verified one
        _fsync_dir(target.parent)
        return digest, existed

    def discard(self) -> None:
        """Drop the partial upload."""
        self._file.close()
        self.index.thing.close()
        Path(self._path).unlink(missing_ok=True)


class WeightStore:
    """Blobs + index under one root directory; safe for concurrent use by many threads."""

    busy_timeout = 60.0  # seconds an index write waits for another writer before it fails

    def __init__(self, root: str | Path, read_only: bool = False) -> None:
        """Open (and, unless ``read_only``, create) the store at ``root``; read-only never writes to it."""
        self.root = Path(root)
        self.read_only = read_only
        try:
            if read_only:
                with self._connect() as db:
                    tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not {"versions", "tags"} <= tables:
                    raise sqlite3.DatabaseError("its index.sqlite has no versions/tags tables")
                return
            for sub in ("blobs/sha256", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"cannot use {self.root} as a registry store: {exc}") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the root for one server: refuse a second one; clear uploads a crash left behind."""
        with open(self.root / ".lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"registry root {self.root} is already served by another process") from None
            for stale in (self.root / "tmp").iterdir():
                stale.unlink(missing_ok=True)
            yield

    def blob_path(self, sha256: str) -> Path:
        """Where the payload with this sha256 lives."""
        return self.root / "blobs" / "sha256" / sha256[:2] / sha256

    def upload(self) -> Upload:
        """Start receiving a payload."""
        return Upload(self)

    def check_publish(self, header: pb.PublishHeader) -> None:
        """Everything that can refuse a publish, run before its payload is stored: raise NotFound
        unless the explicit parent is in the index, IntegrityError if the parent's manifest (the
        explicit one, or the name's newest version) was altered.

        Versions are never deleted and a new newest version is written by this code, so the
        parent ``add_version`` links to passes the same checks.
        """
        with self._connect() as db:
            if header.HasField("parent"):
                self._parent_digest(db, header.parent)
                return
            (latest,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM versions WHERE name = ?", (header.name,)).fetchone()
            self._parent_digest(db, pb.ModelRef(name=header.name, version=latest))

    def publish(
        self, upload: Upload, header: pb.PublishHeader, publisher: str, expected_sha256: str = ""
    ) -> tuple[pb.ManifestRecord, PayloadDigest, bool]:
        """Store the received payload and commit its version; return (record, digest, deduplicated).

        If the version cannot be committed the payload blob this call added is deleted again
        (unless a version names it) and the error is raised; the upload is discarded on any failure.
        """
        with upload.index as reader:
            with publish_lock(self.root, exclusive=False):  # no prune between the blob and its index row
                try:
                    digest, existed = upload.commit(expected_sha256=expected_sha256)
                except BaseException:
                    upload.discard()
                    raise
                try:
                    return self.add_version(header.name, header, digest, publisher), digest, existed
                except sqlite3.Error as exc:
                    failure: BaseException = StorageError(
                        f"cannot record the new version of {header.name} in the registry index ({exc}); nothing was published"
                    )
                except BaseException as exc:
                    failure = exc
            if not existed:
                drop_if_unreferenced(self, digest.sha256, reader)
        raise failure

    def add_version(self, name: str, header: pb.PublishHeader, digest: PayloadDigest, publisher: str) -> pb.ManifestRecord:
        """Assign the next version of ``name`` to a committed payload, in one transaction."""
        created = Timestamp()
        created.GetCurrentTime()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # serialises publishers: versions are 1, 2, 3, ... in commit order
            try:
                (latest,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM versions WHERE name = ?", (name,)).fetchone()
                parent = header.parent if header.HasField("parent") else pb.ModelRef(name=name, version=latest)
                parent_digest = self._parent_digest(db, parent)
                manifest = pb.WeightManifest(
                    name=name, version=latest + 1, sha256=digest.sha256, size_bytes=digest.size_bytes,
                    tensors=tensor_entries(digest), parent=parent if parent.version else None,
                    parent_digest=parent_digest, tags=list(header.tags), created_at=created,
                    run_id=header.run_id, round=header.round, privacy=header.privacy, publisher=publisher,
                )  # fmt: skip
                record = encode(manifest)
                db.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                    (name, manifest.version, record.digest, record.manifest, digest.sha256, created.ToJsonString()),
                )
                db.executemany("INSERT INTO tags VALUES (?, ?, ?)", [(name, t, manifest.version) for t in set(header.tags)])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (e.g. disk full): keep the real error
                    db.execute("ROLLBACK")
                raise
        return record

    def record(self, ref: Ref) -> pb.ManifestRecord:
        """The stored manifest of ``ref``, checked against its digest and its name's lineage links.

        Raises NotFound, or IntegrityError when a manifest of the name was altered.
        """
        with self._connect() as db:
            record = self._row(db, ref)
        self.versions(ref.name)  # checks every digest and parent link of the name
        decode(record, expect=ref)
        return record

    def versions(self, name: str) -> list[pb.ManifestRecord]:
        """Every version of ``name``, newest first, with the lineage links among them checked."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT version, manifest, digest FROM versions WHERE name = ? ORDER BY version DESC", (name,)
            ).fetchall()
        if not rows:
            raise NotFound(f"no model named {name!r} in the registry")
        records = [pb.ManifestRecord(manifest=m, digest=d) for _, m, d in rows]
        for (version, _, _), record in zip(rows, records):
            decode(record, expect=Ref(name, version))  # an altered manifest is named by its version
        check_chain(records)
        return records

    def lineage(self, ref: Ref) -> list[pb.ManifestRecord]:
        """``ref`` and its ancestors (following parent links, across names), each link checked."""
        records = [self.record(ref)]
        while True:
            manifest = decode(records[-1])
            if not manifest.parent.version:
                break
            records.append(self.record(Ref(manifest.parent.name, manifest.parent.version)))
        check_chain(records)
        return records

    def models(self) -> list[tuple[str, int, pb.ManifestRecord]]:
        """(name, number of versions, newest version's record) for every name."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT v.name, c.n, v.manifest, v.digest FROM versions v JOIN "
                "(SELECT name, COUNT(*) n, MAX(version) top FROM versions GROUP BY name) c "
                "ON v.name = c.name AND v.version = c.top ORDER BY v.name"
            ).fetchall()
        return [(name, n, pb.ManifestRecord(manifest=m, digest=d)) for name, n, m, d in rows]

    def open_blob(self, manifest: pb.WeightManifest) -> BinaryIO:
        """Open the payload of a manifest for reading."""
        try:
            return open(self.blob_path(manifest.sha256), "rb")
        except FileNotFoundError:
            raise IntegrityError(f"the payload of {manifest.name}:{manifest.version} is missing from the store") from None

    def check(self) -> list[str]:
        """Every problem ``check_versions`` finds, then every file in ``blobs/`` that no version names."""
        return self.check_versions() + [blob.describe() for blob in unreferenced(self)]

    def check_versions(self) -> list[str]:
        """Re-verify every manifest, lineage link, tag and referenced payload on disk; return all the
        problems found (unreferenced blobs are listed by ``blobs.unreferenced``)."""
        problems: list[str] = []
        with self._connect() as db:
            rows = db.execute("SELECT name, version, manifest, digest, sha256 FROM versions ORDER BY name, version").fetchall()
            tags = db.execute(
                "SELECT t.name, t.tag, t.version FROM tags t LEFT JOIN versions v ON t.name = v.name AND t.version = v.version "
                "WHERE v.name IS NULL ORDER BY t.name, t.tag"
            ).fetchall()
        problems += [f"{name}@{tag}: points at version {version}, which is not in the index" for name, tag, version in tags]
        records: dict[tuple[str, int], pb.ManifestRecord] = {}
        manifests: dict[tuple[str, int], pb.WeightManifest] = {}
        for name, version, manifest, digest, _ in rows:
            records[(name, version)] = pb.ManifestRecord(manifest=manifest, digest=digest)
            try:
                manifests[(name, version)] = decode(records[(name, version)], expect=Ref(name, version))
            except UserError as exc:
                problems.append(f"{name}:{version}: {exc}")
        for (name, version), manifest in manifests.items():
            parent = (manifest.parent.name, manifest.parent.version)
            if manifest.parent.version and parent not in records:
                problems.append(f"{name}:{version}: its parent {parent[0]}:{parent[1]} is missing from the index")
            elif manifest.parent.version and records[parent].digest != manifest.parent_digest:
                problems.append(f"{name}:{version}: lineage broken: its parent {parent[0]}:{parent[1]}'s manifest "
                                f"no longer has the digest it recorded ({manifest.parent_digest})")
            problems += [f"{name}:{version}: {p}" for p in self._payload_problems(manifest)]
        return problems

    def _payload_problems(self, manifest: pb.WeightManifest) -> list[str]:
        path = self.blob_path(manifest.sha256)
        if not path.is_file():
            return [f"payload {manifest.sha256} is missing"]
        hasher = PayloadHasher()
        try:
            for chunk in iter_file(path):
                hasher.update(chunk)
            return payload_mismatches(manifest, hasher.finish())
        except UserError as exc:
            return [f"payload {manifest.sha256}: {exc}"]

    def _parent_digest(self, db: sqlite3.Connection, parent: pb.ModelRef) -> str:
        """The digest of the parent's manifest ('' for no parent); NotFound if it is not in the index."""
        if not parent.version:
            return ""
        try:  # decoding checks the parent's manifest: nothing is built on an altered one
            ref = Ref(parent.name, parent.version)
            record = self._row(db, ref)
            decode(record, expect=ref)
            return record.digest
        except NotFound:
            raise NotFound(
                f"the parent {parent.name}:{parent.version} is not in the registry: name an existing version "
                f"(see `fedweights weights log {parent.name}`), or publish without a parent"
            ) from None

    def _row(self, db: sqlite3.Connection, ref: Ref) -> pb.ManifestRecord:
        if ref.version is not None:
            query, args = "SELECT manifest, digest FROM versions WHERE name = ? AND version = ?", (ref.name, ref.version)
        elif ref.tag is not None:
            query = (
                "SELECT manifest, digest FROM versions WHERE name = ? AND version = "
                "(SELECT MAX(version) FROM tags WHERE name = ? AND tag = ?)"
            )
            args = (ref.name, ref.name, ref.tag)
        else:
            query, args = "SELECT manifest, digest FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1", (ref.name,)
        row = db.execute(query, args).fetchone()
        if row is None:
            raise NotFound(f"{ref} is not in the registry")
        return pb.ManifestRecord(manifest=row[0], digest=row[1])

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        index = self.root / "index.sqlite"
        if self.read_only:
            return contextlib.closing(sqlite3.connect(f"{index.absolute().as_uri()}?mode=ro", uri=True, timeout=self.busy_timeout))
        db = sqlite3.connect(index, isolation_level=None, timeout=self.busy_timeout)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return contextlib.closing(db)
