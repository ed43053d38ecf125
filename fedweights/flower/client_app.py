"""The fedweights ClientApp: trains the global model on the node's own data and evaluates it.

Replies carry ``arrays`` (the locally trained weights; with ``--he`` an encrypted, example-weighted
update, see ``encryption.py``) and ``metrics`` with ``num-examples`` (the aggregation weight) plus
``train_loss`` (withheld under ``--dp``: it is not noised) or ``eval_loss``/``eval_accuracy``. A query
message is answered with ``num-examples``, or with the node's client id when it asks for its identity
(the DP ledger's question).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from .. import attacks
from ..proximal import PROXIMAL_MU_KEY, local_criterion
from ..task import ClientData
from ..training import evaluate, make_optimizer, select_device, train_epochs, train_loader
from .encryption import plaintext_global, received_state, reply_arrays
from .runtime import NODE_DATA, NODE_DEVICE, Runtime, node_partition, runtime_from_context

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"


def build_client_app(runtime_fn: Callable[[Context], Runtime] = runtime_from_context) -> ClientApp:
    """A ClientApp whose run settings come from ``runtime_fn(context)``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_reply(msg, context, runtime_fn(context))

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return evaluate_reply(msg, context, runtime_fn(context))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return query_reply(msg, context, runtime_fn(context))

    return app


def train_reply(msg: Message, context: Context, runtime: Runtime) -> Message:
    """Train the received global model locally and reply with the new weights."""
    config = runtime.config
    server_round = int(msg.content[CONFIG].get("server-round", 0))
    pid, num = node_partition(context, config)
    data = _client_data(runtime, pid, num, _node_data_path(context))
    device = select_device(_node_device(context, config))
    model = _model_from(msg, context, runtime)
    seed = config.seed * 100_003 + server_round * 1_009 + pid
    train_data = attacks.poison_labels(config.attack, pid, data.train, runtime.task().train_data)
    proximal_mu = float(msg.content[CONFIG].get(PROXIMAL_MU_KEY, 0.0))  # FedProx
    privacy = {}
    if config.dp.enabled:  # Opacus DP-SGD, accountant and budget: fedweights.privacy.client
        from ..privacy.client import train_privately

        outcome = train_privately(msg, context, runtime, model, train_data, device, proximal_mu)
        if isinstance(outcome, Message):  # the privacy budget forbids this round: no training
            return outcome
        trained, loss, privacy = outcome.state_dict, outcome.train_loss, outcome.records
    else:
        generator = torch.Generator().manual_seed(seed)
        loader = train_loader(train_data, config.batch_size, model, generator)
        optimizer = make_optimizer(model, config.lr, config.momentum)
        loss = train_epochs(model, loader, optimizer, config.local_epochs, device, local_criterion(model, proximal_mu))
        trained = model.cpu().state_dict()
    start = plaintext_global(msg, context, runtime, model)  # the received model (decrypted under --he)
    state = attacks.tamper_update(config.attack, pid, start, trained, seed)
    content = RecordDict(
        {
            ARRAYS: reply_arrays(state, len(data.train), msg, context, runtime, model),  # encrypted under --he
            METRICS: MetricRecord(train_metrics(loss, len(data.train), config.dp.enabled)),
            **privacy,
        }
    )
    return Message(content, reply_to=msg)


def train_metrics(loss: float, num_examples: int, private: bool) -> dict[str, float | int]:
    """A train reply's metrics. Under DP-SGD the training loss is withheld: it is computed on the raw
    training records without noise, so sending it would release what the client's ε does not cover."""
    return {NUM_EXAMPLES: num_examples} if private else {"train_loss": loss, NUM_EXAMPLES: num_examples}


def evaluate_reply(msg: Message, context: Context, runtime: Runtime) -> Message:
    """Evaluate the received global model on this node's test shard."""
    config = runtime.config
    pid, num = node_partition(context, config)
    data = _client_data(runtime, pid, num, _node_data_path(context))
    model = _model_from(msg, context, runtime)
    device = select_device(_node_device(context, config))
    loss, accuracy, count = evaluate(model, DataLoader(data.test, batch_size=256), device)
    if count == 0:  # more clients than test examples: this node has nothing to evaluate
        loss, accuracy = 0.0, 0.0
    metrics = MetricRecord({"eval_loss": loss, "eval_accuracy": accuracy, NUM_EXAMPLES: count})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def query_reply(msg: Message, context: Context, runtime: Runtime) -> Message:
    """Answer the coordinator's question about this node: the client id it trains under (DP ledgers),
    or its number of training examples."""
    from ..privacy.protocol import IDENTIFY, identity_answer

    if IDENTIFY in msg.content:
        from ..privacy.client import client_id_of

        return Message(identity_answer(client_id_of(context)), reply_to=msg)
    pid, num = node_partition(context, runtime.config)
    metrics = MetricRecord({NUM_EXAMPLES: len(_client_data(runtime, pid, num, _node_data_path(context)).train)})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def _model_from(msg: Message, context: Context, runtime: Runtime) -> torch.nn.Module:
    model = runtime.task().model_fn()
    model.load_state_dict(received_state(msg, context, runtime, model))  # decrypts under --he
    return model


@lru_cache(maxsize=8)
def _client_data(runtime: Runtime, partition_id: int, num_partitions: int, data_path: str | None = None) -> ClientData:
    if data_path:  # `fedweights client --data FILE.npz`: the node brings its own examples
        from ..data.node_data import check_fits_model, load_node_data

        train, test = load_node_data(data_path)
        check_fits_model(data_path, train, runtime.task().model_fn())
        return ClientData(train, test)
    return runtime.task().client_data(partition_id, num_partitions, runtime.config)


def _node_data_path(context: Context) -> str | None:
    return str(context.node_config[NODE_DATA]) if context.node_config.get(NODE_DATA) else None


def _node_device(context: Context, config) -> str:
    """The node's ``--device`` (node config) wins over the run config's ``device``."""
    return str(context.node_config.get(NODE_DEVICE) or config.device)


app = build_client_app()
