"""The CLI reports user errors in one clear line, with a non-zero exit and no traceback."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--clients", "0"], "'clients' must be >= 1"),
        (["--clients", "100000"], "more clients than the 1437 training examples"),
        (["--partition", "dirichlet", "--alpha", "0"], "'alpha' must be > 0"),
        (["--partition", "shards"], "'partition' must be one of"),
        (["--lr", "-0.1"], "'lr' must be > 0"),
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
