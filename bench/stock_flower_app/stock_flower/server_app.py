"""A stock Flower ServerApp: flwr's FedAvg, timed per round from the ServerApp's side.

A round spans from ``configure_train`` to the end of ``aggregate_evaluate`` — the same span
fedweights records as ``seconds`` in metrics.json. Per-round timings go to ``timing-file``.
"""

import json
import os
import time

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedweights.config import RunConfig
from fedweights.task import builtin_task

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records when each phase of a round happened and the clients' own timestamps."""

    def __init__(self, timing_file: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.timing_file = timing_file
        self.rounds: dict[int, dict] = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.rounds[server_round] = {"round": server_round, "t_train_sent": time.time()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.rounds[server_round].update(t_train_back=time.time(), train=_client_times(replies))
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        self.rounds[server_round]["t_eval_sent"] = time.time()
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        self.rounds[server_round].update(t_eval_back=time.time(), evaluate=_client_times(replies))
        result = super().aggregate_evaluate(server_round, replies)
        record = self.rounds[server_round]
        record["seconds"] = time.time() - record["t_train_sent"]
        record["eval_accuracy"] = float(result["eval_accuracy"]) if result else None
        if self.timing_file:
            tmp = f"{self.timing_file}.tmp"
            with open(tmp, "w") as out:
                json.dump(list(self.rounds.values()), out, indent=1)
            os.replace(tmp, self.timing_file)
        return result


def _client_times(replies) -> list[dict]:
    keys = ("t_process", "t_handler", "t_done", "import_s", "train_s")
    return [
        {k: float(r.content["metrics"][k]) for k in keys if k in r.content["metrics"]}
        for r in replies
        if not r.has_error()
    ]


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig(clients=int(context.run_config["num-partitions"]), device="cpu")
    torch.manual_seed(config.seed)
    model = builtin_task(config).model_fn()
    n = config.clients
    strategy = TimedFedAvg(
        str(context.run_config["timing-file"]),
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n,
    )  # fmt: skip
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                   num_rounds=int(context.run_config["num-server-rounds"]))  # fmt: skip
