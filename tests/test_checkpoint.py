"""Checkpoints after every round and resuming a run from them, on the real round loop, strategies
and ClientApp code (``LocalGrid``: nodes in this process, no Ray)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import load_file

from fedweights.config import DPConfig, HEConfig, RunConfig, StrategyConfig
from fedweights.crypto.keys import make_keys
from fedweights.errors import ConfigError, RunFailed
from fedweights.flower import checkpoint as ckpt
from fedweights.flower.checkpoint import CheckpointError, load_checkpoint, resume_config, write_checkpoint
from fedweights.flower.encryption import decrypt_model_file, is_encrypted
from fedweights.flower.round_loop import run_federation
from fedweights.flower.runtime import Runtime
from fedweights.flower.strategy_state import StrategyState
from fedweights.privacy.ledger import Ledger
from fedweights.progress import RichReporter
from fedweights.run_dir import RunDir
from fedweights.strategies import build_strategy
from fedweights.strategies.validation import ValidatedStrategy
from fedweights.task import builtin_task

from .conftest import REPO
from .local_grid import LocalGrid, node_configs


pytestmark = pytest.mark.usefixtures("serverapp_process")


def federate(config: RunConfig, nodes: int = 2) -> RunDir:
    run_federation(LocalGrid(Runtime(config), node_configs(nodes)), Runtime(config), reporter=RichReporter())
    return RunDir(config.out)


def fedavgm(out, rounds: int, **overrides) -> RunConfig:
    return RunConfig(clients=2, rounds=rounds, seed=1, out=str(out), strategy=StrategyConfig(name="fedavgm"), **overrides)


def test_checkpoint_holds_model_strategy_state_rng_and_run_id(tmp_path):
    config = fedavgm(tmp_path / "run", rounds=2)
    run_dir = federate(config)
    checkpoint = load_checkpoint(run_dir.path)
    metrics = run_dir.read_metrics()
    assert checkpoint.round == 2 and checkpoint.run_id == metrics["run_id"]
    final = run_dir.load_model()
    assert list(checkpoint.arrays) == list(builtin_task(config).model_fn().state_dict())  # in the model's order
    for name, tensor in final.items():
        assert torch.equal(torch.from_numpy(checkpoint.arrays[name].numpy()), tensor)
    inner = checkpoint.strategy_tree["strategy.strategy"]["attributes"]  # FedAvgM inside update validation
    assert set(inner) == {"current_arrays", "momentum_vector"}  # the settings themselves are not state
    momentum = [checkpoint.strategy_blobs[entry["$ndarray"]] for entry in inner["momentum_vector"]["$list"]]
    assert len(momentum) == len(final) and any(np.abs(m).sum() > 0 for m in momentum)
    assert checkpoint.random_state[1] == random.getstate()[1]  # where Flower's node sampling stands
    # Only the latest round is kept on disk.
    assert sorted(p.name.rsplit("-", 1)[0] for p in (run_dir.path / "checkpoint").iterdir()) == ["manifest.json", "round-000002"]


def test_resumed_fedavgm_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = federate(fedavgm(tmp_path / "whole", rounds=4))
    part = federate(fedavgm(tmp_path / "part", rounds=2))
    run_id = part.read_metrics()["run_id"]
    resumed = federate(resume_config(part.path, {"rounds": 4}))
    metrics = resumed.read_metrics()
    assert metrics["status"] == "completed" and metrics["run_id"] == run_id
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3, 4]
    assert metrics["resumes"][0]["after_round"] == 2 and metrics["config"]["rounds"] == 4
    assert [r["eval_loss"] for r in metrics["rounds"]] == [r["eval_loss"] for r in whole.read_metrics()["rounds"]]
    expected = whole.load_model()
    for name, tensor in resumed.load_model().items():
        assert torch.equal(tensor, expected[name]), name

    # Negative control: without the momentum buffer restored, rounds 3-4 come out differently.
    lost = federate(fedavgm(tmp_path / "lost", rounds=2))
    monkeypatch.setattr(StrategyState, "restore", lambda self, tree, blobs: None)
    federate(resume_config(lost.path, {"rounds": 4}))
    assert not all(torch.equal(t, expected[k]) for k, t in lost.load_model().items())


def test_fedadam_moments_survive_a_checkpoint(tmp_path):
    config = RunConfig(clients=2, rounds=1, seed=1, out=str(tmp_path / "run"), strategy=StrategyConfig(name="fedadam"))
    federate(config)
    checkpoint = load_checkpoint(config.out)
    restored = build_strategy(config)
    StrategyState(restored).restore(checkpoint.strategy_tree, checkpoint.strategy_blobs)
    adam = restored.strategy
    model = RunDir(config.out).load_model()
    assert set(adam.m_t) == set(adam.v_t) == set(model)
    assert all(adam.m_t[k].shape == tuple(model[k].shape) for k in model)
    assert any(np.abs(v).sum() > 0 for v in adam.v_t.values())


def _saved(run_dir: RunDir) -> tuple[dict, dict]:
    manifest = json.loads((run_dir.path / "checkpoint" / "manifest.json").read_text())
    return manifest, {k: t.clone() for k, t in run_dir.load_model().items()}


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run_dir = federate(fedavgm(tmp_path / "run", rounds=1))
    manifest, model = _saved(run_dir)
    strategy = build_strategy(fedavgm(tmp_path / "run", rounds=1))
    newer = ArrayRecord({k: t + 1 for k, t in model.items()})

    def crash(*_args, **_kwargs):
        raise OSError("disk died")  # the process dies right before the manifest swap

    monkeypatch.setattr(ckpt, "atomic_write_json", lambda path, obj: crash() if path.name == "manifest.json" else None)
    with pytest.raises(OSError, match="disk died"):
        write_checkpoint(run_dir.path, manifest["run_id"], 2, newer, StrategyState(strategy))
    monkeypatch.undo()
    assert list((run_dir.path / "checkpoint").glob("round-000002-*"))  # a half-written round…
    checkpoint = load_checkpoint(run_dir.path)  # …is ignored: round 1 is intact
    assert checkpoint.round == 1
    assert all(np.array_equal(checkpoint.arrays[k].numpy(), t.numpy()) for k, t in model.items())
    write_checkpoint(run_dir.path, manifest["run_id"], 2, newer, StrategyState(strategy))
    assert load_checkpoint(run_dir.path).round == 2
    assert sorted(p.name.rsplit("-", 1)[0] for p in (run_dir.path / "checkpoint").iterdir()) == ["manifest.json", "round-000002"]


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not a fedweights run directory"):
        resume_config(tmp_path)
    run_dir = federate(fedavgm(tmp_path / "run", rounds=1))
    with pytest.raises(CheckpointError, match=r"already completed all 1 round\(s\).*--rounds"):
        federate(resume_config(run_dir.path))
    state = next((run_dir.path / "checkpoint").glob("round-*")) / "strategy.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged: .*strategy.safetensors.*SHA-256"):
        federate(resume_config(run_dir.path, {"rounds": 3}))
    (run_dir.path / "checkpoint" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        federate(resume_config(run_dir.path, {"rounds": 3}))
    assert run_dir.read_metrics()["status"] == "completed"  # a refused resume leaves the run as it was


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        ({"clients": 3}, "clients", "cannot change when resuming"),
        ({"strategy.name": "fedavg"}, "strategy.name", "cannot change when resuming"),
        ({"dp.enabled": True}, "dp.enabled", "cannot change when resuming"),
        ({"he.enabled": True}, "he.enabled", "cannot change when resuming"),
        ({"round_retries": -1}, "round_retries", "between 0 and"),
        ({"on_round_timeout": "wait"}, "on_round_timeout", "must be one of 'stop', 'retry'"),
    ],
)
def test_resume_refuses_changes_that_make_another_run(tmp_path, overrides, key, message):
    run = tmp_path / "run"
    run.mkdir()
    RunDir(run).start(fedavgm(run, rounds=2), run_id="r1")
    with pytest.raises(ConfigError, match=message) as info:
        resume_config(run, overrides)
    assert info.value.key == key


def test_resume_allows_more_rounds_and_operational_keys_but_not_with_a_target_epsilon(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    RunDir(run).start(fedavgm(run, rounds=2), run_id="r1")
    config = resume_config(run, {"rounds": 6, "round-timeout": 30, "on_round_timeout": "retry", "min_clients": 1})
    assert config.resume and config.out == str(run) and config.rounds == 6 and config.round_timeout == 30
    assert config.strategy.name == "fedavgm" and config.seed == 1  # the rest comes from the run
    RunDir(run).start(fedavgm(run, rounds=2, dp=DPConfig(enabled=True, target_epsilon=5.0)), run_id="r2")
    with pytest.raises(ConfigError, match="noise was calibrated for rounds=2"):
        resume_config(run, {"rounds": 6})
    with pytest.raises(ConfigError, match="'resume' needs out"):
        RunConfig(resume=True).validate()


CRASH_SCRIPT = """
import json, os, signal, sys
from fedweights.config import RunConfig
from fedweights.flower.round_loop import RoundHooks, run_federation
from fedweights.flower.runtime import Runtime
from fedweights.progress import RichReporter
from tests.local_grid import LocalGrid, act_as_serverapp_process, node_configs

