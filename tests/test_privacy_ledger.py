"""The privacy ledger: append-only, atomic under crashes, tamper-evident."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from fedweights.privacy.ledger import LEDGER_FILE, Ledger, LedgerError

from .conftest import REPO


def spend(round_: int, client: str = "0", eps: float = 1.0) -> dict:
    return {"round": round_, "client": client, "status": "trained", "epsilon": eps, "history": [[1.0, 0.1, 10 * round_]]}


def test_appends_are_chained_and_read_back(tmp_path):
    ledger = Ledger(tmp_path)
    assert ledger.read() == []
    ledger.append([spend(1, "0"), spend(1, "1")])
    ledger.append([spend(2, "0", float("inf"))])  # an unprotected client: ε = ∞
    entries = ledger.read()
    assert [(e["seq"], e["round"], e["client"]) for e in entries] == [(0, 1, "0"), (1, 1, "1"), (2, 2, "0")]
    assert entries[0]["prev"] == "" and all(len(e["prev"]) == 64 for e in entries[1:])
    assert entries[2]["epsilon"] == "inf"
    assert (tmp_path / LEDGER_FILE).read_text().count("\n") == 3  # one JSON object per line


@pytest.mark.parametrize(
    "damage",
    [
        lambda lines: [lines[0], lines[1].replace('"epsilon":1.0', '"epsilon":0.1'), lines[2]],  # edited
        lambda lines: [lines[0], lines[2]],  # a line removed
        lambda lines: [lines[1], lines[0], lines[2]],  # reordered
    ],
    ids=["edited", "removed", "reordered"],
)
def test_edits_are_detected(tmp_path, damage):
    ledger = Ledger(tmp_path)
    ledger.append([spend(1, "0"), spend(1, "1"), spend(2, "0")])
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text("\n".join(damage(lines)) + "\n")
    with pytest.raises(LedgerError, match="hash chain is broken"):
        ledger.read()
    with pytest.raises(LedgerError):  # and nothing is appended to a broken ledger
        ledger.append([spend(3)])


def test_a_torn_tail_is_detected(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append([spend(1)])
    with ledger.path.open("ab") as fh:
        fh.write(b'{"v":1,"seq":1,"prev":"ab')  # what a non-atomic writer could leave behind
    with pytest.raises(LedgerError, match="incomplete"):
        ledger.read()


WRITER = """
import sys
from fedweights.privacy.ledger import Ledger
ledger = Ledger(sys.argv[1])
print("ready", flush=True)
for r in range(1, 100000):
    ledger.append([{"round": r, "client": str(c), "status": "trained", "epsilon": r / 10,
                    "history": [[1.0, 0.1, 10 * r]], "pad": "x" * 4000} for c in range(8)])
"""


def test_killing_the_writer_mid_append_never_leaves_a_torn_ledger(tmp_path):
    """SIGKILL a process that appends 8 x 4 KB records per call, at several moments: every time,
    the ledger reads cleanly and holds whole rounds only (each append is all-or-nothing)."""
    seen = 0
    for delay in (0.4, 0.9):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                  text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        entries = Ledger(tmp_path).read()
        assert len(entries) % 8 == 0 and len(entries) > seen  # whole appends, and more than before
        assert [e["seq"] for e in entries] == list(range(len(entries)))
        seen = len(entries)
    assert json.loads(Ledger(tmp_path).path.read_text().splitlines()[-1])["seq"] == seen - 1
