"""Run config: TOML + CLI overrides, types, ranges, and the Flower run-config round trip."""

from __future__ import annotations

import pytest

from fedweights.config import DPConfig, RunConfig, from_dict, load_config
from fedweights.errors import ConfigError, UserError


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid():
    config = load_config()
    assert config == RunConfig()
    assert config.clients == 4 and config.rounds == 5 and not config.dp.enabled


def test_toml_values_and_cli_overrides_win(tmp_path):
    path = write(tmp_path, 'clients = 3\nlocal-epochs = 2\nlr = 1\n[dp]\nenabled = true\nnoise-multiplier = 1.5\n')
    config = load_config(path, {"clients": 7, "dp.max_grad_norm": 0.5})
    assert config.clients == 7  # CLI beats the file
    assert config.local_epochs == 2  # dashed TOML keys are accepted
    assert config.lr == 1.0 and isinstance(config.lr, float)  # ints are fine where floats are expected
    assert config.dp.enabled and config.dp.noise_multiplier == 1.5 and config.dp.max_grad_norm == 0.5


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("bogus = 1\n", "bogus", "not a known setting"),
        ("[dp]\nnoise_multiplir = 1.0\n", "dp.noise_multiplir", "did you mean 'dp.noise_multiplier'"),
        ('clients = "4"\n', "clients", "must be of type int"),
        ("clients = 2.5\n", "clients", "must be of type int"),
        ("rounds = true\n", "rounds", "must be of type int"),
        ("dp = 3\n", "dp", "must be a table"),
        ("clients = 0\n", "clients", "must be >= 1"),
        ("alpha = 0\n", "alpha", "must be > 0"),
        ("alpha = -1.5\n", "alpha", "must be > 0"),
        ('partition = "random"\n', "partition", "must be one of"),
        ('device = "tpu"\n', "device", "must be one of"),
        ("fraction_train = 0\n", "fraction_train", "must be in (0, 1]"),
        ("min_clients = 9\n", "min_clients", "between 1 and clients=4"),
        ("[dp]\ndelta = 1.0\n", "dp.delta", "must be in (0, 1)"),
        ("[dp]\nnoise_multiplier = 0\n", "dp.noise_multiplier", "must be > 0"),
        ("[dp]\nmax_grad_norm = -1\n", "dp.max_grad_norm", "must be > 0"),
        ("[dp]\nnoise_multiplier = 1.0\ntarget_epsilon = 2.0\n", "dp.target_epsilon", "exclusive"),
        ('task = "no_colon"\n', "task", "package.module:function"),
        # a setting of a section that is off would be silently ignored: a run believed private would not be
        ("[dp]\nnoise_multiplier = 1\n", "dp.noise_multiplier", "dp.enabled is false, so it would be ignored: add --dp"),
        ("[user_dp]\nclients_per_round = 1\n", "user_dp.clients_per_round", "add --user-dp"),
        ('[he]\nkey = "keys/secret.ctx"\n', "he.key", "add --he"),
        ("[attack]\nscale = 3.0\n", "attack.scale", "attack.malicious is 0"),
        ("[dp]\nenabled = true\ntarget_epsilon = inf\n", "dp.target_epsilon", "must be > 0 and finite"),
        ("lr = inf\n", "lr", "must be > 0 and finite"),
        ("round_timeout = inf\n", "round_timeout", "must be > 0 and finite"),
        ("seed = -1\n", "seed", "0..2**32-1"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert err.value.key == key
    assert fragment in str(err.value)
    assert f"'{key}'" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "key", "fragment"),
    [
        ({"dataset": "fashion_mnist"}, "dataset", "must be one of 'digits', 'fashion-mnist'"),  # was: trained on digits
        ({"lr": "0.1"}, "lr", "must be of type float"),
        ({"clients": True}, "clients", "must be of type int"),
        ({"dp": DPConfig(accountant="prv")}, "dp.accountant", "must be one of 'pld', 'rdp'"),
        ({"dp": {"enabled": True}}, "dp", "must be a DPConfig"),
    ],
)
def test_a_config_built_in_python_gets_the_same_checks_as_a_file(kwargs, key, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig(**kwargs).validate()  # what simulate() and the server call first
    assert err.value.key == key and fragment in str(err.value)


def test_missing_or_broken_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(write(tmp_path, "clients = = 3"))


def test_flat_round_trip_matches_flower_run_config():
    config = from_dict({"clients": 3, "seed": 9, "dp": {"enabled": True, "noise_multiplier": 1.1}})
    flat = config.to_flat()
    assert flat["dp.enabled"] is True and flat["dp.noise_multiplier"] == 1.1
    assert "dp.target_epsilon" not in flat  # unset keys are left out (Flower has no null)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert RunConfig.from_flat(flat) == config
    # Flower-style dashed keys work too
    assert RunConfig.from_flat({"local-epochs": 3}).local_epochs == 3


def test_integers_beyond_64_bits_and_folders_as_config_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'rounds' must fit in 64 bits"):
        RunConfig(rounds=10**23).validate()
    (tmp_path / "big.toml").write_text("rounds = 99999999999999999999999\n")
    with pytest.raises(UserError):
        load_config(tmp_path / "big.toml")
    with pytest.raises(UserError, match="config file is a folder"):
        load_config(tmp_path)