class KillNine(RoundHooks):
    def on_train_replies(self, server_round, replies):  # runs after the ledger recorded the spend
        if server_round == 2:
            os.kill(os.getpid(), signal.SIGKILL)

act_as_serverapp_process()
config = RunConfig.from_flat(json.loads(sys.argv[1]))
run_federation(LocalGrid(Runtime(config), node_configs(2)), Runtime(config), RichReporter(), hooks=[KillNine()])
"""


def test_kill_nine_mid_round_with_dp_then_resume_keeps_a_continuous_ledger(tmp_path):
    dp = DPConfig(enabled=True, noise_multiplier=1.0, accountant="rdp")  # rdp: the faster accountant
    config = RunConfig(clients=2, rounds=2, seed=2, out=str(tmp_path / "run"), dp=dp)
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, json.dumps(config.to_flat())], cwd=REPO, capture_output=True, timeout=120
    )
    assert crashed.returncode == -9, crashed.stderr.decode()[-2000:]
    run_dir = RunDir(config.out)
    assert run_dir.read_metrics()["status"] == "running"  # killed: nobody marked it
    assert load_checkpoint(run_dir.path).round == 1
    before = Ledger(run_dir.path).read()
    assert sorted({e["round"] for e in before}) == [1, 2]  # round 2's spend is recorded, its update never used

    federate(resume_config(run_dir.path))
    metrics = run_dir.read_metrics()
    assert metrics["status"] == "completed" and [r["round"] for r in metrics["rounds"]] == [1, 2]
    ledger = Ledger(run_dir.path).read()  # raises if the hash chain broke
    assert ledger[: len(before)] == before and {e["run"] for e in ledger} == {metrics["run_id"]}
    assert [e["round"] for e in ledger] == [1, 1, 2, 2, 2, 2]  # round 2 ran again: its spend counts twice
    for client in ("0", "1"):
        spent = [float(e["epsilon"]) for e in ledger if e["client"] == client]
        assert spent == sorted(spent) and len(spent) == 3  # never reset, never undercounted
    privacy = json.loads((run_dir.path / "privacy.json").read_text())
    for client in ("0", "1"):  # the report at the end covers every round, before and after the crash
        last = [float(e["epsilon"]) for e in ledger if e["client"] == client][-1]
        assert float(privacy["clients"][client]["epsilon"]) >= last or math.isclose(privacy["clients"][client]["epsilon"], last)


class Counter(FedAvg):
    """A custom strategy keeping state in an object checkpoints cannot hold."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen = object()

    def aggregate_train(self, server_round, replies):  # noqa: D102
        self.seen = object()
        return super().aggregate_train(server_round, replies)


