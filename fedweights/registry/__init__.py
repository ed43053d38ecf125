"""The weight registry: every global model as a versioned, verifiable artefact with lineage and a
privacy certificate (gRPC service ``fedweights.v1.WeightRegistry``, see protos/)."""

from .client import Client, ModelSummary, Version
from .diff import TensorChange
from .manifest import IntegrityError, Ref, parse_ref
from .server import RunningRegistry, start_registry
from .auth import AccessPolicy
from .store import NotFound, WeightStore

__all__ = [
    "AccessPolicy", "Client", "IntegrityError", "ModelSummary", "NotFound", "Ref", "RunningRegistry",
    "TensorChange", "Version", "WeightStore", "parse_ref", "start_registry",
]  # fmt: skip
