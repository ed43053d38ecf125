"""A plain Flower ClientApp: train / evaluate the received MLP on this node's digits partition.

Besides the usual metrics, replies carry wall-clock timestamps (seconds since the epoch) so the
ServerApp can split a round into dispatch, process start-up, work and return.
"""

import time

_MODULE_START = time.time()

import torch  # noqa: E402 - timed: the import cost of every fresh ClientApp process
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from fedweights.config import RunConfig  # noqa: E402
from fedweights.task import builtin_task  # noqa: E402
from fedweights.training import evaluate, make_optimizer, train_epochs  # noqa: E402

IMPORT_S = time.time() - _MODULE_START
CONFIG = RunConfig(clients=2, device="cpu")  # fedweights' defaults: MLP, batch 16, lr 0.1, momentum 0.9, 1 epoch
app = ClientApp()


def _process_start() -> float:
    """When this process started (epoch seconds), from /proc; NaN where /proc is missing."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / 100.0  # USER_HZ: 100 on Linux
    except (OSError, StopIteration, ValueError, IndexError):
        return float("nan")


def _partition(context: Context):
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    return builtin_task(CONFIG).client_data(pid, num, CONFIG)


def _model(msg: Message) -> torch.nn.Module:
    model = builtin_task(CONFIG).model_fn()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def _timings(started: float, **extra: float) -> dict:
    return {"t_process": _process_start(), "t_handler": started, "t_done": time.time(), "import_s": IMPORT_S, **extra}


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    data = _partition(context)
    model = _model(msg)
    server_round = int(msg.content["config"]["server-round"])
    pid = int(context.node_config["partition-id"])  # the same shuffling seed fedweights uses
    generator = torch.Generator().manual_seed(CONFIG.seed * 100_003 + server_round * 1_009 + pid)
    loader = DataLoader(data.train, batch_size=CONFIG.batch_size, shuffle=True, generator=generator)
    work = time.time()
    loss = train_epochs(model, loader, make_optimizer(model, CONFIG.lr, CONFIG.momentum), 1, torch.device("cpu"))
    train_s = time.time() - work
    metrics = {"train_loss": loss, "num-examples": len(data.train), **_timings(started, train_s=train_s)}
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    started = time.time()
    data = _partition(context)
    loss, accuracy, count = evaluate(_model(msg), DataLoader(data.test, batch_size=256), torch.device("cpu"))
    metrics = {"eval_loss": loss, "eval_accuracy": accuracy, "num-examples": count, **_timings(started)}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