class CounterWithState(Counter):
    """The same, with state_dict()/load_state_dict()."""

    def state_dict(self) -> dict:  # noqa: D102
        return {"rounds": 3, "norms": np.arange(4.0)}

    def load_state_dict(self, state: dict) -> None:  # noqa: D102
        self.loaded = state


def test_custom_strategy_state_is_captured_through_state_dict_or_refused():
    plain = Counter()
    state = StrategyState(plain)
    plain.aggregate_train(1, [])
    _, _, uncaptured = state.capture()
    assert uncaptured == ["Counter.seen (object)"]

    tree, blobs, uncaptured = StrategyState(CounterWithState()).capture()
    assert uncaptured == []
    fresh = CounterWithState()
    StrategyState(fresh).restore(tree, blobs)
    assert fresh.loaded["rounds"] == 3 and np.array_equal(fresh.loaded["norms"], np.arange(4.0))


class Sampler(FedAvg):
    """A custom strategy with the state users keep: sets, counters, defaultdicts and random streams."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen, self.frozen = set(), frozenset()
        self.counts = collections.defaultdict(int)
        self.votes, self.order = collections.Counter(), collections.OrderedDict()
        self.rng, self.pyrng = np.random.default_rng(0), random.Random(0)
        self.legacy, self.mt = np.random.RandomState(0), np.random.Generator(np.random.MT19937(0))
        self.notes = collections.defaultdict(lambda: "none")  # its factory cannot be saved
        self.log = Note()

    def aggregate_train(self, server_round, replies):  # noqa: D102
        self.seen.add(server_round)
        self.frozen |= {str(server_round)}
        self.counts["rounds"] += 1
        self.votes["a"] += 2
        self.order["r"] = server_round
        self.draws = [self.rng.random(), self.pyrng.random(), self.legacy.rand(), self.mt.random()]
        return super().aggregate_train(server_round, replies)


class Note:
    """A plain object, changed in place."""

    def __init__(self) -> None:
        self.lines: list[str] = []


def test_sets_counters_defaultdicts_and_random_streams_survive_a_checkpoint():
    strategy = Sampler()
    state = StrategyState(strategy)
    strategy.aggregate_train(1, [])
    _, _, uncaptured = state.capture()
    assert uncaptured == []  # the lambda defaultdict and the object are unchanged so far
    strategy.notes["x"], _ = "y", strategy.log.lines.append("changed in place, same object")
    tree, blobs, uncaptured = state.capture()
    assert uncaptured == ["Sampler.notes (defaultdict)", "Sampler.log (Note)"]

    fresh = Sampler()
    StrategyState(fresh).restore(json.loads(json.dumps(tree)), blobs)  # the tree is JSON on disk
    assert (fresh.seen, fresh.frozen, fresh.counts, fresh.votes) == ({1}, frozenset({"1"}), {"rounds": 1}, {"a": 2})
    assert type(fresh.counts) is collections.defaultdict and fresh.counts["new"] == 0  # its factory is back
    assert type(fresh.votes) is collections.Counter and type(fresh.order) is collections.OrderedDict
    strategy.aggregate_train(2, [])
    fresh.aggregate_train(2, [])
    assert fresh.draws == strategy.draws  # each stream continues where it was, not from its seed


class DropsABiasInRound2(FedAvg):
    """A user strategy with a bug: its round-2 model lacks a tensor."""

    def aggregate_train(self, server_round, replies):  # noqa: D102
        arrays, metrics = super().aggregate_train(server_round, replies)
        keys = list(arrays)[:-1] if server_round == 2 else list(arrays)
        return ArrayRecord({k: arrays[k] for k in keys}), metrics


def test_a_malformed_model_from_a_strategy_is_never_checkpointed(tmp_path):
    config = RunConfig(clients=2, rounds=3, out=str(tmp_path / "run"),
                       strategy=StrategyConfig(name="tests.test_checkpoint:DropsABiasInRound2"))
    with pytest.raises(RunFailed, match=r"round 2: DropsABiasInRound2.aggregate_train returned a new global model unlike"):
        federate(config)
    checkpoint = load_checkpoint(config.out)  # round 1's, whole: a resume (with the bug fixed) starts from it
    assert checkpoint.round == 1 and list(checkpoint.arrays) == list(builtin_task(config).model_fn().state_dict())
    assert RunDir(config.out).read_metrics()["status"] == "failed"


class Tally(FedAvg):
    """A custom strategy whose state has names fedweights' own strategies use for per-round scratch."""

    checkpoint_exclude = ("scratch",)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rejected: dict[str, int] = {}
        self._round = 0
        self.scratch = 0

    def aggregate_train(self, server_round, replies):  # noqa: D102
        self.rejected[str(server_round)], self._round, self.scratch = server_round, server_round, server_round
        return super().aggregate_train(server_round, replies)


