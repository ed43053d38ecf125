"""Bytes in and out of SEAL objects through TenSEAL's ``sealapi`` bindings.

``sealapi`` exposes SEAL's ``save``/``load`` only with a file path. We want seeded symmetric
ciphertexts (``Encryptor.encrypt_symmetric`` returns a ``Serializable`` that stores the first
polynomial plus a 64-byte seed: half the bytes of a TenSEAL ``BFVVector``), so we pass SEAL a
scratch file that lives in memory (``memfd`` on Linux, a private temporary file elsewhere).
Each thread gets its own scratch file.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Any

_local = threading.local()


class _Scratch:
    """A per-thread file SEAL writes to and reads from; in memory where the OS allows."""

    def __init__(self) -> None:
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            self.fd = os.memfd_create("fedweights-seal", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self.fd}"
        else:  # pragma: no cover - non-Linux platforms
            self.fd, self.path = tempfile.mkstemp(prefix="fedweights-seal-")

    def read(self) -> bytes:
        return os.pread(self.fd, os.fstat(self.fd).st_size, 0)

    def write(self, data: bytes) -> None:
        # Truncate to exactly ``data``: a short (truncated) object must hit end-of-file, not be
        # completed by the stale bytes of the larger object written before it.
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


def _scratch() -> _Scratch:
    scratch = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = _Scratch()
    return scratch


def dump(obj: Any) -> bytes:
    """SEAL's serialisation (compressed) of a Ciphertext or Serializable, as bytes."""
    scratch = _scratch()
    obj.save(scratch.path)
    return scratch.read()


def load_ciphertext(seal_context: Any, data: bytes) -> Any:
    """A ``sealapi.Ciphertext`` from bytes; SEAL checks it is valid for ``seal_context``.

    Raises ``ValueError`` (with SEAL's reason) for truncated, corrupt or foreign-parameter data.
    """
    from tenseal import sealapi

    scratch = _scratch()
    scratch.write(data)
    ciphertext = sealapi.Ciphertext()
    try:
        ciphertext.load(seal_context, scratch.path)
    except Exception as exc:  # SEAL raises std::logic_error / runtime_error subclasses
        raise ValueError(str(exc) or type(exc).__name__) from None
    return ciphertext
