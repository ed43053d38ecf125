"""`fedweights keys he`, `simulate --he`, `decrypt` and `bench he` as a user runs them."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys

import pytest
import tenseal as ts
import torch
from safetensors.torch import load_file

import fedweights
from fedweights.cli import main
from fedweights.config import HEConfig, RunConfig
from fedweights.crypto.keys import load_server_key, make_keys
from fedweights.deploy.server import ServerSecurity, run_server
from fedweights.errors import UserError
from fedweights.flower.encryption import prepare_simulation_keys
from fedweights.task import builtin_task

from .conftest import REPO


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the CLI entry point in this process; return (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fedweights", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_keys_cli_writes_a_pair_and_refuses_insecure_parameters(monkeypatch, capsys, tmp_path):
    code, err = _main(monkeypatch, capsys, "keys", "he", "--out", str(tmp_path / "keys"))
    assert code == 0, err
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "secret.ctx").st_mode) == 0o600
    assert not ts.context_from((tmp_path / "keys" / "server.ctx").read_bytes()).has_secret_key()
    assert json.loads((tmp_path / "keys" / "params.json").read_text())["poly_modulus_degree"] == 8192

    args = ("--poly-modulus-degree", "4096", "--coeff-mod-bit-sizes", "60,60")
    code, err = _main(monkeypatch, capsys, "keys", "he", "--out", str(tmp_path / "weak"), *args)
    assert code == 2 and "insecure parameters: N=4096 allows at most 109 bits" in " ".join(err.split())
    assert "Traceback" not in err and not (tmp_path / "weak" / "secret.ctx").exists()


def test_simulate_with_given_secret_key_derives_the_server_key(tmp_path):
    files = make_keys(tmp_path / "mine")
    config = RunConfig(he=HEConfig(enabled=True, key=str(files.secret)))
    prepared = prepare_simulation_keys(config, tmp_path / "run")
    assert prepared.he.key == str(files.secret.resolve())
    assert load_server_key(prepared.he.server_key).fingerprint.hex() == files.fingerprint
    assert prepare_simulation_keys(RunConfig(), tmp_path / "plain") == RunConfig()


@pytest.mark.slow
def test_simulate_he_matches_plaintext_accuracy_and_writes_encrypted_model(cli, cli_in_process, tmp_path):
    procs = {  # both runs at once: most of a run's wall time is Ray starting up
        mode: subprocess.Popen(
            [sys.executable, "-m", "fedweights", "simulate", mode, "--clients", "3", "--rounds", "3", "--seed", "1",
             "--out", str(tmp_path / mode.strip("-"))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        for mode in ("--he", "--no-he")
    }
    runs = {}
    for mode, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        runs[mode] = json.loads((tmp_path / mode.strip("-") / "metrics.json").read_text())
    he_rounds, plain_rounds = runs["--he"]["rounds"], runs["--no-he"]["rounds"]
    assert he_rounds[-1]["eval_accuracy"] == pytest.approx(plain_rounds[-1]["eval_accuracy"], abs=0.01)
    assert he_rounds[-1]["eval_accuracy"] > 0.85 and all(not r["failures"] for r in he_rounds)

    run = tmp_path / "he"
    assert stat.S_IMODE(os.stat(run / "keys" / "secret.ctx").st_mode) == 0o600
    assert runs["--he"]["config"]["he"]["server_key"] == str(run / "keys" / "server.ctx")
    key, decrypted_path = run / "keys" / "secret.ctx", tmp_path / "m.safetensors"
    # decrypt and the refusal below in this process: each CLI process spent seconds importing TenSEAL and torch
    code, _, err = cli_in_process("decrypt", str(run / "model.he"), "--he-key", str(key), "--out", str(decrypted_path))
    assert code == 0, err
    code, _, err = cli_in_process("decrypt", str(run / "model.he"), "--he-key", str(key), "--out", str(tmp_path), "--force")
    assert code == 2 and "is a folder: give the file to write" in err and "Traceback" not in err
    decrypted, saved = load_file(str(decrypted_path)), load_file(str(run / "model.safetensors"))
    assert decrypted.keys() == saved.keys() and all((decrypted[k] == saved[k]).all() for k in saved)
    plain = load_file(str(tmp_path / "no-he" / "model.safetensors"))
    assert max(float((plain[k] - saved[k]).abs().max()) for k in saved) < 1e-4

    # a refused --he run in that directory writes nothing: no key of the finished run is replaced
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    code, out, err = cli_in_process("simulate", "--he", "--strategy", "median", "--clients", "2", "--rounds", "1", "--out", str(run))
    assert code == 2 and "not linear" in out + err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == files
    # a new --he run there archives the earlier results with their key: the old model still decrypts
    again = cli("simulate", "--he", "--clients", "2", "--rounds", "1", "--out", str(run))
    assert again.returncode == 0, again.stderr[-3000:]
    (archived,) = (run / "archive").iterdir()
    assert (archived / "keys" / "secret.ctx").read_bytes() == files[key] != key.read_bytes()
    code, _, err = cli_in_process("decrypt", str(archived / "model.he"), "--he-key", str(archived / "keys" / "secret.ctx"),
                                  "--out", str(tmp_path / "old.safetensors"))
    assert code == 0, err
    old = load_file(str(tmp_path / "old.safetensors"))
    assert all((old[k] == saved[k]).all() for k in saved)


@pytest.mark.slow
def test_bench_he_compares_both_setups(cli, tmp_path):
    result = cli("bench", "he", "--params", "3000", "--clients", "2", "--repeats", "1", "--json", str(tmp_path / "he.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "he.json").read_text())
    fields = {"bytes_per_param", "client_encrypt_s", "server_aggregate_s", "decrypt_s", "max_abs_error"}
    fields.add("server_peak_rss_mb")
    for setup in ("fedweights", "fedweights_compact", "nvflare"):
        assert fields <= set(report["setups"][setup])
    assert report["setups"]["fedweights"]["max_abs_error"] <= 1e-6
    assert report["setups"]["nvflare"]["bytes_per_param"] > report["setups"]["fedweights"]["bytes_per_param"]


def batch_norm_mlp():
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


def batch_norm_task(config: RunConfig) -> fedweights.Task:
    """A config file's ``task = "tests.test_he_simulate:batch_norm_task"``."""
    return dataclasses.replace(builtin_task(config), model_fn=batch_norm_mlp)


def test_a_model_with_an_integer_buffer_is_refused_before_any_key_is_made(tmp_path):
    config = RunConfig(clients=2, rounds=1, he=HEConfig(enabled=True), out=str(tmp_path / "run"))
    task = dataclasses.replace(builtin_task(config), model_fn=batch_norm_mlp)
    with pytest.raises(UserError, match=r"'1.num_batches_tracked' has dtype torch.int64.*replace it by GroupNorm"):
        fedweights.simulate(config, task=task)
    assert not (tmp_path / "run" / "keys").exists()


def test_the_server_refuses_such_a_model_under_he_before_any_process_starts(key_pairs, tmp_path):
    good, _ = key_pairs
    he = HEConfig(enabled=True, server_key=str(good.server))
    config = RunConfig(clients=2, rounds=1, he=he, task="tests.test_he_simulate:batch_norm_task", out=str(tmp_path / "run"))
    with pytest.raises(UserError, match=r"'1.num_batches_tracked' has dtype torch.int64"):
        run_server(config, "127.0.0.1:9092", ServerSecurity(insecure=True))  # nothing listens: refused first
    assert not (tmp_path / "run").exists()
