"""Publishing from runs: the [publish] config section, the preflight check, the HE refusal, and
`fedweights simulate --publish` on Flower's simulation engine publishing every round's model."""

from __future__ import annotations

import json

import pytest

from fedweights.config import load_config
from fedweights.errors import ConfigError, UserError
from fedweights.proto import registry_pb2 as pb
from fedweights.registry import Client
from fedweights.registry.publish import preflight

from .registry_support import TOKEN, registry  # noqa: F401


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"publish.name": "m"}, "'publish.name' needs publish.registry"),
        ({"publish.every_round": True}, "'publish.every_round' needs publish.registry"),
        ({"publish.registry": "localhost"}, "'publish.registry' must look like HOST:PORT"),
        ({"publish.registry": "h:1"}, "'publish.name' is required when publishing"),
        ({"publish.registry": "h:1", "publish.name": "a b"}, "'publish.name' is not valid: invalid model name"),
        ({"publish.registry": "h:1", "publish.name": "m", "publish.tags": "ok,latest"}, "'publish.tags' is not valid"),
        ({"publish.registry": "h:1", "publish.name": "m", "he.enabled": True}, "never holds the plaintext model"),
    ],
)
def test_publish_settings_are_validated(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_publish_section_in_a_toml_file(tmp_path):
    (tmp_path / "run.toml").write_text('[publish]\nregistry = "127.0.0.1:9600"\nname = "digits"\nevery-round = true\ntags = "prod, v1"\n')
    config = load_config(tmp_path / "run.toml")
    assert config.publish.every_round and config.publish.tag_list == ["prod", "v1"]
    assert config.to_flat()["publish.name"] == "digits"  # travels in Flower's run config too


def test_preflight_fails_fast_without_write_access(registry, tmp_path):
    config = load_config(None, {"publish.registry": registry.address, "publish.name": "m"})
    with pytest.raises(UserError, match="refused: publishing needs a registry token"):
        preflight(config)
    (tmp_path / "token").write_text(TOKEN)
    preflight(load_config(None, {"publish.registry": registry.address, "publish.name": "m", "publish.token_file": str(tmp_path / "token")}))
    with pytest.raises(UserError, match="cannot reach the registry at 127.0.0.1:1"):
        preflight(load_config(None, {"publish.registry": "127.0.0.1:1", "publish.name": "m"}))


@pytest.mark.slow
def test_simulate_publishes_every_round_with_lineage(registry, cli, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    out = tmp_path / "run"
    result = cli(
        "simulate", "--clients", "2", "--rounds", "2", "--out", str(out),
        "--publish", registry.address, "--name", "digits/mlp", "--publish-every-round",
        env={"FEDWEIGHTS_REGISTRY_TOKEN_FILE": str(tmp_path / "token")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = json.loads((out / "metrics.json").read_text())["run_id"]

    with Client(registry.address) as client:
        log = client.log("digits/mlp")
        assert [(v.ref, v.parent, v.manifest.round, v.manifest.run_id) for v in log] == [
            ("digits/mlp:2", "digits/mlp:1", 2, run_id),
            ("digits/mlp:1", None, 1, run_id),
        ]
        assert all(v.privacy.guarantee == pb.PrivacyCertificate.NONE for v in log)  # a run without DP says so
        client.pull("digits/mlp", tmp_path / "final.safetensors")
    assert (tmp_path / "final.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    published = json.loads((out / "published.json").read_text())
    assert [v["ref"] for v in published["versions"]] == ["digits/mlp:1", "digits/mlp:2"]
    assert not list(out.glob(".round-*"))  # per-round files are removed once published
