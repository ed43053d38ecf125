"""Strategy selection: built-ins are Flower's classes, users' module:Class loads, --he refuses non-linear ones."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from flwr.serverapp import strategy as flwr_strategies

from fedweights.config import DPConfig, HEConfig, RunConfig, StrategyConfig, UserDPConfig, load_config
from fedweights.errors import ConfigError
from fedweights.strategies import (
    BUILTINS,
    DEFAULT_MAX_MODEL_NORM_RATIO,
    DEFAULT_MAX_NORM_RATIO,
    ValidatedStrategy,
    build_strategy,
    check_he_compatible,
    is_linear,
)
from fedweights.strategies.multikrum import PerRoundMultiKrum

from .flower_messages import error_reply, train_reply

HE_ON = HEConfig(enabled=True)
EXPECTED = {
    "fedavg": flwr_strategies.FedAvg,
    "fedavgm": flwr_strategies.FedAvgM,
    "fedprox": flwr_strategies.FedProx,
    "fedadam": flwr_strategies.FedAdam,
    "median": flwr_strategies.FedMedian,
    "trimmed-mean": flwr_strategies.FedTrimmedAvg,
    "krum": flwr_strategies.Krum,
    "multi-krum": PerRoundMultiKrum,  # Flower's MultiKrum, its default selection per round
}


def built(name: str, **strategy) -> object:
    wrapper = build_strategy(RunConfig(clients=10, strategy=StrategyConfig(name=name, **strategy)))
    assert isinstance(wrapper, ValidatedStrategy)  # every strategy runs behind update validation
    return wrapper.strategy


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtins_are_flowers_own_classes_with_the_run_sampling(name):
    strategy = built(name)
    assert type(strategy) is EXPECTED[name]
    assert strategy.min_available_nodes == 10 and strategy.fraction_train == 1.0


def test_strategy_options_reach_the_flower_classes():
    assert built("fedavgm", server_lr=0.5, server_momentum=0.8).server_momentum == 0.8
    assert built("fedavgm", server_lr=0.5).server_learning_rate == 0.5
    assert built("fedprox", proximal_mu=0.3).proximal_mu == 0.3
    assert built("trimmed-mean", trim_fraction=0.3).beta == 0.3
    assert built("krum", byzantine=2).num_malicious_nodes == 2
    multi = built("multi-krum", byzantine=2, krum_select=5)
    assert isinstance(multi, flwr_strategies.MultiKrum)
    assert (multi.num_malicious_nodes, multi.num_nodes_to_select) == (2, 5)
    assert built("fedadam", server_lr=0.02).eta == 0.02
    assert build_strategy(RunConfig(strategy=StrategyConfig(max_norm=3.0))).max_norm == 3.0
    assert build_strategy(RunConfig(strategy=StrategyConfig(max_examples=500))).max_examples == 500


@pytest.mark.parametrize(
    ("settings", "ratio"),
    [
        ({}, DEFAULT_MAX_NORM_RATIO),  # on by default
        ({"strategy": StrategyConfig(max_norm_ratio=4.0)}, 4.0),
        ({"strategy": StrategyConfig(max_norm_ratio=0.0)}, None),  # 0 turns it off
        ({"user_dp": UserDPConfig(enabled=True, clients_per_round=2)}, None),  # clipping bounds updates there
    ],
)
def test_the_median_relative_norm_bound_a_run_applies(settings, ratio):
    assert build_strategy(RunConfig(**settings)).max_norm_ratio == ratio


@pytest.mark.parametrize(
    ("settings", "ratio"),
    [
        ({}, DEFAULT_MAX_MODEL_NORM_RATIO),  # on by default
        ({"strategy": StrategyConfig(max_model_norm_ratio=0.5)}, 0.5),  # below 1 is a valid bound
        ({"strategy": StrategyConfig(max_model_norm_ratio=0.0)}, None),  # 0 turns it off
        ({"user_dp": UserDPConfig(enabled=True, clients_per_round=2)}, None),  # clipping bounds updates there
        ({"user_dp": UserDPConfig(enabled=True, clients_per_round=2),  # ... but it may be asked for
          "strategy": StrategyConfig(max_model_norm_ratio=50.0)}, 50.0),
        ({"dp": DPConfig(enabled=True, noise_multiplier=5.0)}, None),  # DP-SGD's noise sets the updates' scale
        ({"dp": DPConfig(enabled=True, noise_multiplier=5.0), "strategy": StrategyConfig(max_model_norm_ratio=500.0)},
         500.0),
    ],
)
def test_the_model_relative_norm_bound_a_run_applies(settings, ratio):
    assert build_strategy(RunConfig(**settings)).max_model_norm_ratio == ratio


def test_multi_krum_leaves_out_the_attackers_in_a_round_with_dropouts():
    """12 clients sampled, f = 2, but only 8 replied (6 honest, 2 attackers) and one crashed: a
    selection fixed at 12 - 2 = 10 averaged every reply, attackers included; per round it is 8 - 2."""
    multi = build_strategy(RunConfig(clients=12, strategy=StrategyConfig(name="multi-krum", byzantine=2))).strategy
    honest = [train_reply(n, {"w": np.full(3, 1.0 + 0.01 * n)}) for n in range(1, 7)]
    attackers = [train_reply(n, {"w": np.full(3, 100.0)}) for n in (7, 8)]
    arrays, _ = multi.aggregate_train(1, [*honest, *attackers, error_reply(9)])
    assert multi.num_nodes_to_select == 6
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 1.035))  # the mean of the honest six
    fixed = built("multi-krum", byzantine=2, krum_select=8)
    arrays, _ = fixed.aggregate_train(1, [*honest, *attackers])
    assert arrays["w"].numpy()[0] > 10  # a count the user fixed is kept (here it lets them in)


def test_linearity_is_declared_for_every_builtin():
    assert {n for n, spec in BUILTINS.items() if spec.linear} == {"fedavg", "fedavgm", "fedprox"}


def test_unknown_name_suggests_the_closest_builtin():
    with pytest.raises(ConfigError, match="'fedavgg' is not a built-in strategy.*did you mean 'fedavg'"):
        build_strategy(RunConfig(strategy=StrategyConfig(name="fedavgg")))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's module on sys.path with good and bad strategy classes."""
    (tmp_path / "my_strategies.py").write_text(
        textwrap.dedent(
            """
            from flwr.serverapp.strategy import FedAvg, FedMedian, Strategy

            class Halved(FedAvg):
                linear_in_updates = True

            class NoInitArgs(FedMedian):
                def __init__(self):
                    super().__init__(min_available_nodes=1)

            class SubclassedAvg(FedAvg):
                pass

            class NeedsThreshold(FedAvg):
                def __init__(self, threshold, **kwargs):
                    super().__init__(**kwargs)

            class Incomplete(Strategy):
                pass

            class NotAStrategy:
                pass
            """
        )
    )
    (tmp_path / "broken_strategies.py").write_text("raise RuntimeError('bad config in module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_strategies"


def test_user_class_is_built_with_the_settings_it_accepts(user_module):
    strategy = built(f"{user_module}:Halved")
    assert type(strategy).__name__ == "Halved" and strategy.min_available_nodes == 10
    assert type(built(f"{user_module}:NoInitArgs")).__name__ == "NoInitArgs"  # no kwargs forced on it


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_such_module_xyz:Foo", "module 'no_such_module_xyz' cannot be imported"),
        ("my_strategies:Missing", "has no attribute 'Missing'"),
        ("broken_strategies:Agg", "importing 'broken_strategies' failed: RuntimeError: bad config in module"),
        ("my_strategies:NotAStrategy", "not a subclass of flwr.serverapp.strategy.Strategy"),
        ("my_strategies:Incomplete", "is abstract: it does not implement aggregate_evaluate"),
        ("my_strategies:NeedsThreshold", "its constructor needs threshold"),
    ],
)
def test_unloadable_user_strategy_is_a_clear_config_error(user_module, spec, fragment):
    with pytest.raises(ConfigError, match="strategy.name") as err:
        build_strategy(RunConfig(strategy=StrategyConfig(name=spec)))
    assert fragment in str(err.value)


