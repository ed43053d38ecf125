"""Side-by-side benchmark: fedweights' encrypted aggregation versus NVIDIA FLARE's TenSEAL setup.

fedweights is measured twice: with its default full ciphertexts and with ``he.compact`` (seeded
ciphertexts, half the upload). All setups get the same synthetic client models (``clients`` ×
``params`` float32 values in four layers, example counts 50..500) and compute the same
example-weighted average. Per setup:

* ``bytes_per_param``: serialised bytes one client sends, divided by ``params``;
* ``client_encrypt_s``: weighting + encoding + encryption + serialisation, median over clients;
* ``server_aggregate_s``: deserialise (and for fedweights, validate) every client's payload and add
  it into the running total, for all clients (NVFlare: multiplying by the weights included), best
  of ``repeats`` (3) passes; ``server_serialise_s`` is the extra time to serialise the result;
  ``server_sum_then_scale_s`` times NVFlare's other pairing (clients pre-weight, the server adds
  and multiplies once by 1/N: the same operations whatever the values, so timed on the same data);
* ``decrypt_s``: one client decrypting the aggregate into weights (best of ``repeats``);
* ``max_abs_error``: against the float64 weighted average;
* ``server_peak_rss_mb``: peak resident memory of the process that aggregated. Each setup's
  server runs in its own fresh subprocess that reads the client payloads from disk one at a time
  (as a streaming coordinator would receive them), so one setup's memory never counts for the
  other; ``server_baseline_rss_mb`` is the same process before the first payload.

Run as ``fedweights bench he`` or ``make bench``; timings are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tenseal as ts
import torch

from . import nvflare_reference as nvflare
from .aggregate import EncryptedSum, RoundExpectation
from .codec import decrypt_envelope, encrypt_update, layout_of
from .envelope import TensorInfo, load_envelope, save_envelope
from .keys import load_client_key, load_server_key, make_keys

REPEATS = 3  # default: server passes and decryptions are timed as the best of this many, interleaved
TARGETS = {"bytes_per_param_max": 12.0, "server_speedup_min": 5.0, "client_speedup_min": 1.8, "max_abs_error_max": 1e-6}


def run(params: int = 1_000_000, clients: int = 10, seed: int = 0, repeats: int = REPEATS) -> dict:
    """Measure all setups on the same data in this run; return the comparison as a dict.

    Every measurement is interleaved across setups (client k of each setup in turn, server pass p
    of each setup in turn), so a machine whose load changes during the run affects all alike.
    """
    if params < 1000 or clients < 1 or repeats < 1:
        raise ValueError("need at least 1000 params, 1 client and 1 repeat")
    updates, counts = synthetic_updates(params, clients, seed)
    reference = {
        name: sum(u[name].astype(np.float64) * n for u, n in zip(updates, counts)) / sum(counts) for name in updates[0]
    }
    with tempfile.TemporaryDirectory(prefix="fedweights-bench-he-") as tmp:
        work = Path(tmp)
        (work / "counts.json").write_text(json.dumps(counts))
        setups = {
            "fedweights": _FedweightsSetup(work / "fedweights", compact=False),
            "fedweights_compact": _FedweightsSetup(work / "fedweights-compact", compact=True),
            "nvflare": _NVFlareSetup(work / "nvflare"),
        }
        seconds = {name: [] for name in setups}
        sizes = {name: [] for name in setups}
        for k, (update, n) in enumerate(zip(updates, counts)):
            for name, setup in setups.items():
                started = time.perf_counter()
                size = setup.encrypt(k, update, n, sum(counts))
                seconds[name].append(time.perf_counter() - started)
                sizes[name].append(size)
        jobs = [(name, setup.server, setup) for name, setup in setups.items()]
        jobs.append(("nvflare_sum_then_scale", "nvflare-sum-then-scale", setups["nvflare"]))
        passes = {job: [] for job, _, _ in jobs}
        for _ in range(repeats):
            for job, server, setup in jobs:
                passes[job].append(_server_subprocess(server, setup.work, setup.server_ctx))
        decrypts = {name: [setup.decrypt(reference) for _ in range(repeats)] for name, setup in setups.items()}
    results = {}
    for name, setup in setups.items():
        runs = passes[name]
        results[name] = {
            "setup": setup.description,
            "bytes_per_param": float(np.mean(sizes[name])) / params,
            "client_encrypt_s": float(np.median(seconds[name])),
            "server_aggregate_s": min(r["server_aggregate_s"] for r in runs),
            "server_serialise_s": min(r["server_serialise_s"] for r in runs),
            "decrypt_s": min(t for t, _ in decrypts[name]),
            "max_abs_error": max(e for _, e in decrypts[name]),
            "server_peak_rss_mb": max(r["server_peak_rss_mb"] for r in runs),
            "server_baseline_rss_mb": min(r["server_baseline_rss_mb"] for r in runs),
        }
    results["nvflare"]["server_sum_then_scale_s"] = min(r["server_aggregate_s"] for r in passes["nvflare_sum_then_scale"])
    return _report(params, clients, results)


def _report(params: int, clients: int, results: dict) -> dict:
    ours, compact, theirs = results["fedweights"], results["fedweights_compact"], results["nvflare"]
    comparison = {
        "size_ratio": theirs["bytes_per_param"] / ours["bytes_per_param"],
        "server_speedup": theirs["server_aggregate_s"] / ours["server_aggregate_s"],
        "server_speedup_vs_sum_then_scale": theirs["server_sum_then_scale_s"] / ours["server_aggregate_s"],
        "client_speedup": theirs["client_encrypt_s"] / ours["client_encrypt_s"],
        "decrypt_speedup": theirs["decrypt_s"] / ours["decrypt_s"],
        "compact_size_ratio": theirs["bytes_per_param"] / compact["bytes_per_param"],
        "compact_server_speedup": theirs["server_aggregate_s"] / compact["server_aggregate_s"],
        "compact_client_speedup": theirs["client_encrypt_s"] / compact["client_encrypt_s"],
    }
    met = {
        "bytes_per_param": ours["bytes_per_param"] <= TARGETS["bytes_per_param_max"],
        "server_speedup": comparison["server_speedup"] >= TARGETS["server_speedup_min"],
        "client_speedup": comparison["client_speedup"] >= TARGETS["client_speedup_min"],
        "max_abs_error": ours["max_abs_error"] <= TARGETS["max_abs_error_max"],
    }
    return {
        "benchmark": "he",
        "params": params,
        "clients": clients,
        "machine": {"cpus": os.cpu_count(), "tenseal": ts.__version__, "load_average": list(os.getloadavg())},
        "setups": {name: _rounded(values) for name, values in results.items()},
        "comparison": _rounded(comparison),
        "targets": TARGETS,
        "met": met,
    }


def synthetic_updates(params: int, clients: int, seed: int) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Four MLP-like layers holding ``params`` values per client, N(0, 0.5) float32; counts 50..500."""
    sizes = {"fc1.weight": params * 6 // 10, "fc1.bias": params // 1000, "fc2.weight": params * 39 // 100}
    sizes["fc2.bias"] = params - sum(sizes.values())
    rng = np.random.default_rng(seed)
    updates = [{name: rng.normal(0, 0.5, size).astype(np.float32) for name, size in sizes.items()} for _ in range(clients)]
    return updates, [int(n) for n in rng.integers(50, 501, clients)]


class _FedweightsSetup:
    """fedweights: BFV, client-weighted fixed point, the coordinator adds."""

    server = "fedweights"

    def __init__(self, work: Path, compact: bool) -> None:
        files = make_keys(work / "keys")
        self.work, self.server_ctx, self.compact = work, files.server, compact
        self.key = load_client_key(files.secret)
        self.layout = None
        kind = "seeded (he.compact)" if compact else "full"
        self.description = (
            f"BFV N=8192 [40,60] t=268369921, fixed point 2^24, symmetric {kind} ciphertexts, client-weighted, server adds"
        )

    def encrypt(self, k: int, update: dict[str, np.ndarray], n: int, normaliser: int) -> int:
        state = {name: torch.from_numpy(v) for name, v in update.items()}
        envelope = encrypt_update(self.key, state, n, normaliser, server_round=1, compact=self.compact)
        if self.layout is None:
            self.layout = layout_of(state)
            (self.work / "layout.json").write_text(json.dumps([[t.name, list(t.shape), t.dtype] for t in self.layout]))
        save_envelope(self.work / f"client{k}.he", envelope)
        return sum(len(a.data) for a in envelope.values())

    def decrypt(self, reference: dict[str, np.ndarray]) -> tuple[float, float]:
        aggregate = load_envelope(self.work / "aggregate.he")
        started = time.perf_counter()
        decrypted = decrypt_envelope(self.key, aggregate, self.layout)
        seconds = time.perf_counter() - started
        return seconds, max(float(np.max(np.abs(decrypted[n].double().numpy() - reference[n]))) for n in reference)


class _NVFlareSetup:
    """NVFlare's TenSEAL path (see ``nvflare_reference``)."""

    server = "nvflare"
    description = "CKKS N=8192 [60,40,40] scale 2^40, symmetric, per-layer ckks_vector, server multiplies by weights"

    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True)
        client_bytes, server_bytes = nvflare.make_contexts()
        self.work, self.server_ctx = work, work / "server.ctx"
        self.server_ctx.write_bytes(server_bytes)
        self.context = ts.context_from(client_bytes)

    def encrypt(self, k: int, update: dict[str, np.ndarray], n: int, normaliser: int) -> int:
        payload = nvflare.encrypt_layers(self.context, update)  # unweighted: the server multiplies
        (self.work / f"client{k}.pkl").write_bytes(pickle.dumps(payload))
        return sum(len(v) for v in payload.values())

    def decrypt(self, reference: dict[str, np.ndarray]) -> tuple[float, float]:
        aggregate = pickle.loads((self.work / "aggregate.pkl").read_bytes())
        started = time.perf_counter()
        decrypted = nvflare.decrypt_layers(self.context, aggregate)
        seconds = time.perf_counter() - started
        error = max(float(np.max(np.abs(decrypted[n].astype(np.float32) - reference[n]))) for n in reference)
        return seconds, error


