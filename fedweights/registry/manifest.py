"""Manifests: what a published version says about itself, and how anyone checks it.

A manifest is stored and sent as the exact serialized ``WeightManifest`` bytes; its digest is
``sha256:<hex>`` of those bytes, so checking it never depends on re-encoding. Each manifest
names its parent's digest, which makes a name's history a hash chain (like git commits).

What "tampered" means, precisely:

* tampered payload: the bytes served for a version do not hash to the manifest's ``sha256``
  (or a tensor's bytes do not hash to its ``TensorEntry.sha256``);
* tampered manifest: the stored manifest bytes do not hash to the digest recorded for the
  version, or a child's ``parent_digest`` does not match its parent's manifest (which catches a
  manifest rewritten together with its digest, unless it is the newest version).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from ..errors import UserError
from ..proto import registry_pb2 as pb
from .payload import PayloadDigest

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
TAG_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
MAX_NAME = 200
LATEST = "latest"


class IntegrityError(UserError):
    """Stored or received data does not match its hashes: it was corrupted or tampered with."""

    exit_code = 3


@dataclass(frozen=True)
class Ref:
    """A reference to one version: ``name``, ``name:version`` or ``name@tag``."""

    name: str
    version: int | None = None  # None: the newest (or the newest carrying ``tag``)
    tag: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        return f"{self.name}@{self.tag}" if self.tag else self.name


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise UserError saying why."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or not NAME_PATTERN.fullmatch(name):
        raise UserError(
            f"invalid model name {name!r}: use letters, digits, '.', '_', '-', and '/' between parts "
            f"(at most {MAX_NAME} characters, starting with a letter or digit)"
        )
    return name


def check_tag(tag: str) -> str:
    """Return ``tag`` if valid (starts with a letter, so it never reads as a version number)."""
    if not isinstance(tag, str) or not TAG_PATTERN.fullmatch(tag) or len(tag) > 100:
        raise UserError(f"invalid tag {tag!r}: start with a letter; then letters, digits, '.', '_', '-'")
    if tag == LATEST:
        raise UserError(f"the tag {LATEST!r} is reserved: 'name@{LATEST}' always means the newest version")
    return tag


def parse_ref(text: str) -> Ref:
    """Parse ``name``, ``name:version`` or ``name@tag`` (raise UserError on bad input)."""
    if not isinstance(text, str):
        raise UserError(f"invalid reference {text!r}: write NAME, NAME:VERSION or NAME@TAG as a string")
    if ":" in text:
        name, _, version = text.rpartition(":")
        if not version.isdigit() or not 1 <= int(version) < 2**63:  # the index stores 64-bit integers
            raise UserError(f"invalid reference {text!r}: the version after ':' must be a number from 1 to 2**63-1")
        return Ref(check_name(name), version=int(version))
    if "@" in text:
        name, _, tag = text.rpartition("@")
        return Ref(check_name(name), tag=None if tag == LATEST else check_tag(tag))
    return Ref(check_name(text))


def digest_of(manifest_bytes: bytes) -> str:
    """The digest of serialized manifest bytes: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def encode(manifest: pb.WeightManifest) -> pb.ManifestRecord:
    """Serialize a manifest (deterministically) together with its digest."""
    data = manifest.SerializeToString(deterministic=True)
    return pb.ManifestRecord(manifest=data, digest=digest_of(data))


def decode(record: pb.ManifestRecord, expect: Ref | None = None) -> pb.WeightManifest:
    """Check a record's digest (and that it is the version asked for); return the manifest."""
    if digest_of(record.manifest) != record.digest:
        raise IntegrityError(
            f"manifest{f' of {expect}' if expect else ''} was altered: its bytes hash to "
            f"{digest_of(record.manifest)}, not the recorded {record.digest}"
        )
    manifest = pb.WeightManifest()
    try:
        manifest.ParseFromString(record.manifest)
    except DecodeError:
        raise IntegrityError(f"manifest {record.digest} is not a valid WeightManifest") from None
    if expect is not None:
        wrong = manifest.name != expect.name or (expect.version is not None and manifest.version != expect.version)
        if wrong or (expect.tag is not None and expect.tag not in manifest.tags):
            raise IntegrityError(f"asked for {expect}, received the manifest of {manifest.name}:{manifest.version}")
    return manifest


def tensor_entries(digest: PayloadDigest) -> list[pb.TensorEntry]:
    """Manifest tensor entries for a hashed payload."""
    return [
        pb.TensorEntry(name=t.name, dtype=t.dtype, shape=list(t.shape), sha256=t.sha256, size_bytes=t.size_bytes)
        for t in digest.tensors
    ]


def payload_mismatches(manifest: pb.WeightManifest, digest: PayloadDigest) -> list[str]:
    """How a payload differs from what the manifest records (empty list: it matches)."""
    problems = []
    if digest.sha256 != manifest.sha256:
        problems.append(f"payload sha256 {digest.sha256} != manifest {manifest.sha256}")
    if digest.size_bytes != manifest.size_bytes:
        problems.append(f"payload has {digest.size_bytes} bytes, manifest says {manifest.size_bytes}")
    expected = {t.name: t for t in manifest.tensors}
    actual = {t.name: t for t in digest.tensors}
    for name in sorted(expected.keys() - actual.keys()):
        problems.append(f"tensor {name!r} is missing")
    for name in sorted(actual.keys() - expected.keys()):
        problems.append(f"tensor {name!r} is not in the manifest")
    for name in sorted(expected.keys() & actual.keys()):
        want, got = expected[name], actual[name]
        if (want.dtype, tuple(want.shape)) != (got.dtype, got.shape):
            problems.append(f"tensor {name!r} is {got.dtype}{list(got.shape)}, manifest says {want.dtype}{list(want.shape)}")
        elif want.sha256 != got.sha256:
            problems.append(f"tensor {name!r} differs (sha256 {got.sha256[:12]}…, manifest {want.sha256[:12]}…)")
    return problems


def check_chain(records: list[pb.ManifestRecord]) -> list[pb.WeightManifest]:
    """Decode records and check every parent link whose parent is among them.

    Raises IntegrityError naming the first version whose manifest or parent link is broken.
    """
    manifests = [decode(r) for r in records]
    by_ref = {(m.name, m.version): r.digest for m, r in zip(manifests, records)}
    for manifest in manifests:
        parent = (manifest.parent.name, manifest.parent.version)
        if manifest.parent.version and parent in by_ref and by_ref[parent] != manifest.parent_digest:
            raise IntegrityError(
                f"lineage broken: {manifest.name}:{manifest.version} names parent {parent[0]}:{parent[1]} with "
                f"digest {manifest.parent_digest}, but that manifest now hashes to {by_ref[parent]} "
                "(the parent's manifest was rewritten)"
            )
    return manifests