def test_he_refuses_non_linear_strategies_with_a_clear_message(user_module):
    for name in ("median", "krum", "trimmed-mean", "multi-krum", "fedadam", f"{user_module}:SubclassedAvg"):
        with pytest.raises(ConfigError, match="not linear in the updates.*--he"):
            check_he_compatible(RunConfig(he=HE_ON, strategy=StrategyConfig(name=name)))
    for name in ("fedavg", "fedavgm", "fedprox"):
        check_he_compatible(RunConfig(he=HE_ON, strategy=StrategyConfig(name=name)))
    assert is_linear(built(f"{user_module}:Halved")) and not is_linear(built(f"{user_module}:SubclassedAvg"))


def test_he_refuses_custom_classes_even_linear_ones(user_module):
    """The coordinator only adds ciphertexts: it could not run the class's own aggregate_train."""
    with pytest.raises(ConfigError, match="only adds ciphertexts.*cannot run your class's aggregate_train") as err:
        check_he_compatible(RunConfig(he=HE_ON, strategy=StrategyConfig(name=f"{user_module}:Halved")))
    assert "fedavg, fedprox, fedavgm" in str(err.value)


def test_user_dp_with_he_uses_distributed_noise(tmp_path):
    from fedweights.crypto.keys import make_keys
    from fedweights.strategies.encrypted_user_dp import EncryptedUserDPFedAvg

    files = make_keys(tmp_path / "keys")
    he = HEConfig(enabled=True, server_key=str(files.server))
    config = RunConfig(he=he, user_dp=UserDPConfig(enabled=True, clients_per_round=2))
    check_he_compatible(config)
    strategy = build_strategy(config)
    assert isinstance(strategy, EncryptedUserDPFedAvg) and strategy.sample_rate == 0.5


