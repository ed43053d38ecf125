"""What a DP client tells the coordinator about its privacy spend, in a train reply, and what the
coordinator tells a client it recognises about its account (:data:`LEDGER_ACCOUNT`, in the train
message: the history its ledger holds, so a client that lost its accountant state resumes from it).
A node the coordinator does not recognise (a Flower node id its ledger never saw) is first asked
its client id in a query message (:data:`IDENTIFY`; the reply holds :data:`IDENTITY`).

A trained reply carries a ``ConfigRecord`` under :data:`PRIVACY` next to its arrays and metrics
(the keys of :class:`ClientSpend`). A client whose next round would exceed its budget does not
train: it replies with a Flower error of code :data:`BUDGET_EXHAUSTED` and a reason made by
:func:`exhausted_reason`, which the coordinator parses back with :func:`parse_exhausted_reason`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields

from flwr.app import ConfigRecord, Message, RecordDict

from .accounting import Entry, as_entries
from .ledger import format_epsilon

PRIVACY = "privacy"  # RecordDict key of the ConfigRecord holding a ClientSpend
BUDGET_EXHAUSTED = 4030  # Flower Error code: the client's privacy budget does not allow another round
LEDGER_ACCOUNT = "fedweights.ledger-account"  # train-message ConfigRecord: {"client", "history"}
IDENTIFY = "fedweights.identify"  # query-message ConfigRecord: which client id trains on this node?
IDENTITY = "fedweights.identity"  # its reply's ConfigRecord: {"client"}

_EXHAUSTED = re.compile(r"^privacy budget exhausted: client (?P<client>\S+) has spent epsilon=(?P<spent>[0-9.eE+-]+)")


@dataclass
class ClientSpend:
    """One client's accounting facts after a trained round (all it needs to be audited)."""

    client_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int  # steps taken this round
    history: list[Entry]  # the client accountant's full history (all rounds so far)
    epsilon: float  # ε the client computed for ``history`` (the server recomputes it)
    delta: float
    accountant: str
    max_grad_norm: float
    batch_size: int  # configured batch size (Poisson batches average n_examples·sample_rate)
    local_epochs: int
    n_examples: int
    grad_sample_mode: str
    budget: float | None = None  # the client's budget (max_epsilon, else target_epsilon), if any

    def to_record(self) -> ConfigRecord:
        """As a Flower ConfigRecord (history JSON-encoded; no budget key when unlimited)."""
        values = asdict(self)
        values["history"] = _encode(self.history)
        return ConfigRecord({k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> ClientSpend:
        """Parse a reply's ConfigRecord; raises KeyError/ValueError when it is malformed."""
        values = {f.name: record[f.name] for f in fields(cls) if f.name in record}
        values["history"] = _decode(values["history"])
        return cls(**values)


def ledger_account_record(client_id: str, history: list[Entry]) -> ConfigRecord:
    """The coordinator's account of ``client_id`` (its ledger history), for a train message."""
    return ConfigRecord({"client": client_id, "history": _encode(history)})


def identity_question() -> RecordDict:
    """A query message's content asking a node for the client id it trains under."""
    return RecordDict({IDENTIFY: ConfigRecord({})})


def identity_answer(client_id: str) -> RecordDict:
    """A node's reply to :func:`identity_question`."""
    return RecordDict({IDENTITY: ConfigRecord({"client": client_id})})


def identity_of(reply: Message) -> str | None:
    """The client id in a reply to :func:`identity_question` (None: an error, or no answer in it)."""
    if reply.has_error() or IDENTITY not in reply.content.config_records:
        return None
    return str(reply.content.config_records[IDENTITY].get("client", "")) or None


def ledger_history(content: RecordDict, client_id: str) -> list[Entry]:
    """The history the coordinator's ledger holds for ``client_id``, from a train message's content
    (empty when it sent none, or sent another client's)."""
    if LEDGER_ACCOUNT not in content:
        return []
    record = content[LEDGER_ACCOUNT]
    if str(record.get("client", "")) != client_id:
        return []
    return _decode(record["history"])


def exhausted_reason(
    client_id: str, spent: float, next_epsilon: float, budget: float, delta: float, name: str = "max_epsilon"
) -> str:
    """The error reason of a client that refuses to train because of its budget."""
    return (
        f"privacy budget exhausted: client {client_id} has spent epsilon={format_epsilon(spent, 6)} (delta={delta:g}); "
        f"one more round would reach epsilon={format_epsilon(next_epsilon, 6)} > {name}={budget:g}. "
        "It no longer trains in this run."
    )


def parse_exhausted_reason(reason: str | None) -> tuple[str, float] | None:
    """(client id, ε spent) from an :func:`exhausted_reason`, or None for other reasons."""
    match = _EXHAUSTED.match(reason or "")
    return (match["client"], float(match["spent"])) if match else None


def _encode(history: list[Entry]) -> str:
    return json.dumps([list(e) for e in history])  # a ConfigRecord holds no nested lists


def _decode(text: str) -> list[Entry]:
    return as_entries(json.loads(str(text)))
