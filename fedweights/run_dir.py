"""The run directory: what every run leaves on disk (metrics.json, model.safetensors, …).

``metrics.json`` schema::

    {"run_id": str, "status": "running" | "completed" | "failed" | "interrupted",
     "config": {<the full run config, nested as in TOML>},
     "rounds": [{"round": 1, "train_loss": float, "eval_loss": float, "eval_accuracy": float,
                 "num_clients": int, "seconds": float, "failures": [{"node": str, "reason": str}]}, ...],
     "failed_attempts": [{"round": int, "attempt": int, "error": str, "time": str}, ...],  # if any
     "resumes": [{"after_round": int, "time": str, "previous": {"status", "error"}}, ...]}  # if resumed

``failed`` runs name the cause in ``error``; ``interrupted`` marks a run whose coordinator died
without a survivor to record it, found later by whoever took the run directory's lock
(``run_status``).

It is rewritten atomically after every round, so it is always complete up to the last round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import RunConfig
from .errors import UserError
from .fileio import atomic_write_json

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.safetensors"


@dataclass
class RoundRecord:
    """What one round produced, as stored in metrics.json."""

    round: int
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    num_clients: int
    seconds: float
    failures: list[dict[str, str]] = field(default_factory=list)


def default_run_dir() -> Path:
    """``runs/<timestamp>`` under the current directory."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


class RunDir:
    """Reads and writes the files of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def metrics_path(self) -> Path:
        """Path of metrics.json."""
        return self.path / METRICS_FILE

    @property
    def model_path(self) -> Path:
        """Path of the final global model."""
        return self.path / MODEL_FILE

    def start(self, config: RunConfig, run_id: str) -> None:
        """Create the directory and an empty metrics.json holding the config."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._write({"run_id": run_id, "status": "running", "config": dataclasses.asdict(config), "rounds": []})

    def append_round(self, record: RoundRecord) -> None:
        """Add one round's record to metrics.json (atomic rewrite)."""
        data = self.read_metrics()
        data["rounds"] = [r for r in data["rounds"] if r["round"] < record.round] + [dataclasses.asdict(record)]
        self._write(data)

    def record_failed_attempt(self, server_round: int, attempt: int, error: str) -> None:
        """Log a failed attempt at a round (it may be retried) under ``failed_attempts``."""
        data = self.read_metrics()
        entry = {"round": server_round, "attempt": attempt, "error": error, "time": _utc_now()}
        data["failed_attempts"] = [*data.get("failed_attempts", []), entry]
        self._write(data)

    def resume(self, config: RunConfig, through_round: int) -> list[RoundRecord]:
        """Reopen a run for ``--resume`` after ``through_round``: keep the round records up to it (a
        record written after the last checkpoint is dropped; its round runs again), store the
        (possibly extended) config, mark the run running. Returns the kept records."""
        data = self.read_metrics()
        data["rounds"] = [r for r in data["rounds"] if r["round"] <= through_round]
        ended = {"status": data.get("status"), **({"error": data["error"]} if data.get("error") else {})}
        for key in ("error", "stopped_early"):
            data.pop(key, None)
        data.update(status="running", config=dataclasses.asdict(config))
        entry = {"after_round": through_round, "time": _utc_now(), "previous": ended}  # how the run had ended
        data["resumes"] = [*data.get("resumes", []), entry]
        self._write(data)
        return [RoundRecord(**r) for r in data["rounds"]]

    def set_status(self, status: str, **extra: Any) -> None:
        """Mark the run completed/failed (with e.g. an ``error`` message)."""
        data = self.read_metrics()
        data.update(status=status, **extra)
        self._write(data)

    def read_metrics(self) -> dict[str, Any]:
        """metrics.json as a dict (NaN-safe: missing values are null); UserError when it is damaged."""
        try:
            data = json.loads(self.metrics_path.read_text())
        except ValueError as exc:
            raise UserError(f"{self.metrics_path} is damaged ({exc}); it was not written by fedweights as it is") from None
        problem = _shape_problem(data)
        if problem is not None:
            raise UserError(f"{self.metrics_path} is damaged ({problem}); it was not written by fedweights as it is")
        return data

    def save_model(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        """Write the global model as safetensors (written to a temporary file, then renamed)."""
        tmp = self.model_path.with_name(f".{MODEL_FILE}.tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp), metadata=metadata or {})
        tmp.replace(self.model_path)
        return self.model_path

    def load_model(self) -> dict[str, torch.Tensor]:
        """The final global model's state_dict."""
        return load_file(str(self.model_path))

    def _write(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.metrics_path, _finite_or_none(data))


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN/inf: store them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def _shape_problem(data: Any) -> str | None:
    """What is wrong with metrics.json's structure (None: an object whose known parts have their types)."""
    if not isinstance(data, dict):
        return f"a JSON object was expected, got {type(data).__name__}"
    for key, kind in (("rounds", list), ("failed_attempts", list), ("config", dict)):
        if key in data and not isinstance(data[key], kind):
            return f"{key!r} should be a JSON {'array' if kind is list else 'object'}, got {type(data[key]).__name__}"
    if not all(isinstance(r, dict) and isinstance(r.get("round"), int) for r in data.get("rounds", [])):
        return "every entry of 'rounds' should be an object with an integer 'round'"
    default = RunConfig()
    sections = {f.name for f in dataclasses.fields(default) if dataclasses.is_dataclass(getattr(default, f.name))}
    bad = [k for k, v in data.get("config", {}).items() if k in sections and not isinstance(v, dict)]
    return f"config section {bad[0]!r} should be a JSON object" if bad else None
