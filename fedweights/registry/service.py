"""The WeightRegistry gRPC servicer: the store's operations behind authorization and checks."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
from collections.abc import Iterator

import grpc

from ..errors import UserError
from ..proto import registry_pb2 as pb
from ..proto import registry_pb2_grpc as pb_grpc
from .auth import AccessPolicy
from .manifest import IntegrityError, check_name, check_tag, decode, parse_ref
from .payload import CHUNK_SIZE
from .store import NotFound, StorageError, WeightStore

log = logging.getLogger("fedweights.registry")
MIN_CHUNK, MAX_CHUNK = 64 << 10, 3 << 20  # a chunk plus framing stays under gRPC's 4 MiB message limit


class RegistryServicer(pb_grpc.WeightRegistryServicer):
    """Serves one WeightStore under an AccessPolicy."""

    def __init__(self, store: WeightStore, policy: AccessPolicy) -> None:
        self.store = store
        self.policy = policy

    def Publish(self, request_iterator: Iterator[pb.PublishRequest], context: grpc.ServicerContext) -> pb.PublishResponse:
        identity = self.policy.authorize(context, write=True)
        with _status(context):
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise UserError("a publish stream must start with a PublishHeader")
            header = first.header
            check_name(header.name)
            for tag in header.tags:
                check_tag(tag)
            self.store.check_publish(header)  # before any byte is stored: a refused publish leaves no blob
            upload = self.store.upload()
            try:
                expected = _receive(request_iterator, upload, header.sha256)
                if not context.is_active():
                    raise UserError("the client went away before the upload finished")
            except BaseException:
                upload.discard()
                raise
            record, digest, existed = self.store.publish(upload, header, identity, expected_sha256=expected)
            manifest = decode(record)
            log.info("published %s:%d sha256:%s (%d bytes%s) by %s", manifest.name, manifest.version,
                     digest.sha256[:12], digest.size_bytes, ", deduplicated" if existed else "", identity)  # fmt: skip
            return pb.PublishResponse(record=record, deduplicated=existed)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Iterator[pb.GetResponse]:
        self.policy.authorize(context, write=False)
        with _status(context):
            record = self.store.record(parse_ref(request.ref))
            manifest = decode(record)
            chunk_size = min(max(request.chunk_size or CHUNK_SIZE, MIN_CHUNK), MAX_CHUNK)
            yield pb.GetResponse(record=record)
            hasher = hashlib.sha256()
            with self.store.open_blob(manifest) as blob:
                while chunk := blob.read(chunk_size):
                    hasher.update(chunk)
                    yield pb.GetResponse(chunk=chunk)
            if hasher.hexdigest() != manifest.sha256:
                raise IntegrityError(
                    f"the stored payload of {manifest.name}:{manifest.version} was altered: it hashes to "
                    f"{hasher.hexdigest()}, its manifest says {manifest.sha256}"
                )

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        self.policy.authorize(context, write=False)
        with _status(context):
            models = [pb.ModelSummary(name=n, versions=c, latest=r) for n, c, r in self.store.models()]
            return pb.ListResponse(models=models)

    def Log(self, request: pb.LogRequest, context: grpc.ServicerContext) -> pb.LogResponse:
        self.policy.authorize(context, write=False)
        with _status(context):
            ref = parse_ref(request.ref)
            if ref.version is None and ref.tag is None:
                return pb.LogResponse(records=self.store.versions(ref.name))
            return pb.LogResponse(records=self.store.lineage(ref))

    def Resolve(self, request: pb.ResolveRequest, context: grpc.ServicerContext) -> pb.ResolveResponse:
        self.policy.authorize(context, write=False)
        with _status(context):
            return pb.ResolveResponse(record=self.store.record(parse_ref(request.ref)))

    def CheckAccess(self, request: pb.CheckAccessRequest, context: grpc.ServicerContext) -> pb.CheckAccessResponse:
        return pb.CheckAccessResponse(identity=self.policy.authorize(context, write=request.write))


def _receive(requests: Iterator[pb.PublishRequest], upload, header_sha256: str) -> str:
    """Write the chunks to ``upload``; return the sha256 the sender vouches for (header or trailer)."""
    trailer = None
    for request in requests:
        part = request.WhichOneof("part")
        if trailer is not None or part == "header":
            raise UserError("a publish stream is one header, the chunks, then at most one trailer")
        if part == "chunk":
            upload.write(request.chunk)
        else:
            trailer = request.trailer
    claimed = {h for h in (header_sha256, trailer.sha256 if trailer else "") if h}
    if len(claimed) > 1:
        raise IntegrityError(f"the header and the trailer name different sha256 values: {sorted(claimed)}")
    return claimed.pop() if claimed else ""


@contextlib.contextmanager
def _status(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn fedweights errors into gRPC status codes with the same message."""
    try:
        yield
    except NotFound as exc:
        context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    except IntegrityError as exc:
        log.error("integrity: %s", exc)
        context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
    except UserError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except StorageError as exc:  # the index could not be written: the publish removed what it stored
        log.error("storage error: %s", exc)
        context.abort(grpc.StatusCode.INTERNAL, f"registry storage error: {exc}")
    except OSError as exc:  # e.g. the store's disk is full: the upload was discarded
        log.exception("storage error")
        context.abort(grpc.StatusCode.INTERNAL, f"registry storage error: {exc.strerror or exc}")
    except sqlite3.Error as exc:  # the index cannot be read (a read of a broken store)
        log.exception("index error")
        context.abort(grpc.StatusCode.INTERNAL, f"registry index error: {exc}")
