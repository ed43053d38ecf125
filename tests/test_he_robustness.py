"""Hostile or broken encrypted updates against the coordinator's real checks (real SEAL ciphertexts).

Each bad update must be refused with a reason recorded for the round's ``failures`` and leave the
running ciphertext sum exactly as it was: no crash, no silently wrong aggregate.
"""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedweights.crypto import seal_io
from fedweights.crypto.aggregate import EncryptedSum, RoundExpectation
from fedweights.crypto.codec import decrypt_envelope, encrypt_update, layout_of, load_checked, tools
from fedweights.crypto.envelope import EnvelopeError, save_envelope
from fedweights.crypto.keys import load_client_key, load_server_key, make_keys
from fedweights.errors import UserError
from fedweights.flower.encryption import decrypt_model_file
from fedweights.strategies.encrypted import EncryptedFedAvg

from .flower_messages import NodesGrid
from .he_helpers import model_states, rebuild, uncompressed


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    files = make_keys(tmp_path_factory.mktemp("he") / "keys")
    return load_client_key(files.secret), load_server_key(files.server)


def test_a_truncated_ciphertext_is_refused_not_completed_with_stale_bytes(keys):
    """SEAL reads ciphertexts through one scratch file; a cut-short ciphertext must hit its end,
    not be completed by the tail of the (larger) ciphertext read just before it."""
    client, server = keys
    state = model_states(1, seed=11)[0]  # 20,200 values: three ciphertexts
    layout = layout_of(state)
    good = encrypt_update(client, state, 4, 10, server_round=1)

    def raw(cts):  # SEAL's uncompressed form of the first two: legitimate, and loadable
        return [uncompressed(server, cts[0]), uncompressed(server, cts[1]), cts[2]]

    def cut(cts):
        cts = raw(cts)
        cts[1] = cts[1][:-8]
        return cts

    total = EncryptedSum(server, RoundExpectation(1, layout, 10))
    with pytest.raises(EnvelopeError, match="corrupt ciphertext"):
        total.add(rebuild(good, edit_ciphertexts=cut))
    assert total.num_summands == 0 and total.ciphertexts_held == 0
    total.add(rebuild(good, edit_ciphertexts=raw))  # the same bytes uncut are a valid update
    decrypted = decrypt_envelope(client, total.result(), layout)
    assert (decrypted["fc.weight"] - state["fc.weight"]).abs().max() < 1e-6


def _reply(node: int, envelope: ArrayRecord, num_examples: int) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )  # fmt: skip
    content = RecordDict({"arrays": envelope, "metrics": MetricRecord({"num-examples": num_examples})})
    return Message(content=content, metadata=metadata)


def _negated(server, cts, first):
    """``first``, then the negations of ``cts[1:]``: the sum's first ciphertext is added before
    the second one comes out transparent, so the refusal must undo an addition already made."""
    out = [first]
    for data in cts[1:]:
        ct = load_checked(server, data)
        tools(server).evaluator.negate_inplace(ct)
        out.append(seal_io.dump(ct))
    return out


def _ntt(server, cts):
    ct = load_checked(server, cts[0])
    tools(server).evaluator.transform_to_ntt_inplace(ct)
    return [seal_io.dump(ct), *cts[1:]]


def _first(envelope):
    from fedweights.crypto.envelope import chunk_key
    from fedweights.proto import update_pb2 as pb

    return pb.CiphertextChunk.FromString(envelope[chunk_key(0)].data).ciphertexts[0]


def _set(field, value):
    return lambda header: setattr(header, field, value)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown scheme", "unsupported scheme unknown (2)"),
        ("unknown kind", "payload kind unknown (7) is not a client update"),
        ("NTT-form ciphertext", "ciphertext is in NTT form"),
        ("transparent ciphertext", "transparent ciphertext: the values are not encrypted"),
        ("negation of node 1's update", "it would cancel the encryption of the sum"),
    ],
)
def test_a_hostile_update_is_rejected_with_a_reason_and_the_round_sums_the_rest(keys, case, reason):
    """Nodes 1 and 2 send good updates, node 3 drops out, node 4 sends ``case``: the aggregate is the
    example-weighted mean of nodes 1 and 2 alone (weights n_k / (n_1 + n_2), not / N planned)."""
    client, server = keys
    counts = {1: 30, 2: 50, 3: 20, 4: 40}
    states = dict(zip(counts, model_states(4, seed=12)))
    strategy = EncryptedFedAvg(server, min_train_nodes=4, min_available_nodes=4)
    strategy.counts = dict(counts)  # known from earlier rounds: no count query
    initial = ArrayRecord({k: v.clone() for k, v in states[1].items()})
    sent = list(strategy.configure_train(1, initial, ConfigRecord({}), NodesGrid(counts)))
    normaliser = int(sent[0].content["config"]["he-normaliser"])
    assert normaliser == sum(counts.values()) == 140
    updates = {n: encrypt_update(client, states[n], counts[n], normaliser, server_round=1) for n in counts}
    bad = {
        "unknown scheme": lambda: rebuild(updates[4], edit_header=_set("scheme", 2)),
        "unknown kind": lambda: rebuild(updates[4], edit_header=_set("kind", 7)),
        "NTT-form ciphertext": lambda: rebuild(updates[4], edit_ciphertexts=lambda cts: _ntt(server, cts)),
        "transparent ciphertext": lambda: rebuild(
            updates[4], edit_ciphertexts=lambda cts: [uncompressed(server, cts[0], zero_second_polynomial=True), *cts[1:]]
        ),
        "negation of node 1's update": lambda: rebuild(updates[1], edit_ciphertexts=lambda cts: _negated(server, cts, _first(updates[4]))),
    }[case]()
    bad_count = 30 if case.startswith("negation") else 40
    replies = [_reply(1, updates[1], 30), _reply(4, bad, bad_count), _reply(2, updates[2], 50)]

    aggregate, _ = strategy.aggregate_train(1, replies)  # node 3 never replied

    (rejected,) = strategy.rejected[1]
    assert rejected["node"] == "4" and reason in rejected["reason"], rejected
    decrypted = decrypt_envelope(client, aggregate, strategy.layout)
    bound = client.params.error_bound(2, weight_fraction=80 / 140)
    for name in states[1]:
        expected = (30 * states[1][name].double() + 50 * states[2][name].double()) / 80
        error = (decrypted[name].double() - expected).abs()
        assert (error <= bound + expected.abs() * 2.0**-24).all(), name  # + the float32 result's rounding


