"""`fedweights simulate` (Flower's simulation engine) with --he: fedavgm, and --user-dp with distributed noise.

That fedavgm under --he gives the same model as in plaintext is checked in test_he_strategy_federation.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

RUNS = {
    "he-fedavgm": ["--he", "--strategy", "fedavgm"],
    "he-user-dp": ["--he", "--user-dp", "--clients-per-round", "2", "--user-clipping-norm", "1"],
}


@pytest.mark.slow
def test_simulate_he_runs_fedavgm_and_distributed_user_dp(tmp_path):
    procs = {  # both at once (the shared Ray head has a CPU per core: more runs at once would queue)
        name: subprocess.Popen(
            [sys.executable, "-m", "fedweights", "simulate", *args, "--clients", "3", "--rounds", "2", "--seed", "1",
             "--out", str(tmp_path / name)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=None,
        )
        for name, args in RUNS.items()
    }
    outputs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        outputs[name] = stdout
    he = json.loads((tmp_path / "he-fedavgm" / "metrics.json").read_text())["rounds"]
    assert he[-1]["eval_accuracy"] > 0.8 and not any(r["failures"] for r in he)
    assert (tmp_path / "he-fedavgm" / "model.he").exists() and (tmp_path / "he-fedavgm" / "model.safetensors").exists()

    run = tmp_path / "he-user-dp"
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["user_level"]["noise"] == "distributed" and privacy["user_level"]["rounds"] == 2
    assert privacy["user_level"]["sample_rate"] == pytest.approx(2 / 3)
    assert "user-level epsilon" in " ".join(outputs["he-user-dp"].split()) and (run / "report.html").exists()
    assert (run / "model.safetensors").exists()  # simulate decrypted model.he with the run's key