class ValidatedTally(ValidatedStrategy):
    """A subclass of a fedweights strategy: its base's per-round scratch stays excluded."""


def test_only_what_a_strategy_class_excludes_is_left_out_of_its_checkpoint():
    tally = Tally()
    wrapped = ValidatedTally(tally)
    state = StrategyState(wrapped)
    tally.aggregate_train(3, [])
    wrapped.rejected[3], wrapped._global = [{"node": "1", "reason": "r"}], ArrayRecord()
    tree, blobs, uncaptured = state.capture()
    assert uncaptured == []
    assert tree["strategy"]["attributes"] == {}  # the wrapper's rejected/_global live within a round
    assert set(tree["strategy.strategy"]["attributes"]) == {"rejected", "_round"}  # its own class's names only

    fresh = Tally()
    StrategyState(ValidatedTally(fresh)).restore(tree, blobs)
    assert (fresh.rejected, fresh._round, fresh.scratch) == ({"3": 3}, 3, 0)


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    run_dir = federate(fedavgm(tmp_path / "run", rounds=1))
    folder = next((run_dir.path / "checkpoint").glob("round-*"))
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "state.json", "strategy.safetensors"]
    assert set(load_file(str(folder / "model.safetensors"))) == set(run_dir.load_model())
    assert json.loads((folder / "state.json").read_text())["round"] == 1


