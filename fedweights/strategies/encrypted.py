"""FedAvg over homomorphically encrypted updates: the coordinator adds ciphertexts, never decrypts.

Each round:

1. ``configure_train`` samples nodes like FedAvg. Nodes whose example count it does not know yet
   are asked once (a ``query`` message); the round's public weight normaliser N is the sum of the
   sampled nodes' counts and goes out in the train config (``he-normaliser``).
2. Clients reply with ``Enc(round(2^F · n_k/N · w_k))`` (see ``fedweights.crypto.codec``).
3. ``aggregate_train`` checks every update (key fingerprint, kind, round, layout, sizes, chunk
   digests, ciphertext validity, range and noise budget) and adds the good ones into one running
   ciphertext sum. A bad update is rejected with a logged reason; the round goes on without it.
   The result is the encrypted sum plus the total weight, which clients decrypt and divide.

The strategy only ever holds the server context (no secret key); ``rejected[round]`` tells the
round loop which nodes or updates it refused and why (see ``strategies.rejected_updates``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..config import RunConfig
from ..crypto.aggregate import EncryptedSum, RoundExpectation
from ..crypto.codec import check_key, layout_of
from ..crypto.envelope import EnvelopeError, TensorInfo, is_encrypted, layout_from_proto, read_header
from ..crypto.keys import HEKey, load_server_key
from ..errors import ConfigError, RunFailed, UserError
from ..flower.encrypted_state import extend_layout, section_of
from ..proto import update_pb2 as pb
from ..proximal import PROXIMAL_MU_KEY
from .registry import sampling_options
from .validation import screen_evaluation

log = logging.getLogger("fedweights.he")

NORMALISER = "he-normaliser"  # train-config key (the ClientApp reads it)
NOISE_ONLY = "user-dp-noise-only"  # train-config key: send only a DP noise share, not an update
COUNT_QUERY = "fedweights.count"  # query-config key asking a node for its number of training examples


class EncryptedFedAvg(FedAvg):
    """FedAvg whose ``aggregate_train`` sums encrypted updates with the server context only.

    Parameters
    ----------
    key : HEKey
        The coordinator's context (``server.ctx``); one holding a secret key is refused.
    query_timeout : float
        Seconds to wait for nodes to report their example counts.
    train_config : dict, optional
        Extra entries for every train config (FedProx's ``proximal-mu``).
    state_section : str, optional
        Server state the payloads carry next to the model (``"momentum"`` for FedAvgM), see
        ``fedweights.flower.encrypted_state``; the coordinator only checks its layout and adds it.
    **fedavg_kwargs
        Sampling settings passed to ``FedAvg`` (``fraction_train``, ``min_train_nodes``, …).
    """

    linear_in_updates = True
    # the layout is learnt again from the global model each round; the rest lives within one round
    checkpoint_exclude = ("layout", "rejected", "rejected_evaluation", "_expect", "_planned", "_round")

    def __init__(
        self,
        key: HEKey,
        query_timeout: float = 600.0,
        train_config: dict | None = None,
        state_section: str | None = None,
        max_examples: int | None = None,
        **fedavg_kwargs,
    ) -> None:
        if key.is_secret:
            raise UserError("the encrypted strategy got a secret context; the coordinator must only hold server.ctx")
        super().__init__(**fedavg_kwargs)
        self.key = key
        self.query_timeout = query_timeout
        self.train_config = dict(train_config or {})  # extra train-config entries (e.g. FedProx's mu)
        self.state_section = state_section
        self.max_examples = max_examples
        self.counts: dict[int, int] = {}  # node id → the example count it last reported
        self.layout: tuple[TensorInfo, ...] | None = None
        self.rejected: dict[int, list[dict[str, str]]] = {}  # round → refused nodes/updates, with reasons
        self.rejected_evaluation: dict[int, list[dict[str, str]]] = {}  # round → refused evaluation replies
        self._expect: RoundExpectation | None = None
        self._planned: dict[int, int] = {}  # node id → count this round's normaliser assumes
        self._round = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, learn unknown example counts, announce the weight normaliser."""
        self._begin_round(server_round, arrays)
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
        self._check_summands(server_round, len(node_ids), "fraction_train")
        self._query_counts(grid, [n for n in node_ids if n not in self.counts])
        node_ids = [n for n in node_ids if n in self.counts]
        if len(node_ids) < max(1, self.min_train_nodes):
            raise RunFailed(
                f"round {server_round}: only {len(node_ids)} sampled node(s) reported their example counts, "
                f"at least {max(1, self.min_train_nodes)} needed. Failures: "
                + "; ".join(f"node {r['node']}: {r['reason']}" for r in self.rejected[server_round])
            )
        for key, value in self.train_config.items():
            config[key] = value
        return self._train_messages(server_round, arrays, config, {n: self.counts[n] for n in node_ids})

    def _begin_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """Reset the round's bookkeeping and learn the model layout."""
        self._round = server_round
        self.rejected[server_round] = []
        self._learn_layout(arrays)

    def _check_summands(self, server_round: int, sampled: int, setting: str) -> None:
        """Refuse a round with more updates than the HE parameters can add without overflow."""
        if sampled > self.key.params.max_summands:
            raise RunFailed(
                f"round {server_round} samples {sampled} clients but these HE parameters can sum at most "
                f"{self.key.params.max_summands} updates; lower {setting} or make keys with a larger first prime"
            )

    def _train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, planned: dict[int, int]
    ) -> Iterable[Message]:
        """Train messages to the ``planned`` nodes (node → weight), announcing the weight normaliser."""
        self._planned = planned
        normaliser = max(1, sum(planned.values()))
        self._expect = RoundExpectation(server_round, self.layout, normaliser)
        config["server-round"] = server_round
        config[NORMALISER] = normaliser
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, list(planned), MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each update and add it into one ciphertext sum; never decrypts."""
        if self._expect is None or self._expect.server_round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for that round")
        total = EncryptedSum(self.key, self._expect)
        accepted: list[RecordDict] = []
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            try:
                header = self._check_reply(reply.content)
                if self.max_examples is not None and header.num_examples > self.max_examples:
                    raise EnvelopeError(
                        f"it claims {header.num_examples} examples, more than max_examples {self.max_examples}"
                    )
                if header.num_examples >= 1:  # the count to plan the next round's normaliser with
                    self.counts[node] = header.num_examples
                planned = self._planned.get(node, 0)
                if header.num_examples > planned:
                    raise EnvelopeError(
                        f"range: the node now has {header.num_examples} examples, more than the {planned} this "
                        "round's normaliser was planned with; it is weighted by its new count from the next round"
                    )
                total.add(reply.content.array_records[self.arrayrecord_key])
            except EnvelopeError as exc:
                self._reject(node, f"update rejected: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - untrusted bytes; the sum is unchanged (EncryptedSum.add)
                log.exception("round %d: node %s: unreadable update", server_round, node)
                self._reject(node, f"update rejected: unreadable update ({type(exc).__name__}: {exc})")
                continue
            accepted.append(reply.content)
        rejected = len(self.rejected[server_round])
        log.info("round %d: summed %d encrypted update(s), %d node(s) refused", server_round, len(accepted), rejected)
        metrics = self.train_metrics_aggr_fn(accepted, self.weighted_by_key) if accepted else None
        return total.result(), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's average of the evaluation replies that pass the plaintext path's checks (the
        metrics are plaintext under --he too): one bad reply is left out, not fatal to the run."""
        accepted, self.rejected_evaluation[server_round] = screen_evaluation(
            server_round, replies, self.weighted_by_key, self.max_examples
        )
        return super().aggregate_evaluate(server_round, accepted)

    def _check_reply(self, content: RecordDict) -> pb.EncryptedHeader:
        """The header of a reply's update, if it comes from this key pair and agrees with the metrics."""
        if self.arrayrecord_key not in content.array_records or "metrics" not in content.metric_records:
            raise EnvelopeError("reply carries no arrays/metrics record")
        header = read_header(content.array_records[self.arrayrecord_key])
        check_key(header, self.key)
        claimed = content.metric_records["metrics"].get(self.weighted_by_key)
        if claimed != header.num_examples:
            raise EnvelopeError(f"metrics report {claimed} examples, the encrypted header {header.num_examples}")
        return header

    def _learn_layout(self, arrays: ArrayRecord) -> None:
        if is_encrypted(arrays):
            layout = layout_from_proto(read_header(arrays).layout)
        else:  # round 1: the plaintext initial model; the payloads add the state section
            layout = extend_layout(layout_of(arrays.to_torch_state_dict()), self.state_section)
        if self.layout is not None and layout != self.layout:
            raise RunFailed("the global model changed its layout between rounds")
        self.layout = layout

    def _query_counts(self, grid: Grid, node_ids: list[int]) -> None:
        if not node_ids:
            return
        question = RecordDict({self.configrecord_key: ConfigRecord({COUNT_QUERY: 1})})
        messages = [Message(question, message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
        answered = set()
        for reply in grid.send_and_receive(messages, timeout=self.query_timeout):
            node = reply.metadata.src_node_id
            answered.add(node)
            count = None
            if not reply.has_error() and "metrics" in reply.content.metric_records:
                count = reply.content.metric_records["metrics"].get(self.weighted_by_key)
            if not (isinstance(count, int) and count >= 1):  # an error reply carries no count
                reason = reply.error.reason if reply.has_error() else f"invalid count {count!r}"
                self._reject(node, f"did not report its example count: {reason}")
            elif self.max_examples is not None and count > self.max_examples:
                self._reject(node, f"reports {count} examples, more than max_examples {self.max_examples}")
            else:
                self.counts[node] = count
        for node in set(node_ids) - answered:
            self._reject(node, "did not report its example count within round_timeout")

    def _reject(self, node: int, reason: str) -> None:
        log.warning("round %d: node %s: %s", self._round, node, reason)
        self.rejected[self._round].append({"node": str(node), "reason": reason})


HE_STRATEGIES = ("fedavg", "fedprox", "fedavgm")


def build_encrypted_strategy(config: RunConfig) -> EncryptedFedAvg:
    """The ``--he`` strategy for a run config: FedAvg, FedProx (its extra is on the clients),
    FedAvgM (its momentum step runs on the clients, the momentum travels encrypted) or, with
    ``user_dp``, DP-FedAvg with distributed noise.

    Needs ``he.server_key`` (the coordinator's server.ctx).
    """
    if not config.he.server_key:
        raise ConfigError(
            "he.server_key",
            "is not set: the coordinator needs server.ctx (`fedweights server --he-server-key DIR/server.ctx`)",
        )
    extra = {PROXIMAL_MU_KEY: config.strategy.proximal_mu} if config.strategy.name == "fedprox" else {}
    key = load_server_key(config.he.server_key)
    if config.user_dp.enabled:
        from .encrypted_user_dp import encrypted_user_dp_strategy

        return encrypted_user_dp_strategy(config, key)
    return EncryptedFedAvg(
        key, query_timeout=config.round_timeout, train_config=extra, state_section=section_of(config),
        max_examples=config.strategy.max_examples, **sampling_options(config),
    )
