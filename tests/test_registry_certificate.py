"""The privacy certificate copied from a run: the largest accounted ε, only for rounds the privacy
report covers, and an explicit "no guarantee" (never a number) for runs without DP."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from safetensors.torch import load_file, save_file

from fedweights.config import DPConfig, RunConfig
from fedweights.errors import UserError
from fedweights.flower.encryption import decryption_metadata
from fedweights.proto import registry_pb2 as pb
from fedweights.registry.certificate import certificate_for_run, describe_guarantee, run_info

from .registry_support import client, registry, save_model  # noqa: F401

Guarantee = pb.PrivacyCertificate
CLIENT = {"delta": 1e-5, "noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.01, "steps": 300}
REPORT = {  # the schema of a run's privacy.json
    "delta": 1e-5,
    "accountant": "pld",
    "clients": {"0": {**CLIENT, "epsilon": 1.9}, "1": {**CLIENT, "epsilon": 2.4, "steps": 280}, "2": {**CLIENT, "epsilon": 2.1}},
    "rounds": [
        {"round": 1, "epsilon_max": 0.9, "epsilon_mean": 0.8},
        {"round": 2, "epsilon_max": 1.7, "epsilon_mean": 1.5},
        {"round": 3, "epsilon_max": 2.4, "epsilon_mean": 2.1},
    ],
    "user_level": {"epsilon": 4.2, "delta": 1e-5, "noise_multiplier": 0.8, "clipping_norm": 1.0,
                   "sample_rate": 0.1, "rounds": 3, "population": 100},
}  # fmt: skip


def make_run(directory, dp: bool = True, report: dict | None = None, status: str = "completed", rounds: int = 3):
    """A run directory as a finished run leaves it (metrics.json, optionally privacy.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = RunConfig(rounds=rounds, dp=DPConfig(enabled=dp, noise_multiplier=1.1 if dp else None, delta=1e-5 if dp else None))
    metrics = {
        "run_id": "run0123abcd",
        "status": status,
        "config": dataclasses.asdict(config),
        "rounds": [{"round": r, "train_loss": 1.0, "eval_loss": 1.0, "eval_accuracy": 0.5, "num_clients": 3, "seconds": 1.0, "failures": []} for r in range(1, rounds + 1)],
    }  # fmt: skip
    (directory / "metrics.json").write_text(json.dumps(metrics))
    if report is not None:
        (directory / "privacy.json").write_text(json.dumps(report))
    return directory


def test_final_model_carries_the_largest_epsilon_of_the_run(tmp_path):
    cert = certificate_for_run(make_run(tmp_path / "run", report=REPORT), 3, final=True)
    assert cert.guarantee == Guarantee.DIFFERENTIAL_PRIVACY and cert.source == "privacy.json"
    assert cert.record_epsilon == 2.4 and cert.record_delta == 1e-5 and cert.accountant == "pld"
    assert cert.user_epsilon == 4.2 and cert.user_delta == 1e-5
    assert cert.dp_enabled and not cert.he_enabled
    assert cert.settings["dp.noise_multiplier"] == "1.1" and cert.settings["dp.enabled"] == "true"
    assert cert.settings["clients.count"] == "3" and cert.settings["clients.steps"] == "280..300"
    assert cert.settings["user_level.population"] == "100"
    assert "ε=2.4" in cert.statement and "max over 3 clients" in cert.statement
    assert describe_guarantee(cert) == "ε=2.4 (δ=1e-05), user ε=4.2 (δ=1e-05)"


def test_never_lower_than_any_accounted_value(tmp_path):
    report = copy.deepcopy(REPORT)
    report["clients"]["2"]["epsilon"] = 3.3  # a client total above the rounds' running maximum
    assert certificate_for_run(make_run(tmp_path / "run", report=report), 3, final=True).record_epsilon == 3.3


def test_a_round_model_carries_the_epsilon_after_that_round(tmp_path):
    cert = certificate_for_run(make_run(tmp_path / "run", report=REPORT), 2, final=False)
    assert cert.record_epsilon == 1.7  # not the end-of-run 2.4 of the per-client totals


def test_no_number_when_the_report_does_not_cover_the_round(tmp_path):
    stale = {**REPORT, "rounds": REPORT["rounds"][:2], "user_level": {**REPORT["user_level"], "rounds": 2}}
    cert = certificate_for_run(make_run(tmp_path / "run", report=stale), 3, final=False)
    assert cert.guarantee == Guarantee.UNKNOWN
    assert not cert.HasField("record_epsilon") and not cert.HasField("user_epsilon")
    assert "no record-level entry for round 3" in cert.statement and "covers 2 rounds" in cert.statement


def test_run_without_dp_says_so_explicitly(tmp_path):
    cert = certificate_for_run(make_run(tmp_path / "run", dp=False), 3, final=True)
    assert cert.guarantee == Guarantee.NONE and not cert.dp_enabled
    assert not cert.HasField("record_epsilon") and not cert.HasField("user_epsilon")
    assert "no (ε, δ) guarantee" in cert.statement and describe_guarantee(cert) == "no DP"
    missing = certificate_for_run(make_run(tmp_path / "dp-run", dp=True), 3, final=True)
    assert missing.guarantee == Guarantee.UNKNOWN and "has no privacy.json" in missing.statement


def test_push_from_run_puts_run_and_certificate_in_the_manifest(client, tmp_path):
    run = make_run(tmp_path / "run", report=REPORT)
    save_model(run / "model.safetensors")
    version = client.push(run / "model.safetensors", "private", from_run=run)
    manifest = client.log("private")[0].manifest
    assert (manifest.run_id, manifest.round) == ("run0123abcd", 3)
    assert manifest.privacy == certificate_for_run(run, 3, final=True) == version.privacy
    with pytest.raises(UserError, match="status 'failed', not 'completed'"):
        run_info(make_run(tmp_path / "failed", status="failed"))
    with pytest.raises(UserError, match="not a fedweights run directory"):
        client.push(run / "model.safetensors", "private", from_run=tmp_path)


def test_push_from_run_refuses_a_file_that_is_not_the_runs_model(client, tmp_path):
    """A certificate describes one run's model: another model (say a non-DP one) must not wear it."""
    run = make_run(tmp_path / "run", report=REPORT)
    save_model(run / "model.safetensors", seed=0)
    other = tmp_path / "other.safetensors"
    save_model(other, seed=1)
    with pytest.raises(UserError, match="is not the model run .* produced"):
        client.push(other, "private", from_run=run)
    assert client.list() == []  # nothing published

    encrypted = make_run(tmp_path / "he-run", report=REPORT)  # the coordinator kept only model.he
    (encrypted / "model.he").write_bytes(b"ciphertexts")
    with pytest.raises(UserError, match="is not a decryption of"):
        client.push(other, "private", from_run=encrypted)
    decrypted = tmp_path / "decrypted.safetensors"  # as `fedweights decrypt` writes it
    save_file(load_file(str(other)), str(decrypted), metadata=decryption_metadata(encrypted / "model.he"))
    assert client.push(decrypted, "private", from_run=encrypted).privacy.record_epsilon == 2.4