@pytest.mark.slow
def test_a_simulation_resumes_from_its_checkpoint(tmp_path):
    """On Flower's simulation engine (Ray): new node ids after the restart, same run."""
    from fedweights.flower.simulation import simulate

    first = simulate(RunConfig(clients=2, rounds=1, out=str(tmp_path / "run")))
    run_id = RunDir(first.run_dir).read_metrics()["run_id"]
    result = simulate(resume_config(first.run_dir, {"rounds": 2}))
    metrics = RunDir(result.run_dir).read_metrics()
    assert metrics["run_id"] == run_id and metrics["status"] == "completed"
    assert [r.round for r in result.rounds] == [1, 2] and result.rounds[0] == first.rounds[0]
    assert load_checkpoint(result.run_dir).round == 2 and result.final_accuracy > 0.5


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm"])  # fedavgm: the momentum travels encrypted
def test_an_encrypted_run_resumes_from_its_encrypted_checkpoint(tmp_path, strategy):
    """--he: the checkpoint holds the encrypted global sum; the resumed run decrypts to the same model."""
    keys = make_keys(tmp_path / "keys")
    he = HEConfig(enabled=True, key=str(keys.secret), server_key=str(keys.server))
    config = RunConfig(clients=2, rounds=2, seed=4, out=str(tmp_path / "whole"), he=he, strategy=StrategyConfig(name=strategy))
    whole = federate(config)
    part = federate(dataclasses.replace(config, rounds=1, out=str(tmp_path / "part")))
    checkpoint = load_checkpoint(part.path)
    assert is_encrypted(checkpoint.arrays) and next((part.path / "checkpoint").glob("round-000001-*/model.he")).is_file()
    assert checkpoint.strategy_tree["strategy"]["attributes"]["counts"]  # the example counts it learnt
    federate(resume_config(part.path, {"rounds": 2}))
    model = builtin_task(RunConfig()).model_fn()
    expected = decrypt_model_file(whole.path / "model.he", keys.secret, model)
    for name, tensor in decrypt_model_file(part.path / "model.he", keys.secret, model).items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name


