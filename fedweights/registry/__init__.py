"""The weight registry: every global model as a versioned, verifiable artefact with lineage and a
privacy certificate (gRPC service ``fedweights.v1.WeightRegistry``, see protos/)."""

import importlib

# Where each public name lives; imported on first use (PEP 562), so `import fedweights.registry.auth`
# (the CLI) does not pay for torch, which only the diff needs.
_EXPORTS = {
    "Client": "client", "ModelSummary": "client", "Version": "client", "TensorChange": "diff",
    "IntegrityError": "manifest", "Ref": "manifest", "parse_ref": "manifest", "RunningRegistry": "server",
    "start_registry": "server", "AccessPolicy": "auth", "NotFound": "store", "WeightStore": "store",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
