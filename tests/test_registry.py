"""The weight registry through its Python API against a real gRPC server: round trips, lineage,
tags, concurrent publishes, deduplication, diffs, and refusal of malformed payloads."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedweights.errors import UserError
from fedweights.proto import registry_pb2 as pb
from fedweights.proto import registry_pb2_grpc as pb_grpc
from fedweights.registry import Client, NotFound
from fedweights.registry.payload import PayloadError

from .registry_support import TOKEN, client, registry, save_model  # noqa: F401 - fixtures


def test_round_trip_of_a_multi_tensor_model(client, tmp_path):
    state = save_model(tmp_path / "model.safetensors")
    pushed = client.push(tmp_path / "model.safetensors", "digits/cnn")
    assert pushed.ref == "digits/cnn:1" and pushed.parent is None

    pulled = client.pull("digits/cnn:1", tmp_path / "out" / "copy.safetensors")
    assert (tmp_path / "out" / "copy.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "out" / "copy.safetensors"))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    manifest = pulled.manifest
    assert pulled.digest == pushed.digest
    assert {t.name: (t.dtype, list(t.shape)) for t in manifest.tensors} == {
        k: ({torch.float32: "F32", torch.int64: "I64"}[v.dtype], list(v.shape)) for k, v in state.items()
    }
    assert manifest.size_bytes == (tmp_path / "model.safetensors").stat().st_size
    assert manifest.publisher == "token" and manifest.created_at.seconds > 0
    assert manifest.privacy.guarantee == pb.PrivacyCertificate.UNKNOWN  # pushed without a run: no claim


def test_lineage_over_three_versions_with_tags(client, tmp_path):
    pushed = []
    for seed, tags in ((1, ["prod"]), (2, []), (3, ["prod", "candidate"])):
        save_model(tmp_path / f"m{seed}.safetensors", seed=seed)
        pushed.append(client.push(tmp_path / f"m{seed}.safetensors", "mlp", tags=tags))
    assert [v.ref for v in pushed] == ["mlp:1", "mlp:2", "mlp:3"]

    log = client.log("mlp")
    assert [v.ref for v in log] == ["mlp:3", "mlp:2", "mlp:1"]
    assert [v.parent for v in log] == ["mlp:2", "mlp:1", None]
    assert [v.manifest.parent_digest for v in log] == [pushed[1].digest, pushed[0].digest, ""]  # the hash chain
    assert [v.ref for v in client.log("mlp:2")] == ["mlp:2", "mlp:1"]  # lineage of one version

    assert client.resolve("mlp@prod").ref == "mlp:3"  # a tag moves to the newest version carrying it
    assert client.resolve("mlp@candidate").ref == "mlp:3"
    assert client.resolve("mlp").ref == client.resolve("mlp@latest").ref == "mlp:3"
    client.pull("mlp:1", tmp_path / "v1.safetensors")
    assert (tmp_path / "v1.safetensors").read_bytes() == (tmp_path / "m1.safetensors").read_bytes()

    fork = client.push(tmp_path / "m2.safetensors", "mlp-finetuned", parent="mlp@prod")
    assert fork.parent == "mlp:3" and [v.ref for v in client.log("mlp-finetuned:1")] == ["mlp-finetuned:1", "mlp:3", "mlp:2", "mlp:1"]
    assert client.push(tmp_path / "m1.safetensors", "mlp", parent="none").parent is None
    [summary] = [m for m in client.list() if m.name == "mlp"]
    assert summary.versions == 4 and summary.latest.ref == "mlp:4"


def test_concurrent_publishes_of_one_name_get_distinct_versions(registry, tmp_path):
    writers = 8
    for i in range(writers):
        save_model(tmp_path / f"w{i}.safetensors", seed=100 + i)
    start, results = threading.Barrier(writers), {}

    def publish(i: int) -> None:
        with Client(registry.address, token=TOKEN) as own:
            start.wait()
            results[i] = own.push(tmp_path / f"w{i}.safetensors", "shared")

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(v.manifest.version for v in results.values()) == list(range(1, writers + 1))
    with Client(registry.address) as reader:
        log = reader.log("shared")  # lineage re-checked client-side
        for i, version in results.items():  # each version holds exactly its writer's payload
            assert reader.verify(tmp_path / f"w{i}.safetensors", version.ref)[1] == []
    assert [v.parent for v in log] == [f"shared:{n - 1}" if n > 1 else None for n in range(writers, 0, -1)]


def test_identical_payloads_are_stored_once(client, registry, tmp_path):
    save_model(tmp_path / "m.safetensors")
    a = client.push(tmp_path / "m.safetensors", "one")
    b = client.push(tmp_path / "m.safetensors", "two")
    assert a.sha256 == b.sha256 and a.digest != b.digest
    blobs = [p for p in (registry.store.root / "blobs").rglob("*") if p.is_file()]
    assert blobs == [registry.store.blob_path(a.sha256)]


def test_diff_reports_per_tensor_l2_and_relative_change(client, tmp_path):
    old = save_model(tmp_path / "a.safetensors", seed=1)
    new = save_model(tmp_path / "b.safetensors", seed=2)
    client.push(tmp_path / "a.safetensors", "d")
    client.push(tmp_path / "b.safetensors", "d")
    changes = {c.name: c for c in client.diff("d:1", "d:2")}
    assert changes.keys() == old.keys()
    for name, change in changes.items():
        if torch.equal(old[name], new[name]):  # e.g. GroupNorm biases, zero in both
            assert (change.status, change.l2_change, change.relative_change) == ("same", 0.0, 0.0)
            continue
        expected = torch.linalg.vector_norm(new[name].double() - old[name].double()).item()
        assert change.status == "changed" and change.l2_change == pytest.approx(expected, rel=1e-9)
        assert change.relative_change == pytest.approx(expected / torch.linalg.vector_norm(old[name].double()).item())
    assert {c.status for c in changes.values()} == {"same", "changed"}
    assert {c.status for c in client.diff("d:1", str(tmp_path / "a.safetensors"))} == {"same"}  # local file vs version
    with pytest.raises(UserError, match="missing.safetensors: no such file"):  # not "invalid model name"
        client.diff("d:1", str(tmp_path / "missing.safetensors"))


def test_bad_input_is_refused_and_nothing_is_stored(client, registry, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(PayloadError, match="not a safetensors file"):
        client.push(tmp_path / "junk.safetensors", "m")
    with pytest.raises(UserError, match="invalid model name"):
        client.push(tmp_path / "junk.safetensors", "bad name")
    save_model(tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="invalid tag"):
        client.push(tmp_path / "m.safetensors", "m", tags=["7"])
    with pytest.raises(NotFound):
        client.push(tmp_path / "m.safetensors", "m", parent="other:3")
    with pytest.raises(NotFound, match="m:9 is not in the registry"):
        client.pull("m:9", tmp_path / "x.safetensors")

    # A raw gRPC client that skips the local checks: the registry validates the stream itself.
    with grpc.insecure_channel(registry.address) as channel:
        stub = pb_grpc.WeightRegistryStub(channel)
        header = pb.PublishRequest(header=pb.PublishHeader(name="m"))
        full = (tmp_path / "m.safetensors").read_bytes()
        for chunks, fragment in (([b"garbage" * 10], "not a safetensors file"), ([full[:-10]], "not a complete safetensors file")):
            with pytest.raises(grpc.RpcError) as info:
                stub.Publish(iter([header, *[pb.PublishRequest(chunk=c) for c in chunks]]), metadata=[("authorization", f"Bearer {TOKEN}")])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()
    assert client.list() == [] and not list((registry.store.root / "tmp").iterdir())
    assert not list(tmp_path.glob(".x.safetensors.*")) and not (tmp_path / "x.safetensors").exists()


def test_a_publish_refused_for_its_parent_leaves_no_trace(client, registry, tmp_path):
    """No orphaned blob (fsck stays clean), and a payload already stored for another version is kept."""
    save_model(tmp_path / "shared.safetensors", seed=1)
    save_model(tmp_path / "fresh.safetensors", seed=2)
    shared = client.push(tmp_path / "shared.safetensors", "t/dp")
    for parent in ("t/dp:99", "t/dp:5000000000", "t/other@prod"):
        with pytest.raises(NotFound, match=f"the parent {parent} is not in the registry"):
            client.push(tmp_path / "fresh.safetensors", "t/fresh", parent=parent)

    # A raw gRPC client that skips the client's own parent lookup: the registry checks it first.
    with grpc.insecure_channel(registry.address) as channel:
        stub = pb_grpc.WeightRegistryStub(channel)
        for payload in ("fresh", "shared"):  # a new payload, and one deduplicated with t/dp:1
            header = pb.PublishHeader(name="t/fresh", parent=pb.ModelRef(name="t/dp", version=99))
            chunks = [pb.PublishRequest(chunk=(tmp_path / f"{payload}.safetensors").read_bytes())]
            with pytest.raises(grpc.RpcError) as info:
                stub.Publish(iter([pb.PublishRequest(header=header), *chunks]), metadata=[("authorization", f"Bearer {TOKEN}")])
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "the parent t/dp:99 is not in the registry: name an existing version (see `fedweights weights log t/dp`)" in info.value.details()

    assert registry.store.check() == []  # what `fedweights registry fsck` reports
    blobs = [p for p in (registry.store.root / "blobs").rglob("*") if p.is_file()]
    assert blobs == [registry.store.blob_path(shared.sha256)] and not list((registry.store.root / "tmp").iterdir())
    assert [(m.name, m.versions) for m in client.list()] == [("t/dp", 1)]
    client.pull("t/dp:1", tmp_path / "back.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == (tmp_path / "shared.safetensors").read_bytes()


def test_tags_may_be_one_string_or_none(client, tmp_path):
    save_model(tmp_path / "m.safetensors")
    assert list(client.push(tmp_path / "m.safetensors", "m", tags="prod").manifest.tags) == ["prod"]
    assert client.resolve("m@prod").ref == "m:1"
    assert list(client.push(tmp_path / "m.safetensors", "m", tags=None).manifest.tags) == []
    with pytest.raises(UserError, match="tags must be a tag or a list of tags, not 3"):
        client.push(tmp_path / "m.safetensors", "m", tags=3)
    with pytest.raises(UserError, match="invalid tag 7"):
        client.push(tmp_path / "m.safetensors", "m", tags=["ok", 7])
    assert [v.ref for v in client.log("m")] == ["m:2", "m:1"]  # the refused pushes stored nothing


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"round": "3"}, "round must be a whole number from 0 to 2\\*\\*32-1, not '3'"),
        ({"round": -1}, "round must be a whole number"),
        ({"round": True}, "round must be a whole number"),
        ({"run_id": 3}, "run_id must be a string, not 3"),
        ({"privacy": "dp"}, "privacy must be a PrivacyCertificate"),
        ({"parent": 3}, "invalid reference 3"),
        ({"name": 3}, "invalid model name 3"),
        ({"path": None}, "the file to push must be a str or pathlib.Path, not None"),
    ],
)
def test_push_refuses_arguments_of_the_wrong_type(client, tmp_path, arguments, fragment):
    save_model(tmp_path / "m.safetensors")
    with pytest.raises(UserError, match=fragment):
        client.push(**{"path": tmp_path / "m.safetensors", "name": "m", **arguments})
    assert client.list() == []


def test_pull_and_reads_refuse_bad_arguments_before_downloading(client, tmp_path):
    save_model(tmp_path / "m.safetensors")
    client.push(tmp_path / "m.safetensors", "m")
    (tmp_path / "dir").mkdir()
    for ref in ("m:1", "nope:1"):  # refused up front: not even the registry is asked
        with pytest.raises(UserError, match="dir is a directory: give the path of the file to write"):
            client.pull(ref, tmp_path / "dir")
    assert not list((tmp_path / "dir").iterdir())
    with pytest.raises(UserError, match="cannot write .*File exists.*m.safetensors"):
        client.pull("m:1", tmp_path / "m.safetensors" / "copy.safetensors")
    with pytest.raises(UserError, match="chunk_size must be a whole number"):
        client.pull("m:1", tmp_path / "copy.safetensors", chunk_size=-1)
    with pytest.raises(UserError, match="the output file must be a str or pathlib.Path"):
        client.pull("m:1", None)
    for read in (client.resolve, client.log, lambda ref: client.pull(ref, tmp_path / "x.safetensors")):
        with pytest.raises(UserError, match="invalid reference 3"):
            read(3)
    with pytest.raises(UserError, match="the file to verify must be a str or pathlib.Path"):
        client.verify(3, "m:1")
    with pytest.raises(UserError, match="missing.safetensors: no such file"):  # a Path, not only a str
        client.diff("m:1", tmp_path / "missing.safetensors")
    assert client.diff("m:1", tmp_path / "m.safetensors")[0].status == "same"
    assert not (tmp_path / "copy.safetensors").exists() and not (tmp_path / "x.safetensors").exists()
