"""``fedweights.registry.Client``: publish, fetch and inspect versioned weights over gRPC.

    from fedweights.registry import Client

    with Client("127.0.0.1:9600", token_file="registry.token") as registry:
        v = registry.push("model.safetensors", "digits-mlp", tags=["candidate"], from_run="runs/demo")
        registry.pull("digits-mlp@candidate", "copy.safetensors")   # verified before it is written
        for version in registry.log("digits-mlp"):
            print(version.ref, version.sha256, version.privacy.statement)

Every download is checked end to end: the manifest against its digest, the payload's sha256
and every tensor's sha256 against the manifest. The output file is written atomically only
after all checks pass, so a corrupt or tampered version never reaches the caller's file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..errors import UserError
from ..fileio import atomic_open
from ..proto import registry_pb2 as pb
from ..proto import registry_pb2_grpc as pb_grpc
from .auth import channel_credentials, read_token
from .certificate import certificate_for_run, check_run_model, run_info, unknown_certificate
from .diff import TensorChange, diff_files
from .manifest import IntegrityError, Ref, check_chain, check_name, check_tag, decode, parse_ref, payload_mismatches
from .payload import CHUNK_SIZE, PayloadError, PayloadHasher, digest_file, iter_file
from .server import KEEPALIVE, MESSAGE_LIMIT
from .store import NotFound

ENV_ADDRESS = "FEDWEIGHTS_REGISTRY"
ENV_TOKEN_FILE = "FEDWEIGHTS_REGISTRY_TOKEN_FILE"
ENV_TLS_DIR = "FEDWEIGHTS_REGISTRY_TLS_DIR"


@dataclass(frozen=True)
class Version:
    """One published version: its verified manifest and the manifest's digest."""

    manifest: pb.WeightManifest
    digest: str

    @property
    def ref(self) -> str:
        """``name:version``."""
        return f"{self.manifest.name}:{self.manifest.version}"

    @property
    def sha256(self) -> str:
        """sha256 of the safetensors payload."""
        return self.manifest.sha256

    @property
    def parent(self) -> str | None:
        """``name:version`` of the parent, or None for a first version."""
        p = self.manifest.parent
        return f"{p.name}:{p.version}" if p.version else None

    @property
    def privacy(self) -> pb.PrivacyCertificate:
        """The privacy certificate copied from the producing run."""
        return self.manifest.privacy


@dataclass(frozen=True)
class ModelSummary:
    """A model name, how many versions it has, and its newest version."""

    name: str
    versions: int
    latest: Version


