"""Registry throughput: push and pull of a ~100 MB model versus a plain file copy, side by side.

The registry runs as its own process (``fedweights registry serve``) on loopback, as it would
for a local user; each figure is the median of ``repeats`` runs. Push includes hashing on both
sides and the registry's fsync; pull includes verifying every hash and fsyncing the output.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .client import Client
from .payload import digest_file
from .server import spawn_registry

TOKEN = "bench-token-0123456789abcdef"


def run(megabytes: int = 100, repeats: int = 3) -> dict:
    """Measure and return MB/s for copy, hash, push (new and deduplicated) and pull."""
    with tempfile.TemporaryDirectory(prefix="fedweights-bench-") as tmp:
        tmp = Path(tmp)
        model = tmp / "model.safetensors"
        per = megabytes * 10**6 // 4 // 4
        save_file({f"layer{i}.weight": torch.randn(per) for i in range(4)}, str(model))
        size_mb = model.stat().st_size / 1e6
        (tmp / "token").write_text(TOKEN)
        variants = [_variant(model, tmp, i) for i in range(repeats)]
        server, address = spawn_registry(tmp / "store", "--token-file", str(tmp / "token"))
        try:
            with Client(address, token=TOKEN) as client:
                client.list()
                timings = {
                    "copy": _median(repeats, lambda i: shutil.copyfile(model, tmp / f"copy{i}")),
                    "copy_fsync": _median(repeats, lambda i: _copy_fsync(model, tmp / f"copy-fsync{i}")),
                    "sha256_per_tensor": _median(repeats, lambda i: digest_file(model)),
                    "push_new": _median(repeats, lambda i: client.push(variants[i], f"bench{i}")),
                    "push_deduplicated": _median(repeats, lambda i: client.push(model, "bench-dedup")),
                    "pull": _median(repeats, lambda i: client.pull("bench-dedup:1", tmp / f"pulled{i}")),
                }
        finally:
            server.terminate()
            server.wait(30)
    rates = {f"{k}_mb_s": round(size_mb / s, 1) for k, s in timings.items()}
    return {
        "benchmark": "registry",
        "model_mb": round(size_mb, 1),
        "repeats": repeats,
        "seconds": {k: round(s, 3) for k, s in timings.items()},
        **rates,
        "push_vs_copy_fsync": round(timings["push_new"] / timings["copy_fsync"], 2),
        "pull_vs_copy_fsync": round(timings["pull"] / timings["copy_fsync"], 2),
        "note": "loopback gRPC, registry in its own process; push hashes while streaming and the registry re-hashes and fsyncs; pull verifies every hash and fsyncs",
    }


def _variant(model: Path, tmp: Path, i: int) -> Path:
    """A copy of the model whose last value differs, so each push stores a new blob."""
    path = tmp / f"variant{i}.safetensors"
    shutil.copyfile(model, path)
    with open(path, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(i.to_bytes(4, "little"))
    return path


def _median(repeats: int, action) -> float:
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        action(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _copy_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())
