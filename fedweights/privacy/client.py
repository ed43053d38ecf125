"""The DP side of a fedweights ClientApp: one accountant per client for the whole run, a budget
checked before training, DP-SGD training, and a reply that carries the client's spend.

The accountant state survives rounds, client restarts and process boundaries: it lives in a file
under the node's ``state-dir`` (deployment; written atomically) or else in Flower's per-node
``context.state`` (simulation). It is saved *before* the reply leaves, so a spend is never lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message
from torch.utils.data import Dataset

from ..fileio import atomic_write_json
from ..flower.runtime import NODE_NAME, NODE_STATE_DIR, PARTITION_ID, RUN_ID_KEY, Runtime
from .accounting import as_entries, covering_history, epsilon
from .dp_sgd import RoundPlan, train_private_round
from .plan import client_delta, round_plan
from .protocol import BUDGET_EXHAUSTED, PRIVACY, ClientSpend, exhausted_reason, ledger_history

STATE_KEY = "fedweights.dp-accountant"  # context.state key (simulation)


def client_id_of(context: Context) -> str:
    """A client's stable id in ledgers and reports: its partition id, or for a node that brings its
    own data its name (``fedweights client`` sets both; Flower's node id is not stable across
    reconnects without a registered key, nor across SuperLink databases)."""
    for key in (PARTITION_ID, NODE_NAME):
        if key in context.node_config:
            return str(context.node_config[key])
    return str(context.node_id)


class AccountantState:
    """A client's accountant for one run: its DP-SGD history plus the plan it trains with."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = data or {"history": [], "rounds": []}

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """All (σ, q, steps) entries so far."""
        return as_entries(self.data["history"])

    def cover(self, ledger: list[tuple[float, float, int]]) -> None:
        """Take the smallest history covering ours and the coordinator's ledger account (a client
        that lost its state resumes from the ledger instead of from zero)."""
        if ledger:
            self.data["history"] = [list(e) for e in covering_history(self.history, ledger)]

    def record_round(
        self, server_round: int, history: list[tuple[float, float, int]], plan: RoundPlan, target: float | None
    ) -> None:
        """Replace the history with the accountant's new one after a trained round."""
        self.data["history"] = [list(e) for e in history]
        self.data["rounds"] = [*self.data["rounds"], server_round]
        self.data["plan"] = {"noise_multiplier": plan.noise_multiplier, "target_epsilon": target}

    def sigma_for(self, config) -> float | None:
        """The σ this client already trains with when it was calibrated for ``config``'s target
        (so a client process started per round does not calibrate again)."""
        plan = self.data.get("plan")
        if plan is None or config.dp.target_epsilon is None:
            return None
        return float(plan["noise_multiplier"]) if plan.get("target_epsilon") == config.dp.target_epsilon else None


class ContextStateStore:
    """Accountant state in Flower's per-node ``context.state`` (kept across rounds in simulation)."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self) -> AccountantState:
        """The saved state, or a fresh one."""
        record = self.context.state.get(STATE_KEY)
        return AccountantState(json.loads(str(record["json"])) if record is not None else None)

    def save(self, state: AccountantState) -> None:
        """Store the state in the context (Flower persists it after the reply)."""
        self.context.state[STATE_KEY] = ConfigRecord({"json": json.dumps(state.data)})


class FileStateStore:
    """Accountant state in a JSON file, replaced atomically (survives client restarts)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> AccountantState:
        """The saved state, or a fresh one."""
        return AccountantState(json.loads(self.path.read_text()) if self.path.exists() else None)

    def save(self, state: AccountantState) -> None:
        """Write the state (temporary file, fsync, rename)."""
        atomic_write_json(self.path, state.data)


def accountant_store(context: Context, run_id: str | None = None) -> ContextStateStore | FileStateStore:
    """A file under the node's ``state-dir`` when it has one, else Flower's ``context.state``.

    The file is named after the fedweights run id (``run_id``, sent by the coordinator; it stays
    the same when a run is resumed, which starts a new Flower run), else Flower's run id.
    """
    state_dir = context.node_config.get(NODE_STATE_DIR)
    if state_dir:
        name = f"dp-accountant-{run_id}.json" if run_id else f"dp-accountant-run-{context.run_id}.json"
        return FileStateStore(Path(str(state_dir)) / name)
    return ContextStateStore(context)


@dataclass
class PrivateOutcome:
    """A private round's trained weights, loss, and the records to add to the reply."""

    state_dict: dict[str, torch.Tensor]
    train_loss: float
    records: dict[str, ConfigRecord]  # {PRIVACY: the client's spend}


def train_privately(
    msg: Message,
    context: Context,
    runtime: Runtime,
    model: torch.nn.Module,
    data: Dataset,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> PrivateOutcome | Message:
    """Train ``model`` on ``data`` with DP-SGD, or return a BUDGET_EXHAUSTED error reply, without
    training, when the client's budget forbids the round."""
    config = runtime.config
    dp = config.dp
    client_id = client_id_of(context)
    server_round = int(msg.content["config"].get("server-round", 0))
    store = accountant_store(context, str(msg.content["config"].get(RUN_ID_KEY, "")) or None)
    state = store.load()
    state.cover(ledger_history(msg.content, client_id))  # the coordinator's account, if it knows more
    plan = round_plan(len(data), config, state.sigma_for(config))
    delta = client_delta(len(data), dp)
    if dp.budget is not None:
        next_epsilon = epsilon([*state.history, plan.entry], delta, dp.accountant)
        if next_epsilon > dp.budget:
            spent = epsilon(state.history, delta, dp.accountant)
            reason = exhausted_reason(client_id, spent, next_epsilon, dp.budget, delta, dp.budget_name)
            return Message(Error(code=BUDGET_EXHAUSTED, reason=reason), reply_to=msg)
    steps_before = sum(n for *_, n in state.history)
    result = train_private_round(
        model, data, plan, state.history, device, config.lr, config.momentum, dp.grad_sample_mode, proximal_mu
    )
    state.record_round(server_round, result.history, plan, dp.target_epsilon)
    store.save(state)  # durable before the update leaves this node
    spend = ClientSpend(
        client_id=client_id,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=sum(n for *_, n in result.history) - steps_before,
        history=result.history,
        epsilon=epsilon(result.history, delta, dp.accountant),
        delta=delta,
        accountant=dp.accountant,
        max_grad_norm=plan.max_grad_norm,
        batch_size=plan.batch_size,
        local_epochs=plan.local_epochs,
        n_examples=plan.n_examples,
        grad_sample_mode=result.grad_sample_mode,
        budget=dp.budget,
    )
    return PrivateOutcome(result.state_dict, result.train_loss, {PRIVACY: spend.to_record()})
