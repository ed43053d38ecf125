"""The CLI reports user errors in one clear line, with a non-zero exit and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--clients", "0"], "'clients' must be >= 1"),
        (["--clients", "100000"], "more clients than the 1437 training examples"),
        (["--partition", "dirichlet", "--alpha", "0"], "'alpha' must be > 0"),
        (["--partition", "shards"], "'partition' must be one of"),
        (["--lr", "-0.1"], "'lr' must be > 0"),
        (["--clients", "4", "--max-examples", "100"], "is 100, but client 0's shard holds 360 examples"),
        (["--max-model-norm-ratio", "-1"], "'strategy.max_model_norm_ratio' must be > 0"),
        (["--config", "does-not-exist.toml"], "config file not found"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message(cli, args, fragment):
    result = cli("simulate", *args)
    assert result.returncode != 0
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_toml_key_is_named(cli, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("clients = 2\nround = 3\n")
    result = cli("simulate", "--config", str(config))
    assert result.returncode == 2
    assert "'round' is not a known setting (did you mean 'rounds'?)" in result.stderr


def test_help_lists_commands(cli):
    result = cli("--help")
    assert result.returncode == 0
    assert "simulate" in result.stdout


def test_a_path_of_the_wrong_kind_or_a_damaged_run_file_is_one_line_not_a_traceback(cli_in_process, tmp_path):
    in_the_way = tmp_path / "afile"
    in_the_way.write_text("")
    code, _, err = cli_in_process("keys", "he", "--out", str(in_the_way))
    assert code == 2 and "a file is in the way where a folder is needed" in err and "Traceback" not in err

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("")  # e.g. a disk that filled up under another tool
    (run / "privacy-ledger.jsonl").write_text("")
    code, _, err = cli_in_process("report", str(run))
    assert code == 2 and "metrics.json is damaged" in err


def test_simulate_resume_refuses_another_out_and_a_directory_without_a_run(cli_in_process, tmp_path):
    """`simulate --resume DIR` continues the run stored in DIR: an --out (another run) or a
    directory holding no run is refused in one line, before anything starts."""
    code, _, err = cli_in_process("simulate", "--resume", str(tmp_path), "--out", str(tmp_path / "other"))
    assert code == 2 and "--resume DIR continues the run stored in DIR: drop --config/--out" in err
    code, out, err = cli_in_process("simulate", "--resume", str(tmp_path / "nothing"))
    assert code != 0 and "Traceback" not in out + err and "nothing" in err
    assert not (tmp_path / "other").exists()


def test_the_cli_starts_without_torch_scipy_or_dp_accounting():
    """`fedweights --help`, refusals, the `simulate` supervisor and `fedweights client` (which only
    supervises its SuperNode: 0.3 s, not 1.9 s, per node) stay quick (0.4 s, not 4 s): only the
    commands that compute import the heavy libraries."""
    heavy = ("torch", "scipy", "dp_accounting", "tenseal", "ray")
    modules = "fedweights.cli, fedweights.flower.supervisor, fedweights.deploy.client"
    probe = f"import sys, {modules}; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
