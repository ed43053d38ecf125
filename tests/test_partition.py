"""Client partitions: sizes, disjointness, determinism, and label skew."""

from __future__ import annotations

import numpy as np
import pytest

from fedweights.config import DEFAULT_LR, RunConfig
from fedweights.data import dirichlet_partition, iid_partition, labels_of, load_digits_split
from fedweights.data.datasets import FASHION_MNIST_DIR
from fedweights.errors import ConfigError
from fedweights.flower.round_loop import run_federation
from fedweights.flower.runtime import Runtime
from fedweights.progress import RichReporter
from fedweights.task import builtin_task

from .local_grid import LocalGrid, node_configs


@pytest.fixture(scope="module")
def digits_labels():
    train, _ = load_digits_split(seed=0)
    return labels_of(train)


def assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n  # disjoint and complete


def test_digits_split_is_stratified_and_held_out():
    train, test = load_digits_split(seed=0)
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert float(train.tensors[0].max()) <= 1.0
    counts = np.bincount(labels_of(test), minlength=10)
    assert counts.min() >= 35  # every class is in the test split


@pytest.mark.parametrize("clients", [1, 4, 7, 100])
def test_iid_sizes(clients):
    parts = iid_partition(1437, clients, seed=0)
    assert len(parts) == clients
    assert_exact_cover(parts, 1437)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_deterministic_per_seed():
    a, b, c = (iid_partition(100, 3, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_covers_everything(digits_labels):
    parts = dirichlet_partition(digits_labels, 10, alpha=0.5, seed=0)
    assert_exact_cover(parts, len(digits_labels))
    assert min(len(p) for p in parts) >= 2


def dominant_share(labels, parts):
    """Mean over clients of the share of their most common label."""
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_small_alpha_skews_labels(digits_labels):
    skewed = dominant_share(digits_labels, dirichlet_partition(digits_labels, 8, alpha=0.05, seed=0))
    mild = dominant_share(digits_labels, dirichlet_partition(digits_labels, 8, alpha=100.0, seed=0))
    iid = dominant_share(digits_labels, iid_partition(len(digits_labels), 8, seed=0))
    assert skewed > 0.6  # most of a client's data is one class
    assert mild < 0.2 and iid < 0.2  # ~ uniform over 10 classes


def test_impossible_partitions_name_the_key(digits_labels):
    with pytest.raises(ConfigError) as err:
        iid_partition(10, 11, seed=0)
    assert err.value.key == "clients"
    with pytest.raises(ConfigError) as err:
        dirichlet_partition(digits_labels, 4, alpha=0.0, seed=0)
    assert err.value.key == "alpha"


def test_task_client_data_shards_train_and_test():
    config = RunConfig(clients=3)
    task = builtin_task(config)
    shares = [task.client_data(i, 3, config) for i in range(3)]
    assert sum(len(s.train) for s in shares) == len(task.train_data)
    assert sum(len(s.test) for s in shares) == len(task.test_data)
    test_ids = [set(s.test.indices) for s in shares]
    assert not (test_ids[0] & test_ids[1]) and not (test_ids[1] & test_ids[2])


needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)


@needs_fashion_mnist
def test_fashion_mnist_reads_debian_idx_files():
    from fedweights.data import load_fashion_mnist

    train, test = load_fashion_mnist()
    assert len(train) == 60000 and len(test) == 10000
    assert train.tensors[0].shape[1] == 784 and float(train.tensors[0].max()) <= 1.0
    assert sorted(np.unique(labels_of(test)).tolist()) == list(range(10))


def test_the_default_learning_rate_is_the_datasets_and_a_set_one_wins():
    assert [RunConfig(dataset=d).lr for d in ("digits", "fashion-mnist")] == [DEFAULT_LR["digits"], DEFAULT_LR["fashion-mnist"]]
    assert RunConfig(dataset="fashion-mnist", lr=0.3).lr == 0.3
    assert RunConfig(task="my.module:make_task").lr == 0.1
    flat = RunConfig(dataset="fashion-mnist").to_flat()  # what clients receive as Flower's run config
    assert flat["lr"] == DEFAULT_LR["fashion-mnist"] and RunConfig.from_flat(flat).lr == DEFAULT_LR["fashion-mnist"]


@needs_fashion_mnist
@pytest.mark.usefixtures("serverapp_process")
def test_fashion_mnist_federation_learns_with_the_default_settings(tmp_path):
    """With digits' learning rate (0.1, momentum 0.9) the 784-input MLP diverged: 0.14 accuracy."""
    config = RunConfig(dataset="fashion-mnist", clients=4, rounds=1, out=str(tmp_path / "run"))
    result = run_federation(LocalGrid(Runtime(config), node_configs(4)), Runtime(config), reporter=RichReporter())
    assert result.final_accuracy > 0.75


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    from fedweights.data import load_fashion_mnist
    from fedweights.errors import UserError

    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_simulate_refuses_the_wrong_arguments_before_anything_starts(tmp_path):
    from fedweights import simulate
    from fedweights.errors import UserError
    from fedweights.task import Task

    task = builtin_task(RunConfig())
    config = RunConfig(out=str(tmp_path / "run"))
    cases = [
        ((config.to_flat(),), "takes a RunConfig"),
        ((config, "my_module:task"), "takes a fedweights Task"),
        ((config, Task(task.model_fn(), task.train_data, task.test_data)), "a model instance would be shared"),  # MyNet()
        ((config, Task(lambda: None, task.train_data, task.test_data)), "must return a torch.nn.Module"),
    ]
    for args, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            simulate(*args)
    assert not (tmp_path / "run").exists()
