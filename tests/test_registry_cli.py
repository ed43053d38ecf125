"""`fedweights registry serve` as a process and the `fedweights weights` commands against it,
including a 105 MiB model streamed in chunks with bounded memory on both sides."""

from __future__ import annotations

import json
import os
import signal

import pytest
from typer.testing import CliRunner

from fedweights.cli import app
from fedweights.registry import Client
from fedweights.registry.payload import digest_file
from fedweights.registry.server import spawn_registry

from .registry_support import TOKEN, reset_peak, save_model, vm_kib, write_big_model
from .test_registry_certificate import REPORT, make_run

BIG_MIB = 105


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `fedweights registry serve` process with a token file; stopped with SIGTERM at the end."""
    directory = tmp_path_factory.mktemp("served")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    proc, address = spawn_registry(directory / "store", "--token-file", str(token_file))
    yield {"proc": proc, "address": address, "token_file": token_file}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0  # a clean shutdown on SIGTERM


def weights(served, *args: str, token: bool = False):
    """Run `fedweights weights ARGS` in-process against the served registry."""
    env = {"FEDWEIGHTS_REGISTRY": served["address"], "COLUMNS": "200"}
    if token:
        env["FEDWEIGHTS_REGISTRY_TOKEN_FILE"] = str(served["token_file"])
    return CliRunner().invoke(app, ["weights", *args], env=env)


def test_push_pull_list_log_diff_verify(served, tmp_path):
    run = make_run(tmp_path / "run", report=REPORT)
    save_model(run / "model.safetensors", seed=1)
    save_model(tmp_path / "next.safetensors", seed=2)

    first = weights(served, "push", str(run / "model.safetensors"), "--name", "cli/cnn", "--tag", "prod", "--from-run", str(run), token=True)
    assert first.exit_code == 0, first.output
    assert "published cli/cnn:1" in first.output and "ε=2.4" in first.output
    second = weights(served, "push", str(tmp_path / "next.safetensors"), "--name", "cli/cnn", "--token-file", str(served["token_file"]))
    assert second.exit_code == 0 and "published cli/cnn:2" in second.output

    listed = weights(served, "list")
    assert listed.exit_code == 0 and "cli/cnn" in listed.output and "unknown" in listed.output
    log = weights(served, "log", "cli/cnn")
    lines = [line for line in log.output.splitlines() if "cli/cnn:" in line]
    assert len(lines) == 2 and "cli/cnn:1" in lines[0]  # v2's parent column, then v1's own row
    assert "ε=2.4 (δ=1e-05)" in lines[1] and "prod" in lines[1] and "run0123abcd / 3" in lines[1]

    pulled = weights(served, "pull", "cli/cnn@prod", "-o", str(tmp_path / "prod.safetensors"))
    assert pulled.exit_code == 0 and "verified" in pulled.output
    assert (tmp_path / "prod.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()

    table = weights(served, "diff", "cli/cnn:1", "cli/cnn:2")
    assert table.exit_code == 0 and "head.weight" in table.output and "model" in table.output
    as_json = json.loads(weights(served, "diff", "cli/cnn:1", "cli/cnn:2", "--json").output)
    assert {t["name"] for t in as_json["tensors"]} >= {"head.weight", "steps"} and as_json["l2_change"] > 0

    ok = weights(served, "verify", str(tmp_path / "prod.safetensors"), "--name", "cli/cnn:1")
    assert ok.exit_code == 0 and "✓" in ok.output
    bad = weights(served, "verify", str(tmp_path / "next.safetensors"), "--name", "cli/cnn:1")
    assert bad.exit_code != 0 and "differs" in bad.output


def test_errors_are_one_line_with_exit_codes(served, tmp_path, cli):
    save_model(tmp_path / "m.safetensors")
    refused = cli("weights", "push", str(tmp_path / "m.safetensors"), "--name", "x", env={"FEDWEIGHTS_REGISTRY": served["address"]})
    assert refused.returncode == 2 and "refused: publishing needs a registry token" in refused.stderr
    assert "`weights --token-file" not in refused.stderr  # an option of the command, not of `weights`
    assert "--token-file FILE" in refused.stderr and "$FEDWEIGHTS_REGISTRY_TOKEN_FILE" in refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout and refused.stderr.count("error:") == 1
    missing = weights(served, "verify", str(tmp_path / "m.safetensors"), "--name", "nothing:1")
    assert "nothing:1 is not in the registry" in str(missing.exception)


def test_large_model_streams_in_chunks_with_bounded_memory(served, tmp_path):
    big = tmp_path / "big.safetensors"
    write_big_model(big, BIG_MIB)
    size_mib = big.stat().st_size / 2**20
    me, server = os.getpid(), served["proc"].pid
    with Client(served["address"], token=TOKEN) as client:
        client.list()  # connect before measuring
        growth = {}
        for step in ("push", "pull"):
            before = {pid: reset_peak(pid) for pid in (me, server)}
            if step == "push":
                version = client.push(big, "big")
            else:
                client.pull("big:1", tmp_path / "pulled.safetensors")
            growth[step] = {pid: (vm_kib(pid, "VmHWM") - before[pid]) / 1024 for pid in (me, server)}
    assert digest_file(tmp_path / "pulled.safetensors").sha256 == version.sha256 == digest_file(big).sha256
    assert len(version.manifest.tensors) == 4 and size_mib > 100
    for step, by_pid in growth.items():  # peak resident growth stays far below the model size
        assert by_pid[me] < 40 and by_pid[server] < 40, (step, by_pid, size_mib)


def test_serve_refuses_a_port_out_of_range(tmp_path):
    """gRPC would bind a random port for 99999 and clients would never find the registry."""
    (tmp_path / "token").write_text(TOKEN)
    result = CliRunner().invoke(app, ["registry", "serve", "--root", str(tmp_path / "store"), "--address", "127.0.0.1:99999",
                                      "--token-file", str(tmp_path / "token")])
    assert result.exit_code != 0 and "PORT 0..65535" in str(result.exception)
    assert not (tmp_path / "store").exists()


def test_diff_of_two_local_files_needs_no_registry(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDWEIGHTS_REGISTRY", raising=False)
    save_model(tmp_path / "a.safetensors", seed=1)
    save_model(tmp_path / "b.safetensors", seed=2)
    result = CliRunner().invoke(app, ["weights", "diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--json"],
                                env={"FEDWEIGHTS_REGISTRY": ""})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["l2_change"] > 0


def test_log_is_readable_at_80_columns(served, tmp_path, cli):
    """At COLUMNS=80 every version's name:version, short hash and parent appear whole, no line is wider
    than 80; at 200 columns the same log is one table row per version."""
    name = "cli/a-rather-long-model-name-for-narrow-terminals"
    for seed in (1, 2, 3):
        save_model(tmp_path / f"m{seed}.safetensors", seed=seed)
        pushed = weights(served, "push", str(tmp_path / f"m{seed}.safetensors"), "--name", name, "--tag", "nightly", token=True)
        assert pushed.exit_code == 0, pushed.output
    fine_tune = weights(served, "push", str(tmp_path / "m1.safetensors"), "--name", "cli/ft", "--parent", f"{name}:2", token=True)
    assert fine_tune.exit_code == 0, fine_tune.output
    with Client(served["address"]) as client:
        versions = client.log(name)
    env = {"FEDWEIGHTS_REGISTRY": served["address"], "COLUMNS": "80"}
    narrow = cli("weights", "log", name, env=env)
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in narrow.stdout
    for v in versions:
        block = ("\n" + narrow.stdout).split(f"\n{v.ref}\n", 1)[1].split("\n\n", 1)[0]  # its own block
        assert v.sha256[:12] in block and (v.parent or "-") in block and v.digest.removeprefix("sha256:")[:12] in block
    lineage = cli("weights", "log", "cli/ft:1", env=env)
    assert lineage.returncode == 0 and max(len(line) for line in lineage.stdout.splitlines()) <= 80
    assert lineage.stdout.startswith("cli/ft:1\n") and f"parent    {name}:2" in lineage.stdout
    wide = weights(served, "log", name)  # COLUMNS=200: the table, one row per version, nothing cut
    rows = [line for line in wide.output.splitlines() if f"{name}:" in line]
    assert len(rows) == 3 and all(v.sha256[:12] in row for v, row in zip(versions, rows)) and "…" not in wide.output

    listed = cli("weights", "list", env=env)  # every model's whole name, one block each
    assert listed.returncode == 0, listed.stderr
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80 and "…" not in listed.stdout
    assert f"\n{name}\n  versions  3\n  latest    3\n" in "\n" + listed.stdout
    wide_list = weights(served, "list")  # COLUMNS=200: one table row per model
    assert [line for line in wide_list.output.splitlines() if name in line][0].count("│") == 8
