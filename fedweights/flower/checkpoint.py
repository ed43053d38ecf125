"""Checkpoints after every round, and resuming a run from the last one.

After each completed round the round loop's ``CheckpointHooks`` writes, into ``RUN/checkpoint/``::

    manifest.json          {"format": 1, "run_id", "round", "dir": "round-000003-<nonce>",
                            "files": {"state.json": {"sha256", "bytes"}, ...}, "uncaptured", "time"}
    round-000003-<nonce>/
      model.safetensors    the global arrays (numpy safetensors; key order in the metadata), or
      model.he             under --he: the encrypted global sum (as ``model.he`` of a finished run)
      strategy.safetensors binary parts of the strategy's state (see ``strategy_state``)
      state.json           round, run id, strategy classes and state, Python ``random`` state
                           (Flower samples nodes with it), state that could not be captured

The round's files are written and fsynced into a fresh folder first; only then is
``manifest.json`` atomically replaced to point at it, and older folders are removed after that. A
kill -9 at any moment leaves the manifest pointing at a complete checkpoint, old or new; a
checkpoint whose files do not match the manifest's SHA-256 digests is refused as damaged.

Resuming: ``resume_config(run_dir, overrides)`` rebuilds the run's config from ``metrics.json``
with ``resume=True``; ``run_federation`` then calls ``resume_run``, which restores the global
arrays, the strategy state and the RNG and continues at checkpoint round + 1 with the same run id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load, save

from ..config import RunConfig, from_dict
from ..config_tables import flatten, norm_key, unflatten
from ..crypto.envelope import EnvelopeError, is_encrypted, load_envelope, save_envelope
from ..errors import ConfigError, UserError
from ..fileio import _fsync_dir, atomic_write_bytes, atomic_write_json
from ..run_dir import METRICS_FILE, RoundRecord, RunDir
from .round_loop import RoundHooks
from .strategy_state import StateError, StrategyState

log = logging.getLogger("fedweights.checkpoint")

CHECKPOINT_DIR = "checkpoint"
MANIFEST_FILE = "manifest.json"
FORMAT = 1
PLAIN_MODEL, ENCRYPTED_MODEL = "model.safetensors", "model.he"
STRATEGY_FILE, STATE_FILE = "strategy.safetensors", "state.json"

RESUMABLE_KEYS = ("rounds", "round_timeout", "on_round_timeout", "round_retries", "min_clients", "device", "out",
                  "resume", "fraction_evaluate", "he.key", "he.server_key", "publish.")  # fmt: skip
"""Config keys a resumed run may change (``publish.`` covers the whole table); any other change
(clients, data, model, training, strategy, dp, user_dp, he, attack, seed) would make it another run."""


class CheckpointError(UserError):
    """There is no usable checkpoint to resume from (missing, damaged, or not of this run)."""


@dataclass
class Checkpoint:
    """What a checkpoint holds, as read back by ``load_checkpoint``."""

    run_id: str
    round: int
    arrays: ArrayRecord
    strategy_classes: list[str]
    strategy_tree: dict[str, Any]
    strategy_blobs: dict[str, np.ndarray]
    random_state: tuple
    uncaptured: list[str]


@dataclass
class ResumePoint:
    """Where a resumed run continues: its id, first round to run, global arrays, kept records."""

    run_id: str
    next_round: int
    arrays: ArrayRecord
    records: list[RoundRecord]


def checkpoint_dir(run_dir: str | Path) -> Path:
    """``RUN/checkpoint``."""
    return Path(run_dir) / CHECKPOINT_DIR


def write_checkpoint(
    run_dir: str | Path, run_id: str, server_round: int, arrays: ArrayRecord, state: StrategyState
) -> dict[str, Any]:
    """Atomically make ``RUN/checkpoint`` hold round ``server_round``; return the manifest written."""
    root = checkpoint_dir(run_dir)
    folder = root / f"round-{server_round:06d}-{uuid.uuid4().hex[:8]}"  # never a folder the manifest names
    folder.mkdir(parents=True)
    tree, blobs, uncaptured = state.capture()
    if is_encrypted(arrays):
        save_envelope(folder / ENCRYPTED_MODEL, arrays)
    else:
        model = {k: np.ascontiguousarray(a.numpy()) for k, a in arrays.items()}
        atomic_write_bytes(folder / PLAIN_MODEL, save(model, metadata={"keys": json.dumps(list(model))}))
    atomic_write_bytes(folder / STRATEGY_FILE, save(blobs))
    payload = {
        "round": server_round,
        "run_id": run_id,
        "strategy": {"classes": state.classes, "state": tree, "uncaptured": uncaptured},
        "random_state": _encode_random(random.getstate()),
    }
    atomic_write_json(folder / STATE_FILE, payload)
    _fsync_dir(root)  # the new round folder's entry (each file's write already synced the folder)
    files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir())}
    manifest = {"format": FORMAT, "run_id": run_id, "round": server_round, "dir": folder.name, "files": files,
                "uncaptured": uncaptured, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    atomic_write_json(root / MANIFEST_FILE, manifest)  # the commit point
    for other in root.glob("round-*"):  # older rounds, and folders of writes a crash interrupted
        if other != folder:
            shutil.rmtree(other, ignore_errors=True)
    return manifest


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """The run's last complete checkpoint, its files checked against the manifest's digests."""
    root = checkpoint_dir(run_dir)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{run_dir} has no checkpoint ({manifest_path} is missing): the run did not complete a round, or it "
            "is not a fedweights run directory; start a new run instead of resuming"
        )
    damaged = f"the checkpoint in {root} is damaged"
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{manifest_path} has format {manifest.get('format')!r}; this fedweights reads {FORMAT}")
        folder = root / manifest["dir"]
        for name, expected in manifest["files"].items():
            path = folder / name
            if not path.is_file() or _sha256(path) != expected["sha256"]:
                raise CheckpointError(f"{damaged}: {path} is missing or does not match its SHA-256 in {MANIFEST_FILE}")
        payload = json.loads((folder / STATE_FILE).read_text())
        blobs = load((folder / STRATEGY_FILE).read_bytes())
        arrays = _load_arrays(folder)
        return Checkpoint(
            run_id=str(manifest["run_id"]),
            round=int(manifest["round"]),
            arrays=arrays,
            strategy_classes=list(payload["strategy"]["classes"]),
            strategy_tree=payload["strategy"]["state"],
            strategy_blobs=blobs,
            random_state=_decode_random(payload["random_state"]),
            uncaptured=list(payload["strategy"].get("uncaptured", [])),
        )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, EnvelopeError) as exc:
        raise CheckpointError(f"{damaged}: {type(exc).__name__}: {exc}") from None


class CheckpointHooks(RoundHooks):
    """Writes a checkpoint after every completed round (on in every run)."""

    def __init__(self, run_dir: RunDir, run_id: str, state: StrategyState) -> None:
        self.run_dir, self.run_id, self.state = run_dir, run_id, state
        self._warned = False

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        """Checkpoint the round just recorded."""
        uncaptured = write_checkpoint(self.run_dir.path, self.run_id, record.round, arrays, self.state)["uncaptured"]
        if uncaptured and not self._warned:
            self._warned = True
            log.warning("this run cannot be resumed: the strategy keeps state checkpoints cannot hold: %s; "
                        "give it state_dict()/load_state_dict() methods", ", ".join(uncaptured))  # fmt: skip


def check_resumable(run_dir: RunDir, config: RunConfig) -> tuple[dict[str, Any], Checkpoint]:
    """(metrics.json, last checkpoint) of ``run_dir`` if ``config`` can resume it; else CheckpointError
    (no run, a damaged or mixed-up checkpoint, a changed setting, no rounds left). Reads only."""
    if not run_dir.metrics_path.is_file():
        raise CheckpointError(f"{run_dir.path} has no {METRICS_FILE}: it is not a fedweights run directory")
    metrics = run_dir.read_metrics()
    check_resume_changes(metrics.get("config", {}), config)
    checkpoint = load_checkpoint(run_dir.path)
    if metrics.get("run_id") != checkpoint.run_id:
        raise CheckpointError(
            f"the checkpoint in {run_dir.path} belongs to run {checkpoint.run_id}, metrics.json to run "
            f"{metrics.get('run_id')}; the run directory was mixed up, start a new run"
        )
    if checkpoint.round >= config.rounds:
        raise CheckpointError(
            f"the run in {run_dir.path} already completed all {checkpoint.round} round(s) (rounds={config.rounds}); "
            "to train longer, resume with more rounds (e.g. --rounds "
            f"{checkpoint.round + 5})"
        )
    return metrics, checkpoint


def resume_run(run_dir: RunDir, config: RunConfig, state: StrategyState) -> ResumePoint:
    """Reopen ``run_dir`` at its last checkpoint for ``config`` (which must allow it): restore the
    strategy state and the ``random`` state, trim metrics.json to the checkpoint round."""
    _metrics, checkpoint = check_resumable(run_dir, config)
    if checkpoint.strategy_classes != state.classes:
        raise CheckpointError(
            f"the checkpoint was written by strategy {checkpoint.strategy_classes}, this run builds {state.classes}"
        )
    if checkpoint.uncaptured:
        raise CheckpointError(
            "the strategy kept state that checkpoints cannot hold: " + ", ".join(checkpoint.uncaptured)
            + "; give the strategy state_dict()/load_state_dict() methods (README: Checkpoint and resume)"
        )
    try:
        state.restore(checkpoint.strategy_tree, checkpoint.strategy_blobs)
    except StateError as exc:
        raise CheckpointError(f"cannot restore the strategy from the checkpoint: {exc}") from None
    random.setstate(checkpoint.random_state)
    records = run_dir.resume(config, checkpoint.round)
    return ResumePoint(checkpoint.run_id, checkpoint.round + 1, checkpoint.arrays, records)


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The config of the run in ``run_dir`` (from its metrics.json) with ``resume=True`` and
    ``out=run_dir``, plus ``overrides`` (flat keys, e.g. ``{"rounds": 10, "round_timeout": 60}``).

    Raises ConfigError for an override that would change the run (see ``RESUMABLE_KEYS``).
    """
    run = RunDir(run_dir)
    if not run.metrics_path.is_file():
        raise CheckpointError(f"{run_dir} has no {METRICS_FILE}: it is not a fedweights run directory")
    try:
        stored = run.read_metrics()["config"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{run.metrics_path} is damaged ({type(exc).__name__}: {exc})") from None
    flat = {k: v for k, v in flatten(stored).items() if v is not None}
    flat.update({norm_key(k): v for k, v in (overrides or {}).items()})
    flat.update(resume=True, out=str(run_dir))
    config = from_dict(unflatten(flat))
    check_resume_changes(stored, config)
    return config


def check_resume_changes(stored: dict[str, Any], config: RunConfig) -> None:
    """Refuse a resumed ``config`` that differs from the ``stored`` one outside ``RESUMABLE_KEYS``
    (keys the stored config lacks, from an older fedweights, are taken as unchanged)."""
    before = flatten(stored)
    after = flatten(dataclasses.asdict(config))
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if key not in before or old == new or any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
            continue
        raise ConfigError(
            key, f"cannot change when resuming (the run has {old!r}, the resume asks for {new!r}): it would make it "
            "a different run; start a new run for that"
        )  # fmt: skip
    if after.get("rounds") != before.get("rounds"):
        for target in ("dp.target_epsilon", "user_dp.target_epsilon"):
            if after.get(target) is not None:
                raise ConfigError(
                    "rounds", f"cannot change when resuming a run with {target}: its noise was calibrated for "
                    f"rounds={before.get('rounds')}"
                )  # fmt: skip


def _load_arrays(folder: Path) -> ArrayRecord:
    if (folder / ENCRYPTED_MODEL).is_file():
        return load_envelope(folder / ENCRYPTED_MODEL)
    with safe_open(folder / PLAIN_MODEL, "numpy") as model:  # keys in the model's order, from the metadata
        return ArrayRecord({k: Array(model.get_tensor(k)) for k in json.loads(model.metadata()["keys"])})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _encode_random(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_random(data: list) -> tuple:
    version, internal, gauss = data
    return (int(version), tuple(int(x) for x in internal), gauss)