class Client:
    """A connection to a weight registry (``fedweights registry serve``)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        tls_dir: str | Path | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.address = address or os.environ.get(ENV_ADDRESS, "")
        if not self.address:
            raise UserError(f"no registry address: pass --registry HOST:PORT or set {ENV_ADDRESS}")
        token_file = token_file or os.environ.get(ENV_TOKEN_FILE) or None
        tls_dir = tls_dir or os.environ.get(ENV_TLS_DIR) or None
        token = token or (read_token(token_file) if token_file else None)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        options = [("grpc.max_receive_message_length", MESSAGE_LIMIT), *KEEPALIVE]
        if tls_dir:
            self._channel = grpc.secure_channel(self.address, channel_credentials(tls_dir), options=options)
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
        self._stub = pb_grpc.WeightRegistryStub(self._channel)

    # ----------------------------------------------------------- writes

    def push(
        self,
        path: str | Path,
        name: str,
        *,
        tags: str | list[str] | tuple[str, ...] | None = (),
        parent: str | None = None,
        from_run: str | Path | None = None,
        run_id: str = "",
        round: int = 0,
        privacy: pb.PrivacyCertificate | None = None,
    ) -> Version:
        """Publish a safetensors file as the next version of ``name``.

        ``tags``: one tag or a list of them. ``parent``: ``"name:version"`` (or ``"name@tag"``),
        ``"none"`` for no parent, default the newest version of ``name``. ``from_run``: a run
        directory whose id, last round and privacy report fill in ``run_id``, ``round`` and ``privacy``.
        """
        check_name(name)
        tags = _tag_list(tags)
        if not _path(path, "the file to push").is_file():
            raise UserError(f"file not found: {path}")
        if from_run is not None:
            run_id, round, metrics = run_info(from_run)
            check_run_model(path, from_run)  # the certificate must describe this file, not another model
            privacy = certificate_for_run(from_run, round, final=True, metrics=metrics)
        if not isinstance(run_id, str):
            raise UserError(f"run_id must be a string, not {run_id!r}")
        _count(round, "round", 0)
        if privacy is not None and not isinstance(privacy, pb.PrivacyCertificate):
            raise UserError(f"privacy must be a PrivacyCertificate (or from_run=RUN_DIR to take it from a run), not {privacy!r}")
        header = pb.PublishHeader(
            name=name, tags=tags, run_id=run_id, round=round, privacy=privacy or unknown_certificate()
        )
        if parent is not None:
            header.parent.CopyFrom(self._parent_ref(parent))
        hasher, failure = PayloadHasher(), []

        def requests() -> Iterator[pb.PublishRequest]:
            """Header, chunks hashed on the way out (one read of the file), then the trailer."""
            try:
                yield pb.PublishRequest(header=header)
                for chunk in iter_file(path):
                    hasher.update(chunk)
                    yield pb.PublishRequest(chunk=chunk)
                yield pb.PublishRequest(trailer=pb.PublishTrailer(sha256=hasher.finish().sha256))
            except Exception as exc:  # gRPC would only report "cancelled"
                failure.append(exc)
                raise

        try:
            response = self._call(self._stub.Publish, requests(), timeout=None)
        except UserError:
            if failure:
                raise _with_path(failure[0], path) from None
            raise
        version = _version(response.record, Ref(name))
        problems = payload_mismatches(version.manifest, hasher.finish())
        if problems:
            raise IntegrityError(f"the registry's manifest of {version.ref} does not match {path}: " + "; ".join(problems))
        return version

    # ----------------------------------------------------------- reads

    def pull(self, ref: str, out: str | Path, chunk_size: int = CHUNK_SIZE) -> Version:
        """Download ``ref`` to ``out``; the file appears only if every hash matches the manifest."""
        wanted, out = parse_ref(ref), _path(out, "the output file")
        if out.is_dir():
            raise UserError(f"{out} is a directory: give the path of the file to write, e.g. {out / 'model.safetensors'}")
        _count(chunk_size, "chunk_size", 1)
        stream = self._stub.Get(pb.GetRequest(ref=ref, chunk_size=chunk_size), metadata=self._metadata)
        version, hasher = None, PayloadHasher()
        try:
            with atomic_open(out) as fh:  # replaces `out` only if every check below passes
                for message in _translate(stream, self.address):
                    if message.WhichOneof("part") == "record":
                        version = _version(message.record, wanted)
                    elif version is None:
                        raise IntegrityError(f"the registry sent payload bytes for {ref} before its manifest")
                    else:
                        hasher.update(message.chunk)
                        fh.write(message.chunk)
                if version is None:
                    raise IntegrityError(f"the registry sent no manifest for {ref}")
                _check_payload(version, hasher)
        except OSError as exc:  # e.g. a parent of `out` is a file, or the disk is full
            raise UserError(f"cannot write {out}: {exc}") from None
        return version

    def resolve(self, ref: str) -> Version:
        """The manifest of ``name``, ``name:version`` or ``name@tag``."""
        wanted = parse_ref(ref)
        response = self._call(self._stub.Resolve, pb.ResolveRequest(ref=ref))
        return _version(response.record, wanted)

    def list(self) -> list[ModelSummary]:
        """Every model name with its number of versions and newest version."""
        response = self._call(self._stub.List, pb.ListRequest())
        return [ModelSummary(m.name, m.versions, _version(m.latest, Ref(m.name))) for m in response.models]

    def log(self, ref: str) -> list[Version]:
        """``name``: all its versions; ``name:version``/``name@tag``: that version's lineage. Newest first.

        The digests and parent links are re-checked here, independently of the registry.
        """
        wanted = parse_ref(ref)
        records = list(self._call(self._stub.Log, pb.LogRequest(ref=ref)).records)
        manifests = check_chain(records)
        if records:
            decode(records[0], expect=wanted)  # the log starts at what was asked for
        return [Version(m, r.digest) for m, r in zip(manifests, records)]

    def verify(self, path: str | Path, ref: str) -> tuple[Version, list[str]]:
        """Compare a local file with a published version: (version, list of differences)."""
        digest = digest_file(_path(path, "the file to verify"))
        version = self.resolve(ref)
        return version, payload_mismatches(version.manifest, digest)

    def diff(self, a: str, b: str) -> list[TensorChange]:
        """Per-tensor L2 and relative change from ``a`` to ``b`` (refs, or local safetensors files)."""
        with tempfile.TemporaryDirectory(prefix="fedweights-diff-") as tmp:
            paths = [self._local(ref, Path(tmp) / f"{i}.safetensors") for i, ref in enumerate((a, b))]
            return diff_files(*paths)

    def check_access(self, write: bool = False) -> str:
        """The identity the registry sees, if it allows reads (or ``write``s); else raise UserError."""
        return self._call(self._stub.CheckAccess, pb.CheckAccessRequest(write=write)).identity

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------- helpers

    def _local(self, ref: str | Path, tmp: Path) -> Path:
        if _path(ref, "each side of a diff (a ref or a file)").is_file():
            return Path(ref)
        if not isinstance(ref, str) or ref.startswith(("/", ".", "~")) or ref.endswith(".safetensors"):  # not a ref
            raise UserError(f"{ref}: no such file (a published version is written NAME:VERSION or NAME@TAG)")
        self.pull(ref, tmp)
        return tmp

    def _parent_ref(self, parent: str) -> pb.ModelRef:
        """The parent's exact version, resolved before anything is uploaded (NotFound if it does not exist)."""
        if parent == "none":
            return pb.ModelRef()
        try:
            manifest = self.resolve(parent).manifest
        except NotFound:
            raise NotFound(f"the parent {parent} is not in the registry: name an existing version, or 'none' for no parent") from None
        return pb.ModelRef(name=manifest.name, version=manifest.version)

    def _call(self, method, request, timeout: float | None = -1.0):
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout if timeout == -1.0 else timeout)
        except grpc.RpcError as exc:
            raise _user_error(exc, self.address) from None


