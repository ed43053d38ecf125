"""The run options shared by `fedweights simulate` and `fedweights server` (one definition each).

``@run_options()`` appends these options to a command's signature and hands the command the
ones the user gave as flat config overrides (``overrides={"dp.enabled": True, ...}``).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import RunConfig, load_config
from .app import given


@dataclass(frozen=True)
class RunOption:
    """One CLI option: its parameter name, the config key it sets, its type and typer.Option."""

    param: str
    key: str
    type: Any
    option: Any


def _opt(param: str, key: str, type_: Any, *decls: str, help: str) -> RunOption:  # noqa: A002 - typer's name
    return RunOption(param, key, Optional[type_], typer.Option(None, *decls, help=help))


RUN_OPTIONS: list[RunOption] = [
    _opt("clients", "clients", int, help="Number of clients (simulate: simulated; server: expected, default 4)."),
    _opt("rounds", "rounds", int, help="Federated rounds (default: 5)."),
    _opt("min_clients", "min_clients", int, help="Clients a round waits for and the fewest usable updates it needs."),
    _opt("round_timeout", "round_timeout", float, help="Seconds a round waits for clients and replies (default: 600)."),
    _opt("on_round_timeout", "on_round_timeout", str, help="A failed round (too few updates in time): stop | retry (default: stop)."),
    _opt("round_retries", "round_retries", int, help="With --on-round-timeout retry: re-runs of a failed round (default: 1)."),
    _opt("local_epochs", "local_epochs", int, help="Local epochs per round (default: 1)."),
    _opt("batch_size", "batch_size", int, help="Local batch size (default: 16)."),
    _opt("lr", "lr", float, help="Local SGD learning rate (default: 0.1 on digits and custom tasks, 0.02 on fashion-mnist)."),
    _opt("partition", "partition", str, help="iid | dirichlet (default: iid)."),
    _opt("alpha", "alpha", float, help="Dirichlet concentration; small = label skew (default: 0.5)."),
    _opt("seed", "seed", int, help="Seed for splits, init and sampling (default: 0)."),
    _opt("device", "device", str, help="auto | cpu | cuda (default: auto)."),
    _opt("dataset", "dataset", str, help="digits | fashion-mnist (default: digits)."),
    _opt("model", "model", str, help="mlp | cnn (default: mlp)."),
    _opt("task", "task", str, help="Your own task: 'package.module:function' returning fedweights.Task."),
    _opt("out", "out", Path, help="Run directory (default: runs/<timestamp>)."),
    _opt("dp", "dp.enabled", bool, "--dp/--no-dp", help="Record-level DP-SGD on clients."),
    _opt("noise_multiplier", "dp.noise_multiplier", float, help="DP: noise multiplier σ (default 1.0)."),
    _opt("target_epsilon", "dp.target_epsilon", float, help="DP: calibrate σ so the whole run spends this ε."),
    _opt("max_grad_norm", "dp.max_grad_norm", float, help="DP: per-example clipping norm C (default 1.0)."),
    _opt("delta", "dp.delta", float, help="DP: δ (default: 1/n_k² rounded down to 10^-k, at most 1e-5)."),
    _opt("accountant", "dp.accountant", str, help="DP: pld (tight, default) | rdp."),
    _opt("max_epsilon", "dp.max_epsilon", float, help="DP: per-client budget; a client stops before exceeding it."),
    _opt("he", "he.enabled", bool, "--he/--no-he", help="Homomorphically encrypted aggregation."),
    _opt("he_key", "he.key", Path, "--he-key", help="With --he: use this secret.ctx instead of fresh keys."),
    _opt("he_server_key", "he.server_key", Path, "--he-server-key", help="With --he: the coordinator's server.ctx."),
    _opt("publish", "publish.registry", str, "--publish", help="Weight registry HOST:PORT: publish the final global model there."),
    _opt("name", "publish.name", str, "--name", help="Model name in the registry (with --publish)."),
    _opt("publish_every_round", "publish.every_round", bool, "--publish-every-round", help="Also publish each round's model."),
    _opt("strategy", "strategy.name", str, help="Aggregation: fedavg | fedavgm | fedprox | fedadam | median | trimmed-mean | "
         "krum | multi-krum, or your own 'package.module:Class' (default: fedavg)."),
    _opt("max_norm", "strategy.max_norm", float, help="Reject updates whose L2 norm exceeds this (default: no bound)."),
    _opt("max_norm_ratio", "strategy.max_norm_ratio", float, help="Reject updates whose norm exceeds R x the round's "
         "median update norm (default: 10, with 3 or more updates; 0: off)."),
    _opt("max_model_norm_ratio", "strategy.max_model_norm_ratio", float, help="Reject updates whose norm exceeds R x "
         "the global model's norm (default: 100; 0: off)."),
    _opt("dp_update_bound", "strategy.dp_update_bound", bool, "--dp-update-bound/--no-dp-update-bound",
         help="With --dp: reject updates further than DP-SGD with the run's settings can move the model (default: on)."),
    _opt("max_examples", "strategy.max_examples", int, help="Reject replies that claim more examples (their FedAvg "
         "weight) than this (default: counts taken on trust)."),
    _opt("malicious", "attack.malicious", int, help="Simulated attackers: partitions 0..K-1 misbehave (default: 0)."),
    _opt("attack", "attack.kind", str, help="sign-flip | scale | gaussian | label-flip (default: sign-flip)."),
    _opt("attack_scale", "attack.scale", float, help="Attack strength: update multiplier or noise std (default: 10)."),
    _opt("user_dp", "user_dp.enabled", bool, "--user-dp/--no-user-dp", help="User-level DP-FedAvg on the server."),
    _opt("clients_per_round", "user_dp.clients_per_round", int, help="user-dp: expected clients per round m, q = m/clients."),
    _opt("user_noise_multiplier", "user_dp.noise_multiplier", float, help="user-dp: noise multiplier z (default: 1.0)."),
    _opt("user_clipping_norm", "user_dp.clipping_norm", float, help="user-dp: clipping norm S of an update (default: 1.0)."),
]


def run_options(exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorate a command taking ``overrides``: it gains every run option not in ``exclude``."""
    chosen = [o for o in RUN_OPTIONS if o.param not in exclude]

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func)  # resolved in the command's own module
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values() if p.name != "overrides"]
        extra = [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=o.option, annotation=o.type) for o in chosen]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {o.key: kwargs.pop(o.param) for o in chosen}
            overrides = given({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})
            return func(overrides=overrides, **kwargs)

        command.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        command.__annotations__ = {**{p.name: p.annotation for p in own}, **{o.param: o.type for o in chosen}}
        del command.__wrapped__  # typer must read the new signature, not the original one
        return command

    return decorate


def build_run_config(config_file: Path | None, overrides: Mapping[str, Any]) -> RunConfig:
    """The TOML file (if any) with the CLI overrides on top (validated: e.g. DP options without --dp are refused)."""
    return load_config(config_file, overrides)


def run_config_for(config_file: Path | None, resume: Path | None, overrides: Mapping[str, Any]) -> RunConfig:
    """The run a command starts: the one stored in ``resume`` (with the changes a resume allows),
    else the TOML file with the CLI overrides on top."""
    if resume is None:
        return build_run_config(config_file, overrides)
    from ..errors import UserError
    from ..flower.checkpoint import resume_config

    if config_file is not None or "out" in overrides:
        raise UserError("--resume DIR continues the run stored in DIR: drop --config/--out")
    return resume_config(resume, dict(overrides))  # refuses changes that would make it another run
