"""The privacy ledger: a durable, append-only, tamper-evident record of every client's spend.

File ``privacy-ledger.jsonl`` in the run directory, one JSON object per line (schema below).
Each append replaces the file atomically with its old bytes plus the new lines (temporary file,
fsync, rename, directory fsync), so a crash leaves either the old or the new ledger, never a torn
one. Each line carries ``prev``, the SHA-256 of the line before it, and ``seq``, its position, so
an edited, dropped or reordered line is detected when the ledger is read.

Line schema (``v`` = 1)::

    {"v": 1, "seq": 0, "prev": "<sha256 hex of previous line, '' for the first>",
     "time": "2026-01-01T12:00:00Z", "run": "<run id>", "round": 3, "client": "2", "node": "8412...",
     "status": "trained" | "exhausted" | "unaccounted",
     "noise_multiplier": 1.0, "sample_rate": 0.0435, "steps": 23,   # this round
     "history": [[1.0, 0.0435, 69]],   # the client's whole (σ, q, steps) history so far
     "epsilon": 2.95,                   # ε so far, recomputed by the coordinator from history
     "client_epsilon": 2.95,            # what the client itself reported
     "delta": 1e-06, "accountant": "pld", "max_grad_norm": 1.0, "batch_size": 16,
     "local_epochs": 1, "n_examples": 359, "grad_sample_mode": "fused", "budget": 8.0 | null,
     "reason": "...",                   # exhausted/unaccounted only
     "warning": "...",                  # only when two nodes sent one client id in the round
     "over_budget": true}               # only when ε is over the budget although the client trained:
                                        # its update was not used

``exhausted`` lines record a client that refused to train (budget); ``unaccounted`` lines a
reply that carried no DP accounting (its ε is recorded as infinite: nothing protects it).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import atomic_write_bytes

LEDGER_FILE = "privacy-ledger.jsonl"
VERSION = 1


class LedgerError(UserError):
    """The ledger is damaged or was edited: its hash chain or a line does not check out."""


class Ledger:
    """Reads and appends the privacy ledger of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LEDGER_FILE

    def read(self) -> list[dict[str, Any]]:
        """All entries, checked line by line against the hash chain (raises LedgerError)."""
        entries, _ = self._read_checked()
        return entries

    def append(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append ``records`` (one atomic replace for all of them); return them as written."""
        existing = self.path.read_bytes() if self.path.exists() else b""
        entries, prev = self._read_checked(existing)
        written, lines = [], []
        for seq, record in enumerate(records, start=len(entries)):
            entry = {"v": VERSION, "seq": seq, "prev": prev, "time": _utc_now(), **_json_safe(record)}
            line = json.dumps(entry, separators=(",", ":"), allow_nan=False).encode()
            prev = _sha256(line)
            lines.append(line + b"\n")
            written.append(entry)
        if lines:
            atomic_write_bytes(self.path, existing + b"".join(lines))
        return written

    def _read_checked(self, data: bytes | None = None) -> tuple[list[dict[str, Any]], str]:
        if data is None:
            data = self.path.read_bytes() if self.path.exists() else b""
        entries: list[dict[str, Any]] = []
        prev = ""
        if data and not data.endswith(b"\n"):
            raise LedgerError(f"{self.path}: the last line is incomplete; the ledger was not written by fedweights")
        for number, line in enumerate(data.splitlines(), start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                raise LedgerError(f"{self.path}, line {number}: not valid JSON") from None
            if entry.get("seq") != number - 1 or entry.get("prev") != prev:
                raise LedgerError(
                    f"{self.path}, line {number}: the hash chain is broken (a line was edited, removed or "
                    "reordered); the ledger cannot be trusted"
                )
            prev = _sha256(line)
            entries.append(entry)
        return entries, prev


def as_epsilon(value: float | str | None) -> float:
    """A ledger ε as a float ("inf", the JSON spelling of no protection, → math.inf)."""
    return math.inf if value == "inf" else float(value or 0.0)


def format_epsilon(value: float | str | None, decimals: int = 3) -> str:
    """ε for people, rounded UP to ``decimals`` places so a shown ε is never below the true one."""
    if value is None:
        return "—"
    eps = as_epsilon(value)
    if not math.isfinite(eps):
        return "∞"
    return f"{math.ceil(eps * 10**decimals) / 10**decimals:.{decimals}f}"


def _sha256(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _json_safe(obj: Any) -> Any:
    """JSON has no infinity: store ε = ∞ (no protection) as the string "inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