def _server_subprocess(setup: str, work: Path, server_ctx: Path) -> dict:
    cmd = [sys.executable, "-m", "fedweights.crypto.bench", "--server", setup, "--dir", str(work), "--ctx", str(server_ctx)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{setup} server measurement failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _serve(setup: str, work: Path, server_ctx: Path) -> dict:
    """The coordinator's side, in a fresh process: stream every client payload from ``work`` into one sum."""
    counts = json.loads((work.parent / "counts.json").read_text())
    if setup == "fedweights":
        layout = tuple(TensorInfo(n, tuple(s), d) for n, s, d in json.loads((work / "layout.json").read_text()))
        total = EncryptedSum(load_server_key(server_ctx), RoundExpectation(1, layout, sum(counts)))
    else:
        total = nvflare.WeightedSum(ts.context_from(server_ctx.read_bytes()))
    baseline, elapsed = _peak_rss_mb(), 0.0
    for k, n in enumerate(counts):
        if setup == "fedweights":
            payload = load_envelope(work / f"client{k}.he")
        else:
            payload = pickle.loads((work / f"client{k}.pkl").read_bytes())
        started = time.perf_counter()
        if setup == "fedweights":
            total.add(payload)
        elif setup == "nvflare":
            total.add(payload, n / sum(counts))
        else:  # NVFlare's default pairing: clients pre-weight, the server adds (and scales once below)
            total.add_unweighted(payload)
        elapsed += time.perf_counter() - started
        del payload
    if setup == "nvflare-sum-then-scale":
        started = time.perf_counter()
        total.scale(1.0 / sum(counts))
        elapsed += time.perf_counter() - started
    peak = _peak_rss_mb()
    started = time.perf_counter()
    result = total.result()
    serialise = time.perf_counter() - started
    if setup == "fedweights":
        save_envelope(work / "aggregate.he", result)
    elif setup == "nvflare":
        (work / "aggregate.pkl").write_bytes(pickle.dumps(result))
    return {"server_aggregate_s": elapsed, "server_serialise_s": serialise, "server_peak_rss_mb": peak,
            "server_baseline_rss_mb": baseline}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss would include the parent's at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _rounded(values: dict) -> dict:
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in values.items()}


if __name__ == "__main__":  # the per-setup server subprocess
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", choices=["fedweights", "nvflare", "nvflare-sum-then-scale"], required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--ctx", type=Path, required=True)
    args = parser.parse_args()
    print(json.dumps(_serve(args.server, args.dir, args.ctx)))
