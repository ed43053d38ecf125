"""Run a whole federation in this process on Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError, RunFailed, UserError
from ..progress import RichReporter
from ..registry.publish import preflight as publish_preflight
from ..run_archive import announce_archive, archive_previous_run
from ..run_dir import RoundRecord, RunDir, default_run_dir
from ..run_lock import RunLock
from ..strategies import build_strategy, check_he_compatible
from ..task import ClientData, Task, save_task
from ..training import select_device
from .client_app import build_client_app
from .encryption import own_keys, prepare_simulation_keys, write_decrypted_model
from .round_loop import RunResult
from .runtime import Runtime, fixed_runtime
from .server_app import build_server_app

TASK_FILE = ".task.pkl"
RAY_ADDRESS_ENV = "FEDWEIGHTS_RAY_ADDRESS"
"""Set to a Ray cluster address (e.g. ``127.0.0.1:6379``) to run simulations on that cluster
instead of starting a private Ray instance per run (saves ~8 s of start-up per run)."""


def simulate(
    config: RunConfig,
    task: Task | None = None,
    reporter: RichReporter | None = None,
    verbose: bool = False,
) -> RunResult:
    """Train ``task`` (default: the built-in one the config names) with ``config.clients``
    simulated clients for ``config.rounds`` rounds; return the run's records.

    Raises ``UserError`` for bad settings (before any process starts) and ``RunFailed`` when
    the run cannot complete.
    """
    if not isinstance(config, RunConfig):
        raise UserError(f"simulate() takes a RunConfig (e.g. RunConfig(clients=4) or load_config(path)), got {type(config).__name__}")
    if task is not None and not isinstance(task, Task):
        raise UserError(f"simulate(task=...) takes a fedweights Task (model_fn, train_data, test_data), got {type(task).__name__}")
    config.validate()
    if task is not None:
        task.check()  # before any process starts: a model instance instead of a factory fails here
    publish_preflight(config)  # registry reachable and accepting our writes, before any process starts
    out = Path(config.out) if config.out else default_run_dir()
    with RunLock(out) as lock, lock.shared_in_process():  # the in-process ServerApp runs under our lock
        return _simulate_in(out, dataclasses.replace(config, out=str(out.resolve())), task, reporter, verbose)


def _simulate_in(out: Path, config: RunConfig, task: Task | None, reporter: RichReporter | None, verbose: bool) -> RunResult:
    device = select_device(config.device)
    check_he_compatible(config)  # --he with a strategy it cannot run: refused before any key is made
    task_file = str(save_task(task, out / TASK_FILE)) if task is not None else None
    runtime = Runtime(config, task_file)
    runtime.task().client_data(0, config.clients, config)  # fail fast on impossible partitions
    if config.he.enabled:  # a model --he cannot aggregate (integer buffers): refused before any key is made
        from ..crypto.codec import layout_of

        layout_of(runtime.task().model_fn().state_dict())
    else:
        build_strategy(config)  # fail fast on an unknown or unloadable strategy (--he: checked above)
    if config.dp.enabled or config.strategy.max_examples is not None:
        shards = [runtime.task().client_data(i, config.clients, config) for i in range(config.clients)]
        _check_max_examples(config.strategy.max_examples, shards)
    if config.dp.enabled:  # unreachable target ε, budget below one round: refuse before Ray starts
        from ..privacy.plan import check_dp_run, check_grad_sample_mode

        check_dp_run(config, [len(shard.train) for shard in shards])
        check_grad_sample_mode(config, runtime.task().model_fn)
    reporter = reporter or RichReporter()
    if not config.resume:  # a new run in an earlier run's directory: its results (and keys) move aside first
        announce_archive(reporter, archive_previous_run(out, keep=own_keys(config, out)))  # --he-key RUN/keys/…: kept
    config = prepare_simulation_keys(config, out)  # --he: a fresh key pair in RUN/keys/ unless he.key is given
    runtime = Runtime(config, task_file)

    from flwr.simulation import run_simulation

    _quiet_flower(verbose)
    try:
        run_simulation(
            server_app=build_server_app(fixed_runtime(runtime), reporter=reporter),
            client_app=build_client_app(fixed_runtime(runtime)),
            num_supernodes=config.clients,
            backend_config=_backend_config(config.clients, device.type == "cuda", verbose),
        )
    except UserError:
        raise
    except Exception as exc:  # Flower wraps ServerApp errors; report the root cause
        raise RunFailed(f"simulation failed: {_root_cause(exc)}") from exc
    finally:
        if task_file:
            Path(task_file).unlink(missing_ok=True)
    metrics = RunDir(out).read_metrics()
    if metrics.get("status") != "completed":
        raise RunFailed(f"simulation ended with status {metrics.get('status')!r}: {metrics.get('error', 'unknown error')}")
    if config.he.enabled:  # the coordinator saved only the encrypted model; this process holds the secret key
        write_decrypted_model(RunDir(out), config, runtime.task().model_fn())
    return RunResult(out, [RoundRecord(**r) for r in metrics["rounds"]])


def _check_max_examples(max_examples: int | None, shards: list[ClientData]) -> None:
    """Refuse a ``max_examples`` below a client's own shard: its honest replies would be rejected
    every round (the count each reply reports is its shard's size)."""
    if max_examples is None:
        return
    sizes = [max(len(shard.train), len(shard.test)) for shard in shards]
    size = max(sizes)
    largest = sizes.index(size)
    if size > max_examples:
        raise ConfigError(
            "strategy.max_examples",
            f"is {max_examples}, but client {largest}'s shard holds {size} examples, which its honest replies "
            f"report: they would be rejected every round. Set it to at least {size} (this simulation's largest "
            f"shard) or leave it unset",
        )


def _backend_config(clients: int, use_gpu: bool, verbose: bool) -> dict:
    cpus = os.cpu_count() or 1
    logs = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    address = os.environ.get(RAY_ADDRESS_ENV)
    if address:  # attach to a running Ray cluster (its own CPUs/GPUs) instead of starting one
        init_args = {"address": address, **logs}
    else:
        # "local" starts a private instance even when another Ray cluster runs on this machine.
        init_args = {"address": "local", "num_cpus": cpus, "num_gpus": 1 if use_gpu else 0, "include_dashboard": False, **logs}
    # One CPU per client actor; with a GPU, clients share it in equal slices.
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 1.0 / min(clients, cpus) if use_gpu else 0.0},
        "init_args": init_args,
    }


def _quiet_flower(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(level)
    if not verbose and not any(isinstance(f, _NoTracebacks) for f in logging.getLogger("flwr").filters):
        logging.getLogger("flwr").addFilter(_NoTracebacks())  # failures reach metrics.json and one error line
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        warnings.filterwarnings("ignore", category=DeprecationWarning)


class _NoTracebacks(logging.Filter):
    """Drop the tracebacks Flower logs for each failed client call (e.g. every actor once Ray died),
    and its notice that ``run_simulation`` is deprecated: it asks for ``flwr run``, which
    ``fedweights simulate`` users do not call (``fedweights server`` is the ``flwr run`` path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Traceback (most recent call last)"):
            return False
        return not (message.startswith("DEPRECATED FEATURE") and "run_simulation" in str(record.args))


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__