def test_strategy_table_in_toml_and_cli_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('clients = 10\n[strategy]\nname = "krum"\nbyzantine = 2\nmax-norm = 4\nmax-norm-ratio = 6\nmax-model-norm-ratio = 20\n[attack]\nmalicious = 2\n')
    config = load_config(path, {"strategy.name": "multi-krum", "attack.kind": "gaussian"})
    assert config.strategy == StrategyConfig(
        name="multi-krum", byzantine=2, max_norm=4.0, max_norm_ratio=6.0, max_model_norm_ratio=20.0
    )
    assert (config.attack.malicious, config.attack.kind, config.attack.scale) == (2, "gaussian", 10.0)
    assert RunConfig.from_flat(config.to_flat()) == config  # travels through Flower's run config


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"strategy.trim_fraction": 0.5}, "strategy.trim_fraction"),
        ({"strategy.byzantine": 4}, "strategy.byzantine"),
        ({"strategy.max_norm": 0}, "strategy.max_norm"),
        ({"strategy.max_norm_ratio": 0.5}, "strategy.max_norm_ratio"),
        ({"strategy.max_examples": 0}, "strategy.max_examples"),
        ({"strategy.max_norm_ratio": float("nan")}, "strategy.max_norm_ratio"),
        ({"strategy.max_model_norm_ratio": -1.0}, "strategy.max_model_norm_ratio"),
        ({"strategy.max_model_norm_ratio": float("inf")}, "strategy.max_model_norm_ratio"),
        ({"user_dp.enabled": True, "strategy.max_norm_ratio": 5.0}, "strategy.max_norm_ratio"),
        ({"attack.malicious": 5}, "attack.malicious"),
        ({"attack.kind": "poison"}, "attack.kind"),
        ({"user_dp.enabled": True, "strategy.name": "median"}, "strategy.name"),
        ({"user_dp.clients_per_round": 9}, "user_dp.clients_per_round"),
        ({"user_dp.delta": 1.5}, "user_dp.delta"),
        ({"user_dp.enabled": True, "user_dp.delta": 0.3}, "user_dp.delta"),  # not below 1/clients
        ({"user_dp.noise_multiplier": 1.0, "user_dp.target_epsilon": 2.0}, "user_dp.target_epsilon"),
    ],
)
def test_impossible_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, {"clients": 4, **overrides})
    assert err.value.key == key


def test_cli_reports_an_unloadable_strategy_in_one_line_before_any_process_starts(cli):
    result = cli("simulate", "--strategy", "nowhere_pkg:Agg")
    assert result.returncode == 2 and "'strategy.name'" in result.stderr
    assert "module 'nowhere_pkg' cannot be imported" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