def _version(record: pb.ManifestRecord, wanted: Ref) -> Version:
    return Version(decode(record, expect=wanted), record.digest)


def _tag_list(tags: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``tags`` checked, as a list: one string is one tag, None is no tags."""
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, (list, tuple, set, frozenset)):
        raise UserError(f"tags must be a tag or a list of tags, not {tags!r}")
    return [check_tag(t) for t in tags]


def _path(value: str | Path, what: str) -> Path:
    """``value`` as a Path; UserError if it is not a str or path."""
    if not isinstance(value, (str, os.PathLike)):
        raise UserError(f"{what} must be a str or pathlib.Path, not {value!r}")
    return Path(value)


def _count(value: int, what: str, minimum: int) -> None:
    """UserError unless ``value`` is an int (not a bool) of at least ``minimum`` that fits the wire format."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 2**32:
        raise UserError(f"{what} must be a whole number from {minimum} to 2**32-1, not {value!r}")


def _with_path(exc: Exception, path) -> Exception:
    """A failure while reading the file being pushed, as a user error naming the file."""
    if isinstance(exc, PayloadError):
        return PayloadError(f"{path}: {exc}")
    if isinstance(exc, OSError):
        return UserError(f"cannot read {path}: {exc.strerror or exc}")
    return exc


def _check_payload(version: Version, hasher: PayloadHasher) -> None:
    try:
        digest = hasher.finish()
    except PayloadError as exc:
        raise IntegrityError(f"the payload received for {version.ref} is damaged: {exc}") from None
    problems = payload_mismatches(version.manifest, digest)
    if problems:
        raise IntegrityError(f"the payload received for {version.ref} does not match its manifest: " + "; ".join(problems))


def _translate(stream, address: str):
    """Iterate a response stream, turning gRPC errors into fedweights errors."""
    try:
        yield from stream
    except grpc.RpcError as exc:
        raise _user_error(exc, address) from None


def _user_error(exc: grpc.RpcError, address: str) -> UserError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code == grpc.StatusCode.DATA_LOSS:
        return IntegrityError(f"the registry reports corruption: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return UserError(f"cannot reach the registry at {address} ({details}); is `fedweights registry serve` running there?")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return UserError(f"the registry at {address} refused: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return UserError(f"the registry at {address} did not answer in time")
    return UserError(f"registry error ({code.name}): {details}")
