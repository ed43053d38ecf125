"""The coordinator's round loop: sample → train → aggregate → evaluate → record, for R rounds.

It drives any Flower ``Strategy`` through its hooks (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) like ``Strategy.start`` does, and adds what a
run needs: per-round records in the run directory, failure reasons, a minimum number of
usable replies per round, a bounded wait for nodes, retries of failed rounds, a checkpoint after
every round and resuming from it, and ``RoundHooks`` where privacy ledgers and publishing plug in.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from rich.markup import escape

from ..errors import RunFailed
from ..progress import RichReporter
from ..run_archive import announce_archive, archive_previous_run
from ..run_dir import RoundRecord, RunDir, default_run_dir
from ..run_lock import RunLock
from ..run_status import resume_hint
from ..strategies import build_strategy, rejected_updates
from ..strategies.validation import rejected_evaluations
from .encryption import is_encrypted, own_keys, save_encrypted_model
from .error_replies import failure_from_error
from .node_wait import BoundedNodeWait, NodeWaitTimeout
from .runtime import RUN_ID_KEY, Runtime


NO_REPLY = "no reply within round_timeout"
EVALUATION_FAILED = "evaluation failed: "  # prefix of a failure of the round's evaluation, not its training


class StopRun(Exception):
    """Raised by ``RoundHooks.on_train_replies`` to end the run early but cleanly (e.g. every
    client's privacy budget is spent): the round is not aggregated, the run is saved as completed
    with ``stopped_early`` set to this message, and ``on_run_end`` still runs."""


class RoundHooks:
    """Extension points of the round loop; subclass and override what you need."""

    def on_train_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        """Called with the round's train messages before they are sent (may add records to them)."""

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> list[dict[str, str]] | None:
        """Called with every train reply of a round before any update is aggregated. Return the
        updates that must not be used, as ``{"node": node id, "reason": why}`` (e.g. a client over
        its privacy budget); they become failures of the round."""

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        """Called after a round's record is written, with the new global arrays."""

    def on_run_end(self, run_dir: RunDir, arrays: ArrayRecord) -> None:
        """Called once after the final model is saved and the run is marked completed."""


def build_hooks(runtime: Runtime, run_dir: RunDir, grid: Grid) -> list[RoundHooks]:
    """The hooks a run's config asks for (privacy ledger, checkpoints, publishing, …)."""
    hooks: list[RoundHooks] = []
    if runtime.config.dp.enabled:
        from ..privacy.server import PrivacyHooks

        hooks.append(PrivacyHooks(runtime, run_dir, grid))
    if runtime.config.user_dp.enabled:
        from ..privacy.user_level_report import UserLevelPrivacyFile  # imports RoundHooks from here

        hooks.append(UserLevelPrivacyFile(runtime.config, run_dir))
    if runtime.config.publish.registry:  # keep last: it copies the privacy report the hooks above write
        from ..registry.publish import RegistryPublisher

        hooks.append(RegistryPublisher(runtime.config, run_dir))
    return hooks


@dataclass
class RunResult:
    """Where a run's files are and what each round produced."""

    run_dir: Path
    rounds: list[RoundRecord]

    @property
    def final_accuracy(self) -> float | None:
        """eval_accuracy of the last round."""
        return self.rounds[-1].eval_accuracy if self.rounds else None


def run_federation(
    grid: Grid,
    runtime: Runtime,
    reporter: RichReporter | None = None,
    hooks: Iterable[RoundHooks] = (),
) -> RunResult:
    """Run ``runtime.config.rounds`` rounds on ``grid`` and write the run directory.

    Every round is checkpointed (``fedweights.flower.checkpoint``); with ``config.resume`` the run
    in ``config.out`` continues after its last checkpoint. Waiting for nodes is bounded by
    ``round_timeout``; a failed round stops the run or is retried (``on_round_timeout``).
    """
    run_dir = RunDir(runtime.config.out or default_run_dir())
    with RunLock(run_dir.path):  # one coordinator per run directory (a second one fails here, nothing written)
        return _federate(grid, runtime, run_dir, reporter or RichReporter(), hooks)


def _federate(grid: Grid, runtime: Runtime, run_dir: RunDir, reporter: RichReporter, hooks: Iterable[RoundHooks]) -> RunResult:
    from .checkpoint import CheckpointHooks, resume_run
    from .strategy_state import StrategyState

    config = runtime.config
    random.seed(config.seed)  # Flower samples nodes with the global `random`
    torch.manual_seed(config.seed)
    model = runtime.task().model_fn()
    strategy = build_strategy(config, buffer_keys=[name for name, _ in model.named_buffers()])
    state = StrategyState(strategy)
    records: list[RoundRecord] = []
    if config.resume:  # restores the strategy and `random`, trims metrics.json to the checkpoint
        point = resume_run(run_dir, config, state)
        run_id, first_round, arrays, records = point.run_id, point.next_round, point.arrays, point.records
    else:
        run_id, first_round, arrays = uuid.uuid4().hex[:12], 1, ArrayRecord(model.state_dict())
        announce_archive(reporter, archive_previous_run(run_dir.path, keep=own_keys(config, run_dir.path)))
        run_dir.start(config, run_id=run_id)
    grid = BoundedNodeWait(grid)
    hooks = [CheckpointHooks(run_dir, run_id, state), *build_hooks(runtime, run_dir, grid), *hooks]
    reporter.run_started(config.rounds, config.clients, str(run_dir.path))
    stopped: dict[str, str] = {}
    try:
        for server_round in range(first_round, config.rounds + 1):
            started = time.monotonic()
            try:
                arrays, train_metrics, failures, used = _train_round_with_retries(
                    grid, strategy, runtime, server_round, arrays, hooks, run_dir, reporter, run_id
                )
            except StopRun as stop:
                stopped = {"stopped_early": f"round {server_round}: {stop}"}
                reporter.console.print(f"[yellow]run stopped early[/yellow]: {escape(stopped['stopped_early'])}")
                break
            eval_metrics = _evaluate_round(grid, strategy, config, server_round, arrays, failures)
            record = RoundRecord(
                round=server_round,
                train_loss=_metric(train_metrics, "train_loss"),
                eval_loss=_metric(eval_metrics, "eval_loss"),
                eval_accuracy=_metric(eval_metrics, "eval_accuracy"),
                num_clients=used,
                seconds=round(time.monotonic() - started, 4),
                failures=failures,
            )
            records.append(record)
            run_dir.append_round(record)
            for hook in hooks:
                hook.on_round_end(record, arrays)
            reporter.round_finished(record, config.rounds)
        if is_encrypted(arrays):  # --he: the coordinator holds no plaintext model, only the encrypted sum
            save_encrypted_model(run_dir, arrays)
        else:
            model.load_state_dict(arrays.to_torch_state_dict())
            run_dir.save_model(model.state_dict(), {"rounds": str(config.rounds), "format": "pt"})
    except BaseException as exc:
        error = str(exc) or type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (fedweights simulate's child, server)
            error = f"interrupted by {exc or 'Ctrl-C'}; {resume_hint(run_dir.path)}"
        run_dir.set_status("failed", error=error)
        raise
    run_dir.set_status("completed", **stopped)
    for hook in hooks:
        hook.on_run_end(run_dir, arrays)
    reporter.run_finished(records)
    return RunResult(run_dir.path, records)


def _train_round_with_retries(grid, strategy, runtime: Runtime, server_round: int, arrays, hooks, run_dir, reporter, run_id):
    """``_train_round``, re-run (fresh sampling) after a failure when ``on_round_timeout="retry"``;
    every failed attempt is logged in metrics.json. The last failure ends the run."""
    config = runtime.config
    attempts = 1 + (config.round_retries if config.on_round_timeout == "retry" else 0)
    for attempt in range(1, attempts + 1):
        try:
            return _train_round(grid, strategy, runtime, server_round, arrays, hooks, run_id)
        except RunFailed as exc:
            run_dir.record_failed_attempt(server_round, attempt, str(exc))
            if attempt < attempts:
                reporter.console.print(f"[yellow]round {server_round}, attempt {attempt} failed[/yellow]: {escape(str(exc))}; retrying")
                continue
            tries = f" (attempt {attempt} of {attempts})" if attempts > 1 else ""
            kept = "no round completed, so there is no checkpoint to resume from: start the run again"
            if server_round > 1:
                kept = f"the checkpoint of round {server_round - 1} is kept: resume the run with --resume"
            raise RunFailed(f"{exc}{tries}. The run stopped; {kept}") from exc
    raise AssertionError("unreachable")


def _train_round(grid, strategy, runtime: Runtime, server_round: int, arrays: ArrayRecord, hooks, run_id: str = ""):
    config = runtime.config
    train_config = ConfigRecord({RUN_ID_KEY: run_id})  # clients key state that outlives a resume by it
    with grid.waiting(config.round_timeout, config.wait_for_clients, f"round {server_round}"):
        sent = list(strategy.configure_train(server_round, arrays, train_config, grid))
    for hook in hooks:
        hook.on_train_messages(server_round, sent)
    replies = list(grid.send_and_receive(sent, timeout=config.round_timeout))
    failures = failure_reasons(sent, replies)
    for hook in hooks:  # a reply a hook excludes is neither aggregated nor seen by the hooks after it
        excluded = hook.on_train_replies(server_round, replies) or []
        failures += excluded
        dropped = {item["node"] for item in excluded}
        replies = [r for r in replies if str(r.metadata.src_node_id) not in dropped]
    usable = [r for r in replies if not r.has_error()]
    needed = min(config.min_replies, len(sent))  # 0 when nobody was sampled (Poisson sampling may do that)
    _require_updates(server_round, len(usable), len(sent), needed, failures)
    new_arrays, metrics = strategy.aggregate_train(server_round, replies)
    rejected = rejected_updates(strategy, server_round)  # replies update validation excluded
    failures += rejected
    refused = {item["node"] for item in rejected}  # (--he may also name nodes it never sent to)
    used = sum(1 for r in usable if str(r.metadata.src_node_id) not in refused)
    _require_updates(server_round, used, len(sent), needed, failures)
    if new_arrays is None:
        raise RunFailed(f"round {server_round}: the strategy produced no model. Failures: {_summarise(failures)}")
    return new_arrays, metrics, failures, used


def _require_updates(server_round: int, usable: int, sent: int, needed: int, failures: list[dict[str, str]]) -> None:
    if usable < needed:
        raise RunFailed(
            f"round {server_round} got {usable} usable update(s) of {sent} sent; "
            f"at least {needed} needed. Failures: {_summarise(failures)}"
        )


def _evaluate_round(grid, strategy, config, server_round: int, arrays: ArrayRecord, failures) -> MetricRecord | None:
    """Evaluate the new global model; without enough nodes the round keeps its model, unevaluated."""
    try:
        with grid.waiting(config.round_timeout, config.wait_for_clients, f"round {server_round} evaluation"):
            messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))
    except NodeWaitTimeout as exc:
        failures.append({"node": "-", "reason": f"evaluation skipped: {exc}"})
        return None
    silent = {f["node"] for f in failures if f["reason"] == NO_REPLY}  # gone quiet in training (dead?): do not wait again
    messages = [m for m in messages if str(m.metadata.dst_node_id) not in silent]
    if not messages:
        return None
    replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
    metrics = strategy.aggregate_evaluate(server_round, replies)
    failed = {f["node"] for f in failures}  # a node that already failed this round is listed once
    failures += [{**f, "reason": f"{EVALUATION_FAILED}{f['reason']}"}
                 for f in failure_reasons(messages, replies) if f["node"] not in failed]
    failures += [f for f in rejected_evaluations(strategy, server_round) if f["node"] not in failed]
    return metrics


def failure_reasons(sent: Sequence[Message], replies: Sequence[Message]) -> list[dict[str, str]]:
    """Why each sampled node gave no usable reply: its error, or no reply within the timeout."""
    failures = [failure_from_error(str(r.metadata.src_node_id), r.error.reason) for r in replies if r.has_error()]
    answered = {r.metadata.src_node_id for r in replies}
    failures += [
        {"node": str(m.metadata.dst_node_id), "reason": NO_REPLY}
        for m in sent
        if m.metadata.dst_node_id not in answered
    ]
    return failures


def _summarise(failures: list[dict[str, str]]) -> str:
    if not failures:
        return "none reported"
    return "; ".join(f"node {f['node']}: {f['reason'].strip().splitlines()[-1][:300]}" for f in failures)


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])
