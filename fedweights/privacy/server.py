"""The coordinator's side of DP: record every client's spend in the ledger before any update is
aggregated, stop the run when budgets leave nothing to train, and write the reports at the end.

ε is recomputed here from each client's reported (σ, q, steps) history with the same accounting
code the clients use, so the ledger does not rest on a client's arithmetic. The history used is
the smallest one covering both what the client reports and what this ledger already saw from it
plus this round's steps, so a client that lost its accountant state is never undercounted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..config import DPConfig
from ..errors import UserError
from ..flower.round_loop import RoundHooks, StopRun
from ..flower.runtime import Runtime
from ..run_dir import RoundRecord, RunDir
from .accounting import Entry, as_entries, covering_history, epsilon
from .ledger import Ledger, as_epsilon, format_epsilon
from .protocol import (
    BUDGET_EXHAUSTED,
    LEDGER_ACCOUNT,
    PRIVACY,
    ClientSpend,
    identity_of,
    identity_question,
    ledger_account_record,
    parse_exhausted_reason,
)
from .report import write_privacy_json, write_reports

log = logging.getLogger("fedweights.privacy")
BUDGET_RTOL = 1e-6  # clients check the same ε computation against the budget: allow float noise only


class PrivacyHooks(RoundHooks):
    """Round-loop hooks of a DP run: the privacy ledger and the privacy reports."""

    def __init__(self, runtime: Runtime, run_dir: RunDir, grid: Grid) -> None:
        self.config = runtime.config
        self.grid = grid  # to ask nodes it does not recognise which client they are
        self.run_path = run_dir.path
        self.run_id = str(run_dir.read_metrics().get("run_id", ""))
        self.ledger = Ledger(run_dir.path)
        self.histories: dict[str, list[Entry]] = {}
        self.last: dict[str, dict[str, Any]] = {}  # latest ledger entry per client
        self.client_of_node: dict[str, str] = {}
        for entry in self.ledger.read():  # a resumed run (same run id) continues its ledger
            self._remember(entry)

    def on_train_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        """Tell each node this ledger recognises (by node id) the history it holds for its client,
        so a client that lost its accountant state checks its budget against the full account.
        While an account has no connected node, nodes never seen before are first asked their client
        id (a node that came back under a new node id, e.g. after a SuperLink lost its database)."""
        self._identify([msg.metadata.dst_node_id for msg in messages])
        for msg in messages:
            client = self.client_of_node.get(str(msg.metadata.dst_node_id))
            if client is not None and self.histories.get(client):
                account = ledger_account_record(client, self.histories[client])
                msg.content = RecordDict({**msg.content, LEDGER_ACCOUNT: account})  # strategies share one content

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> list[dict[str, str]]:
        """Append one ledger line per reply (durable before aggregation); stop when budgets are spent.

        Returns the updates not to use: those of clients whose ε, as the ledger accounts it, is over
        its budget (``max_epsilon``, else ``target_epsilon``) although the client trained (it lost its accountant state, or two nodes
        share its id). Their spend stays in the ledger."""
        records = []
        for reply in replies:
            record = self._record(server_round, reply)
            if record is not None:
                records.append({"run": self.run_id, **record})
                self._remember(record)  # one client id sent twice in a round: the second composes onto the first
        records = _flag_over_budget(_flag_shared_ids(records), self.config.dp.budget)
        self.ledger.append(records)  # durable before any update is used (remembered above)
        over = [r for r in records if r.get("over_budget")]
        usable = sum(not r.has_error() for r in replies) - len(over)
        needed = max(1, min(self.config.min_replies, len(replies)))
        exhausted = [r["client"] for r in records if r["status"] == "exhausted" or r.get("over_budget")]
        if usable < needed and exhausted:
            raise StopRun(
                f"{len(exhausted)} sampled client(s) have spent their privacy budget "
                f"({self.config.dp.budget_name}={self.config.dp.budget:g}: clients {', '.join(sorted(exhausted))}) and "
                f"only {usable} usable update(s) remain, {needed} needed"
            )
        return [{"node": r["node"], "reason": _over_budget_reason(r, self.config.dp)} for r in over]

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        """Keep privacy.json current after every round (e.g. for a model published each round)."""
        if not self.config.user_dp.enabled:  # else the user-level hook, after this one, writes the merged file
            write_privacy_json(self.run_path)

    def on_run_end(self, run_dir: RunDir, arrays: ArrayRecord) -> None:
        """Write privacy.json and report.html (with user-level DP too: the user-level hook does)."""
        if not self.config.user_dp.enabled:
            write_reports(run_dir.path)

    def _identify(self, nodes: list[int]) -> None:
        unknown = [node for node in nodes if str(node) not in self.client_of_node]
        if not unknown:
            return
        connected = {str(node) for node in self.grid.get_node_ids()}
        claimed = {client for node, client in self.client_of_node.items() if node in connected}
        if not set(self.histories) - claimed:  # every account has its node: nothing to look up
            return
        queries = [Message(identity_question(), message_type=MessageType.QUERY, dst_node_id=node) for node in unknown]
        for reply in self.grid.send_and_receive(queries, timeout=self.config.round_timeout):
            client = identity_of(reply)
            if client is not None:
                self.client_of_node[str(reply.metadata.src_node_id)] = client
            else:  # it still trains; the coordinator's budget check covers it (_flag_over_budget)
                reason = reply.error.reason if reply.has_error() else "no client id in its reply"
                log.warning("node %s did not say which client it is (%s)", reply.metadata.src_node_id, reason)

    # ------------------------------------------------------------------ records

    def _record(self, server_round: int, reply: Message) -> dict[str, Any] | None:
        node = str(reply.metadata.src_node_id)
        if reply.has_error():
            parsed = parse_exhausted_reason(reply.error.reason) if reply.error.code == BUDGET_EXHAUSTED else None
            if parsed is None:
                return None  # an ordinary failure: no update, no spend
            client, spent = parsed
            last = self.last.get(client, {})
            return {
                **{k: last.get(k) for k in ("delta", "noise_multiplier", "sample_rate", "n_examples")},
                "round": server_round,
                "client": client,
                "node": node,
                "status": "exhausted",
                "steps": 0,
                "history": [list(e) for e in self.histories.get(client, [])],
                "epsilon": max(as_epsilon(last.get("epsilon", 0.0)), spent),
                "client_epsilon": spent,
                "accountant": self.config.dp.accountant,
                "budget": self.config.dp.budget,
                "reason": reply.error.reason,
            }
        try:
            spend = ClientSpend.from_record(reply.content[PRIVACY])
            previous = self.histories.get(spend.client_id, [])
            this_round = (spend.noise_multiplier, spend.sample_rate, spend.steps)
            history = covering_history(spend.history, [*previous, this_round])
            spent = epsilon(history, spend.delta, self.config.dp.accountant)
        except (KeyError, ValueError, TypeError, UserError) as exc:  # one bad reply never ends the run
            client = self.client_of_node.get(node, f"node-{node}")
            return {
                "round": server_round,
                "client": client,
                "node": node,
                "status": "unaccounted",
                "epsilon": math.inf,
                "accountant": self.config.dp.accountant,
                "reason": f"the reply carried no valid DP accounting ({type(exc).__name__}: {exc}); "
                "treat this client's records as unprotected",
            }
        return {
            "round": server_round,
            "client": spend.client_id,
            "node": node,
            "status": "trained",
            "noise_multiplier": spend.noise_multiplier,
            "sample_rate": spend.sample_rate,
            "steps": spend.steps,
            "history": [list(e) for e in history],
            "epsilon": spent,
            "client_epsilon": spend.epsilon,
            "delta": spend.delta,
            "accountant": self.config.dp.accountant,
            "max_grad_norm": spend.max_grad_norm,
            "batch_size": spend.batch_size,
            "local_epochs": spend.local_epochs,
            "n_examples": spend.n_examples,
            "grad_sample_mode": spend.grad_sample_mode,
            "budget": spend.budget,
        }

    def _remember(self, entry: dict[str, Any]) -> None:
        client = str(entry["client"])
        self.client_of_node[str(entry.get("node"))] = client
        if entry.get("history") is not None:
            self.histories[client] = as_entries(entry["history"])
        self.last[client] = {**self.last.get(client, {}), **{k: v for k, v in entry.items() if v is not None}}


def _flag_shared_ids(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Warn (on the lines and the console) when a client id came from more than one node in the round
    (nodes started with one partition id). Their spends are composed under that id: right when they hold the same
    examples, an over-count otherwise, never an under-count."""
    nodes: dict[str, set[str]] = {}
    for record in records:
        nodes.setdefault(str(record["client"]), set()).add(str(record["node"]))
    for record in records:
        others = sorted(nodes[str(record["client"])] - {str(record["node"])})
        if others:
            record["warning"] = (
                f"client id {record['client']} also came from node(s) {', '.join(others)} this round: nodes "
                "started with one partition id train on the same examples; their spends are composed under this id"
            )
    for client, senders in nodes.items():  # and on the coordinator's console, once per client id
        if len(senders) > 1:
            log.warning(
                "round %s: nodes %s all sent client id %s (started with one partition id?); they train on the same "
                "examples, so their privacy spends are composed under that id — give each node its own partition",
                records[0]["round"], ", ".join(sorted(senders)), client)
    return records


def _flag_over_budget(records: list[dict[str, Any]], budget: float | None) -> list[dict[str, Any]]:
    """Mark lines of clients that sent an update although the ledger puts them over ``budget``
    (the client's own check passed: it lost its accountant state, or shares its id)."""
    if budget is not None:
        for record in records:
            if record["status"] == "trained" and as_epsilon(record["epsilon"]) > budget * (1 + BUDGET_RTOL):
                record["over_budget"] = True
    return records


def _over_budget_reason(record: dict[str, Any], dp: DPConfig) -> str:
    return (
        f"client {record['client']} is over its privacy budget as the ledger accounts it: epsilon="
        f"{format_epsilon(record['epsilon'], 6)} > {dp.budget_name}={dp.budget:g} (its own accountant said "
        f"{format_epsilon(record.get('client_epsilon'), 6)}: it lost its state, or two nodes share its id); "
        "its update is not used"
    )
