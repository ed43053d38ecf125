"""A new run in a directory that holds an earlier run's results moves them aside first.

Everything an earlier run wrote (metrics, models, the HE keys ``simulate --he`` made, checkpoint,
privacy ledger and reports, the registry's ``published.json``) goes to
``archive/<its run id>-<time>/`` in one move, before the new run writes anything, so nothing is
overwritten or deleted, and an archived encrypted model stays next to the key that decrypts it.
A resumed run (``--resume``) archives nothing. The deployment files (``deploy/``) and the lock stay.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.markup import escape

from .fileio import _fsync_dir

ARCHIVE_DIR = "archive"


def run_results() -> tuple[str, ...]:
    """Names of the files and folders a run writes in its run directory."""
    from .flower.checkpoint import CHECKPOINT_DIR
    from .flower.encryption import ENCRYPTED_MODEL_FILE, KEYS_DIR
    from .privacy.ledger import LEDGER_FILE
    from .privacy.report import PRIVACY_FILE, REPORT_FILE
    from .privacy.user_level_report import USER_PRIVACY_FILE
    from .registry.publish import PUBLISHED_FILE
    from .run_dir import METRICS_FILE, MODEL_FILE

    return (METRICS_FILE, MODEL_FILE, ENCRYPTED_MODEL_FILE, KEYS_DIR, CHECKPOINT_DIR, LEDGER_FILE,
            PRIVACY_FILE, REPORT_FILE, USER_PRIVACY_FILE, PUBLISHED_FILE)


def archive_previous_run(run_dir: str | Path, keep: tuple[str, ...] = ()) -> Path | None:
    """Move an earlier run's results out of ``run_dir`` to ``archive/<run id>-<time>/``; return
    that folder, or None when there was nothing to move. ``keep``: names the new run already wrote."""
    path = Path(run_dir)
    present = [name for name in run_results() if name not in keep and (path / name).exists()]
    if not present:
        return None
    name = f"{_run_id_of(path)}-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = path / ARCHIVE_DIR / name, 1
    while target.exists():  # two archives within one second
        target, n = path / ARCHIVE_DIR / f"{name}-{n}", n + 1
    target.mkdir(parents=True)
    for name in present:
        os.replace(path / name, target / name)
    _fsync_dir(target)
    _fsync_dir(path)
    return target


def _run_id_of(path: Path) -> str:
    """The earlier run's id: from metrics.json, else its checkpoint, else its ledger's first line."""
    from .flower.checkpoint import CHECKPOINT_DIR, MANIFEST_FILE
    from .privacy.ledger import LEDGER_FILE
    from .run_dir import METRICS_FILE

    for file, read in (
        (path / METRICS_FILE, lambda text: json.loads(text)["run_id"]),
        (path / CHECKPOINT_DIR / MANIFEST_FILE, lambda text: json.loads(text)["run_id"]),
        (path / LEDGER_FILE, lambda text: json.loads(text.split("\n", 1)[0])["run"]),
    ):
        try:
            return str(read(file.read_text())) or "unknown"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "unknown"


def announce_archive(reporter, archived: Path | None) -> None:
    """Tell the user where an earlier run's results went (a ``RichReporter``)."""
    if archived is not None:
        reporter.console.print(f"[yellow]a new run: the previous run's results moved to {escape(str(archived))}[/yellow]")