def test_decrypt_refuses_a_foreign_key_and_a_corrupt_file_with_a_clear_error(keys, tmp_path):
    client, server = keys
    state = {"w": torch.linspace(-1, 1, 50)}
    total = EncryptedSum(server, RoundExpectation(1, layout_of(state), 3))
    total.add(encrypt_update(client, state, 3, 3, server_round=1))
    path = save_envelope(tmp_path / "model.he", total.result())
    assert torch.allclose(decrypt_model_file(path, client.path)["w"], state["w"], atol=1e-6)

    other = make_keys(tmp_path / "other")
    with pytest.raises(UserError, match="cannot decrypt .*encrypted under another key"):
        decrypt_model_file(path, other.secret)  # never garbage weights from the wrong key
    data = bytearray(path.read_bytes())
    name_at = len(b"FWHE1\n") + 10  # the first entry's name
    data[name_at] = 0xFF  # not UTF-8
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="cannot decrypt .*corrupt"):
        decrypt_model_file(path, client.path)


def test_one_bad_evaluation_reply_under_he_is_left_out_not_fatal(keys):
    """Evaluation metrics travel in plaintext under --he too; Flower's FedAvg raised for the whole
    run on a reply with other metric keys, and averaged a NaN accuracy into the round's."""
    strategy = EncryptedFedAvg(keys[1], min_available_nodes=1)

    def evaluation(node: int, **metrics) -> Message:
        values = {"eval_loss": 0.4, "eval_accuracy": 0.9, "num-examples": 10, **metrics}
        metadata = Metadata(run_id=1, message_id=f"e{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                            group_id="1", created_at=time.time(), ttl=60.0, message_type="evaluate")
        return Message(content=RecordDict({"metrics": MetricRecord(values)}), metadata=metadata)

    replies = [evaluation(1, eval_accuracy=float("nan")), evaluation(2, extra=1.0), evaluation(3),
               evaluation(4, eval_accuracy=0.7)]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["eval_accuracy"] == pytest.approx((0.9 + 0.9 + 0.7) / 3)  # node 2 counts, without its extra metric
    assert set(metrics) == {"eval_loss", "eval_accuracy"}
    assert [r["node"] for r in strategy.rejected_evaluation[1]] == ["1"]
    assert all(r["reason"].startswith("evaluation rejected: ") for r in strategy.rejected_evaluation[1])


class CountingGrid(NodesGrid):
    """Nodes that answer the coordinator's example-count query with ``counts``."""

    def __init__(self, counts: dict[int, int]) -> None:
        super().__init__(counts)
        self.counts = counts

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102 - Grid API
        return [
            Message(RecordDict({"metrics": MetricRecord({"num-examples": self.counts[m.metadata.dst_node_id]})}), reply_to=m)
            for m in messages
        ]


def test_max_examples_under_he_refuses_a_node_that_claims_more_in_its_count_or_its_update(keys):
    """The counts are plaintext under --he too (FedAvg's weights): a node claiming more than
    max_examples is left out of the normaliser, and an update whose header claims more is refused."""
    client, server = keys
    counts = {1: 30, 2: 10**9, 3: 40}
    strategy = EncryptedFedAvg(server, max_examples=45, min_train_nodes=2, min_available_nodes=3)
    states = model_states(3, seed=13)
    initial = ArrayRecord({k: v.clone() for k, v in states[0].items()})
    sent = list(strategy.configure_train(1, initial, ConfigRecord({}), CountingGrid(counts)))
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 3]
    assert int(sent[0].content["config"]["he-normaliser"]) == 70  # node 2's claim is not in it
    assert strategy.rejected[1] == [{"node": "2", "reason": "reports 1000000000 examples, more than max_examples 45"}]

    good = encrypt_update(client, states[0], 30, 70, server_round=1)
    inflated = rebuild(encrypt_update(client, states[1], 40, 70, server_round=1), edit_header=_set("num_examples", 46))
    strategy.aggregate_train(1, [_reply(1, good, 30), _reply(3, inflated, 46)])
    assert strategy.rejected[1][1] == {
        "node": "3", "reason": "update rejected: it claims 46 examples, more than max_examples 45"
    }
    assert strategy.counts[3] == 40  # the inflated claim is not learnt for the next round's normaliser