def test_a_run_whose_strategy_state_cannot_be_captured_refuses_to_resume(tmp_path):
    config = RunConfig(clients=2, rounds=1, out=str(tmp_path / "run"), strategy=StrategyConfig(name="tests.test_checkpoint:Counter"))
    federate(config)
    with pytest.raises(CheckpointError, match=r"Counter.seen \(object\).*state_dict\(\)/load_state_dict\(\)"):
        federate(resume_config(config.out, {"rounds": 2}))


def test_a_new_run_in_an_old_run_directory_archives_all_its_results(tmp_path):
    first = federate(fedavgm(tmp_path / "run", rounds=1, dp=DPConfig(enabled=True, noise_multiplier=1.0)))
    old_id = first.read_metrics()["run_id"]
    (first.path / "published.json").write_text('{"versions": ["digits/sim:1"]}')  # as `--publish` leaves it
    old_files = {p.name: p.read_bytes() for p in first.path.iterdir() if p.is_file() and p.name != ".lock"}
    assert {"metrics.json", "model.safetensors", "privacy-ledger.jsonl", "privacy.json", "report.html"} <= set(old_files)

    second = federate(fedavgm(tmp_path / "run", rounds=1))
    (archived,) = (second.path / "archive").iterdir()
    assert archived.name.startswith(f"{old_id}-")
    assert {name: (archived / name).read_bytes() for name in old_files} == old_files  # moved whole, unchanged
    assert json.loads((archived / "checkpoint" / "manifest.json").read_text())["run_id"] == old_id
    assert load_checkpoint(second.path).run_id == second.read_metrics()["run_id"] != old_id
    assert not (second.path / "published.json").exists() and not (second.path / "privacy.json").exists()

    third = federate(resume_config(second.path, {"rounds": 2}))  # a resume archives nothing
    assert len(list((third.path / "archive").iterdir())) == 1 and third.read_metrics()["run_id"] == second.read_metrics()["run_id"]


WRITER_SCRIPT = """
import sys
import time
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg
from fedweights.flower.checkpoint import write_checkpoint
from fedweights.flower.strategy_state import StrategyState

state = StrategyState(FedAvg())
for server_round in range(1, 10_000):  # each round's model is filled with its round number
    arrays = ArrayRecord({"w": Array(np.full(1_000_000, server_round, dtype=np.float32))})
    write_checkpoint(sys.argv[1], "r1", server_round, arrays, state)
    print(server_round, flush=True)
"""


def test_kill_nine_while_checkpointing_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL a process that checkpoints back to back, at a random moment: what is left is whole."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE)
    try:
        for line in writer.stdout:
            if int(line) >= 3:
                break
        time.sleep(random.uniform(0.0, 0.05))  # somewhere inside a later write
    finally:
        writer.kill()
        writer.wait(timeout=30)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.round >= 3
    assert np.all(checkpoint.arrays["w"].numpy() == checkpoint.round)  # the model of the round the manifest names
