"""Split a dataset's indices among clients: IID or label-skewed (Dirichlet over labels)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

MIN_EXAMPLES_PER_CLIENT = 2
_DIRICHLET_TRIES = 100


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal indices into ``num_clients`` near-equal parts."""
    _check_sizes(num_examples, num_clients)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = MIN_EXAMPLES_PER_CLIENT
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients by proportions ~ Dir(alpha).

    Small ``alpha`` gives each client few classes; large ``alpha`` approaches IID. Draws are
    repeated until every client holds at least ``min_size`` examples.
    """
    if alpha <= 0:
        raise ConfigError("alpha", f"must be > 0, got {alpha}")
    _check_sizes(len(labels), num_clients, min_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        "alpha",
        f"is {alpha}: it left some of the {num_clients} clients with fewer than {min_size} examples "
        f"in {_DIRICHLET_TRIES} draws; raise alpha or lower clients",
    )


def _check_sizes(num_examples: int, num_clients: int, min_size: int = 1) -> None:
    if num_clients < 1:
        raise ConfigError("clients", f"must be >= 1, got {num_clients}")
    if num_clients * min_size > num_examples:
        raise ConfigError(
            "clients",
            f"is {num_clients}: more clients than the {num_examples} training examples allow "
            f"(at least {min_size} per client)",
        )
