"""One run configuration: TOML file + CLI overrides, validated with messages that name the key.

A run config is a tree of dataclasses. In TOML the top-level keys sit at the root and each
section is a table (``[dp]``, ``[he]``); keys may be written with ``-`` or ``_``. On the Flower
side the same tree travels flattened as ``{"rounds": 5, "dp.enabled": true, ...}``
(Flower's run-config format), so ``flwr run --run-config`` can set any key too.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config_tables import build, check_types, flatten, norm_key, normalise_keys, unflatten
from .errors import ConfigError, UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


MAX_ROUND_RETRIES = 100
DEFAULT_LR = {"digits": 0.1, "fashion-mnist": 0.02}
"""Local learning rate when ``lr`` is not set, per built-in dataset (0.1 diverges on Fashion-MNIST's
784 inputs with momentum 0.9: 0.10 accuracy after 2 rounds; 0.02 gives 0.84)."""


@dataclass(frozen=True)
class DPConfig:
    """Record-level differential privacy (Opacus DP-SGD on every client)."""

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: Literal["pld", "rdp"] = "pld"
    max_epsilon: float | None = None
    grad_sample_mode: Literal["auto", "fused", "ghost", "hooks"] = "auto"

    def validate(self) -> None:
        """Check the ranges of the DP settings."""
        _positive("dp.noise_multiplier", self.noise_multiplier)
        _positive("dp.target_epsilon", self.target_epsilon)
        _positive("dp.max_grad_norm", self.max_grad_norm)
        _positive("dp.max_epsilon", self.max_epsilon)
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError("dp.delta", f"must be in (0, 1), got {self.delta}")
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ConfigError(
                "dp.target_epsilon",
                "and dp.noise_multiplier are exclusive: give one (the other is derived)",
            )
        if self.target_epsilon is not None and self.max_epsilon is not None and self.target_epsilon > self.max_epsilon:
            raise ConfigError(
                "dp.target_epsilon",
                f"of {self.target_epsilon:g} exceeds dp.max_epsilon={self.max_epsilon:g}: the budget would stop "
                "the planned run; lower the target or raise the budget",
            )

    @property
    def budget(self) -> float | None:
        """The ε no client may exceed: ``max_epsilon``, else ``target_epsilon``. The noise is
        calibrated for the planned run to spend at most the target, so only a round trained again
        (a retried attempt, a resumed run, more rounds on resume) would go over it."""
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon

    @property
    def budget_name(self) -> str:
        """The setting :attr:`budget` comes from, as messages name it."""
        return "max_epsilon" if self.max_epsilon is not None else "target_epsilon"


@dataclass(frozen=True)
class HEConfig:
    """Homomorphically encrypted aggregation (TenSEAL)."""

    enabled: bool = False
    key: str | None = None
    server_key: str | None = None
    compact: bool = False  # seeded ciphertexts: half the upload bytes, more work for the coordinator

    def validate(self) -> None:
        """No range checks yet: key files are checked when they are loaded."""


@dataclass(frozen=True)
class PublishConfig:
    """Publish the run's global models to a weight registry (see ``fedweights registry serve``)."""

    registry: str | None = None  # HOST:PORT; publishing is on when set
    name: str | None = None  # model name in the registry
    every_round: bool = False  # also publish each round's model, not only the final one
    tags: str | None = None  # comma-separated tags for the final model
    token_file: str | None = None  # registry token (default: $FEDWEIGHTS_REGISTRY_TOKEN_FILE)
    tls_dir: str | None = None  # ca.crt (+ client.pem/client.key) to reach a TLS registry

    def validate(self) -> None:
        """Publishing needs an address and a valid name; its other keys need publishing on."""
        if self.registry is None:
            for key in ("name", "tags", "token_file", "tls_dir"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"publish.{key}", "needs publish.registry (the registry's HOST:PORT)")
            if self.every_round:
                raise ConfigError("publish.every_round", "needs publish.registry (the registry's HOST:PORT)")
            return
        host, _, port = self.registry.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError("publish.registry", f"must look like HOST:PORT, got {self.registry!r}")
        if not self.name:
            raise ConfigError("publish.name", "is required when publishing (the model name in the registry)")
        from .registry.manifest import check_name, check_tag

        for key, check, values in (("publish.name", check_name, [self.name]), ("publish.tags", check_tag, self.tag_list)):
            for value in values:
                try:
                    check(value)
                except UserError as exc:
                    raise ConfigError(key, f"is not valid: {exc}") from None

    @property
    def tag_list(self) -> list[str]:
        """``tags`` split at commas."""
        return [t.strip() for t in (self.tags or "").split(",") if t.strip()]


@dataclass(frozen=True)
class StrategyConfig:
    """How the server aggregates: a built-in strategy (``fedweights.strategies.BUILTINS``) or ``module:Class``."""

    name: str = "fedavg"
    server_lr: float | None = None  # fedavgm: server learning rate (1.0); fedadam: eta (0.01)
    server_momentum: float = 0.9  # fedavgm
    proximal_mu: float = 0.01  # fedprox: weight of the proximal term on the clients
    trim_fraction: float = 0.2  # trimmed-mean: share cut from each tail, per coordinate
    byzantine: int = 0  # krum / multi-krum: malicious clients to tolerate (f)
    krum_select: int | None = None  # multi-krum: updates to average (default: each round's replies - byzantine)
    max_norm: float | None = None  # update validation: largest accepted L2 norm of an update
    # update validation: largest accepted ratio of an update's norm to the round's median update norm
    # (None: DEFAULT_MAX_NORM_RATIO where it applies; 0: off)
    max_norm_ratio: float | None = None
    max_examples: int | None = None  # update validation: largest example count (FedAvg weight) a reply may claim
    # update validation: largest accepted ratio of an update's norm to the global model's norm
    # (None: DEFAULT_MAX_MODEL_NORM_RATIO where it applies; 0: off)
    max_model_norm_ratio: float | None = None
    # update validation under --dp: reject updates further than DP-SGD with the run's settings can move
    # the model in one round (strategies.dp_update_bound)
    dp_update_bound: bool = True

    def validate(self, clients: int) -> None:
        """Check the ranges of the strategy settings (the name is checked when the strategy is built)."""
        if not self.name:
            raise ConfigError("strategy.name", "must name a built-in strategy or 'package.module:Class'")
        _positive("strategy.server_lr", self.server_lr)
        _positive("strategy.proximal_mu", self.proximal_mu)
        _positive("strategy.max_norm", self.max_norm)
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError("strategy.max_examples", f"must be >= 1 (or left unset), got {self.max_examples}")
        ratio = self.max_norm_ratio
        if ratio is not None and not (ratio == 0 or ratio > 1):
            raise ConfigError(
                "strategy.max_norm_ratio",
                f"must be > 1 (how many times the round's median update norm an update may be) or 0 to turn "
                f"the check off, got {ratio}",
            )
        model_ratio = self.max_model_norm_ratio
        if model_ratio is not None and not (0 <= model_ratio < math.inf):
            raise ConfigError(
                "strategy.max_model_norm_ratio",
                f"must be > 0 (how many times the global model's norm an update may be) or 0 to turn the check "
                f"off, got {model_ratio}",
            )
        if not 0 <= self.server_momentum < 1:
            raise ConfigError("strategy.server_momentum", f"must be in [0, 1), got {self.server_momentum}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError("strategy.trim_fraction", f"must be in [0, 0.5), got {self.trim_fraction}")
        if not 0 <= self.byzantine < clients:
            raise ConfigError("strategy.byzantine", f"must be in 0..clients-1={clients - 1}, got {self.byzantine}")
        if self.krum_select is not None and not 1 <= self.krum_select <= clients:
            raise ConfigError("strategy.krum_select", f"must be in 1..clients={clients}, got {self.krum_select}")


@dataclass(frozen=True)
class AttackConfig:
    """Simulated misbehaving clients for evaluating defences: partitions 0..malicious-1 attack."""

    malicious: int = 0
    kind: Literal["sign-flip", "scale", "gaussian", "label-flip"] = "sign-flip"
    scale: float = 10.0  # sign-flip/scale: update multiplier; gaussian: noise std per coordinate

    def validate(self, clients: int) -> None:
        """At most every client may attack; the scale must be positive."""
        if not 0 <= self.malicious <= clients:
            raise ConfigError("attack.malicious", f"must be between 0 and clients={clients}, got {self.malicious}")
        _positive("attack.scale", self.scale)


@dataclass(frozen=True)
class UserDPConfig:
    """User-level DP-FedAvg (McMahan et al. 2018) on the server: Poisson-sample clients, clip each
    update to ``clipping_norm``, add Gaussian noise of std ``noise_multiplier * clipping_norm`` to the sum."""

    enabled: bool = False
    noise_multiplier: float | None = None  # z (default 1.0 unless target_epsilon is given)
    target_epsilon: float | None = None  # derive z so that the whole run spends this epsilon
    clipping_norm: float = 1.0  # S
    clients_per_round: int | None = None  # m: expected clients per round, q = m / clients (default: all)
    delta: float = 1e-5

    def validate(self, clients: int, strategy: str) -> None:
        """Check ranges; DP-FedAvg's noise is calibrated for the FedAvg sum only."""
        _positive("user_dp.noise_multiplier", self.noise_multiplier)
        _positive("user_dp.target_epsilon", self.target_epsilon)
        _positive("user_dp.clipping_norm", self.clipping_norm)
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ConfigError(
                "user_dp.target_epsilon", "and user_dp.noise_multiplier are exclusive: give one (the other is derived)"
            )
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= clients:
            raise ConfigError(
                "user_dp.clients_per_round", f"must be between 1 and clients={clients}, got {self.clients_per_round}"
            )
        if not 0 < self.delta < 1:
            raise ConfigError("user_dp.delta", f"must be in (0, 1), got {self.delta}")
        if self.enabled and not self.delta < 1 / clients:
            raise ConfigError(
                "user_dp.delta", f"must be below 1/clients={1 / clients:g} for a meaningful guarantee, got {self.delta}"
            )
        if self.enabled and strategy != "fedavg":
            raise ConfigError(
                "strategy.name",
                f"is {strategy!r}, but user_dp needs 'fedavg': its noise is calibrated for the clipped FedAvg sum",
            )


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated run needs; every field is a TOML key and a CLI option."""

    clients: int = 4
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 16
    lr: float | None = None  # None: DEFAULT_LR of the dataset (0.1 for a custom task)
    momentum: float = 0.9
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = 0.5
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dataset: Literal["digits", "fashion-mnist"] = "digits"
    model: Literal["mlp", "cnn"] = "mlp"
    task: str | None = None
    out: str | None = None
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_clients: int | None = None
    round_timeout: float = 600.0
    on_round_timeout: Literal["stop", "retry"] = "stop"  # a failed round ends the run, or is re-run
    round_retries: int = 1  # with on_round_timeout="retry": re-runs of a failed round before stopping
    resume: bool = False  # continue the run in `out` from its last checkpoint (fedweights.flower.checkpoint)
    dp: DPConfig = field(default_factory=DPConfig)
    he: HEConfig = field(default_factory=HEConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    user_dp: UserDPConfig = field(default_factory=UserDPConfig)

    def __post_init__(self) -> None:
        if self.lr is None:  # resolved once, so every reader, report and checkpoint sees the rate used
            object.__setattr__(self, "lr", DEFAULT_LR.get(self.dataset, 0.1) if self.task is None else 0.1)

    def validate(self) -> None:
        """Check types, choices, ranges and cross-field rules; raise ConfigError naming the key."""
        check_types(self, prefix="")  # a RunConfig built in Python gets the checks a TOML file gets
        if not 0 <= self.seed < 2**32:
            raise ConfigError("seed", f"must be in 0..2**32-1 (numpy's seed range), got {self.seed}")
        for key in ("clients", "rounds", "local_epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        _positive("lr", self.lr)
        _positive("alpha", self.alpha)
        _positive("round_timeout", self.round_timeout)
        if not 0 <= self.round_retries <= MAX_ROUND_RETRIES:
            raise ConfigError("round_retries", f"must be between 0 and {MAX_ROUND_RETRIES}, got {self.round_retries}")
        if self.resume and not self.out:
            raise ConfigError("resume", "needs out: the run directory to resume (`--out RUN` with resume = true; `fedweights server --resume RUN`)")
        if not 0 <= self.momentum < 1:
            raise ConfigError("momentum", f"must be in [0, 1), got {self.momentum}")
        for key in ("fraction_train", "fraction_evaluate"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(key, f"must be in (0, 1], got {getattr(self, key)}")
        if self.min_clients is not None and not 1 <= self.min_clients <= self.clients:
            raise ConfigError(
                "min_clients", f"must be between 1 and clients={self.clients}, got {self.min_clients}"
            )
        if self.task is not None and ":" not in self.task:
            raise ConfigError("task", f"must look like 'package.module:function', got {self.task!r}")
        self.dp.validate()
        self.he.validate()
        self.publish.validate()
        if self.publish.registry and self.he.enabled:
            raise ConfigError(
                "publish.registry",
                "cannot be used with he.enabled: under HE the coordinator never holds the plaintext model; "
                "a client publishes it after decryption with `fedweights weights push` (README: Weight registry)",
            )
        self.strategy.validate(self.clients)
        self.attack.validate(self.clients)
        self.user_dp.validate(self.clients, self.strategy.name)
        if self.user_dp.enabled and self.strategy.max_norm_ratio:
            raise ConfigError(
                "strategy.max_norm_ratio",
                "cannot be used with user-level DP: it would make one client's inclusion depend on the other "
                "clients' updates, which DP-FedAvg's guarantee does not cover (updates are clipped to "
                "user_dp.clipping_norm instead); remove it, or use strategy.max_norm (a fixed bound)",
            )
        _check_switched_off(self)  # after the range checks, which name the actual problem first

    @property
    def wait_for_clients(self) -> int:
        """How many connected clients a round waits for before sampling (default: all ``clients``)."""
        return self.min_clients if self.min_clients is not None else self.clients

    @property
    def min_replies(self) -> int:
        """Fewest usable train replies a round needs to be aggregated (default 1)."""
        return self.min_clients if self.min_clients is not None else 1

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flatten to Flower's run-config form (``dp.enabled`` …); unset (None) keys are left out."""
        return {k: v for k, v in flatten(dataclasses.asdict(self)).items() if v is not None}

    @classmethod
    def from_flat(cls, flat: typing.Mapping[str, Any]) -> RunConfig:
        """Build from a flat ``{"dp.enabled": True}`` mapping such as Flower's ``context.run_config``."""
        return from_dict(unflatten(flat))


def from_dict(data: typing.Mapping[str, Any]) -> RunConfig:
    """Build a validated RunConfig from nested dicts (as parsed from TOML)."""
    config = build(RunConfig, data, prefix="")
    config.validate()
    return config


def load_config(path: str | Path | None = None, overrides: typing.Mapping[str, Any] | None = None) -> RunConfig:
    """Read a TOML run config (optional) and apply flat CLI overrides on top (CLI wins)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {'is a folder' if path.is_dir() else 'not found'}: {path} (give a TOML file)")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    merged = unflatten(flatten(normalise_keys(data)) | {norm_key(k): v for k, v in (overrides or {}).items()})
    return from_dict(merged)


# ---------------------------------------------------------------- helpers


def _positive(key: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ConfigError(key, f"must be > 0 and finite, got {value}")


SWITCHES = {"dp": ("enabled", "--dp"), "he": ("enabled", "--he"), "user_dp": ("enabled", "--user-dp"),
            "attack": ("malicious", "--malicious K")}
"""Config sections whose other settings only apply when their switch key (CLI flag) is on."""


def _check_switched_off(config: RunConfig) -> None:
    """A setting of a section that is off (DP, HE, user-level DP, attackers) would be silently
    ignored, so a run the user believes private would not be: refuse it and say how to turn it on."""
    for section, (switch, flag) in SWITCHES.items():
        table = getattr(config, section)
        switched = getattr(table, switch)
        if switched:
            continue
        default = type(table)()
        for f in dataclasses.fields(table):
            if f.name != switch and getattr(table, f.name) != getattr(default, f.name):
                raise ConfigError(
                    f"{section}.{f.name}",
                    f"is set but {section}.{switch} is {str(switched).lower()}, so it would be ignored: add {flag} "
                    f"([{section}] {switch} in TOML) or remove the setting",
                )
