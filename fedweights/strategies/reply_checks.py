"""Checks of single client replies, and the normalised copies of the accepted ones a strategy gets.

What one client sends is untrusted. Flower's strategies assume a lot about it: that every reply
names its records like the first one, lists its arrays in the same order (Krum's distances and
FedAvgM's momentum pair arrays by position), that an ``Array``'s payload decodes to the dtype and
shape it declares, and that every metric is a number of the same kind in every reply. A reply that
breaks one of these raised out of the strategy (the whole round, and the run, went down) or, worse,
was aggregated misaligned. So each reply is checked here, and an accepted one is passed on as a copy
in a canonical form: the round's most common record names, the global model's key order, and only
arrays whose decoded payload matches the global model's dtype and shape.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from ..privacy.distributed import l2_norm

MAX_WEIGHT = 2.0**63
"""Largest aggregation weight (example count) accepted: above any real count, and low enough that
the weights of any number of clients sum to a finite total (an infinite total zeroes the model)."""

NON_NEGATIVE = ("train_loss", "eval_loss")
UNIT_INTERVAL = ("eval_accuracy",)

Signature = frozenset[tuple[str, int | None]]
"""A MetricRecord's shape: its keys, each with None (a number) or the length of its list."""


def record_names(replies: Iterable[Message]) -> tuple[str, str]:
    """The ArrayRecord and MetricRecord names most replies use (the strategy sees only these)."""
    arrays, metrics = Counter(), Counter()
    for reply in replies:
        arrays.update(reply.content.array_records.keys())
        metrics.update(reply.content.metric_records.keys())
    return _most_common(arrays, "arrays"), _most_common(metrics, "metrics")


def usual_signature(replies: Iterable[Message]) -> Signature | None:
    """The metric keys (and list lengths) most replies with one MetricRecord carry; of equally
    common ones, the one with the fewest keys (replies that carry more are accepted without the
    extra metrics: two sites, one of which reports a metric the other does not, both count)."""
    counts = Counter(
        metrics_signature(next(iter(r.content.metric_records.values())))
        for r in replies
        if len(r.content.metric_records) == 1
    )
    if not counts:
        return None
    most = max(counts.values())
    return min((signature for signature, count in counts.items() if count == most), key=len)


def metrics_signature(metrics: Mapping) -> Signature:
    """``metrics``' keys, each with None for a number or the length of its list."""
    return frozenset((k, len(v) if isinstance(v, list) else None) for k, v in metrics.items())


def decoded_arrays(reply: Message, reference: ArrayRecord) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The reply's one ArrayRecord decoded, keyed like ``reference`` (or None and why it cannot be used)."""
    records = reply.content.array_records
    if len(records) != 1:
        return None, f"expected one ArrayRecord, got {len(records)}"
    return decoded_model(next(iter(records.values())), reference)


def decoded_model(
    arrays: ArrayRecord, reference: ArrayRecord, same_dtypes: bool = True
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """``arrays`` decoded, keyed like ``reference``, or None and why they are not a model like it:
    its keys and shapes (and dtypes, with ``same_dtypes``), each payload decoding to the dtype and
    shape it declares, only finite values."""
    missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
    if missing or extra:
        return None, f"keys differ from the global model (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    values = {}
    for key, ref in reference.items():
        array = arrays[key]
        if tuple(array.shape) != tuple(ref.shape) or (same_dtypes and array.dtype != ref.dtype):
            return None, f"'{key}' is {array.dtype}{list(array.shape)}, the global model has {ref.dtype}{list(ref.shape)}"
        try:
            value = array.numpy()
        except Exception as exc:  # noqa: BLE001 - any undecodable payload is the client's fault
            return None, f"'{key}' cannot be decoded as a numpy array ({type(exc).__name__}: {str(exc)[:120]})"
        if str(value.dtype) != array.dtype or tuple(value.shape) != tuple(array.shape):
            return None, (
                f"'{key}' declares {array.dtype}{list(array.shape)} but its data is "
                f"{value.dtype}{list(value.shape)}"
            )
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return None, f"'{key}' holds NaN or infinite values"
        values[key] = value
    return values, None


def learnt_weights(values: Mapping[str, np.ndarray], skip: Collection[str] = ()) -> dict[str, np.ndarray]:
    """The floating-point arrays of a model not in ``skip`` (its buffers), the ones norms measure.
    Integer arrays are left out: a counter such as BatchNorm's ``num_batches_tracked`` grows by the
    client's step count, which would make a client's update norm measure its data size."""
    return {k: v for k, v in values.items() if v.dtype.kind == "f" and k not in skip}


def update_norm(
    values: Mapping[str, np.ndarray], reference_values: Mapping[str, np.ndarray], skip: Collection[str] = ()
) -> float:
    """L2 norm of ``values - reference_values`` over ``learnt_weights(reference_values, skip)``, in
    float64, one array's difference in memory at a time (the norm of the per-array norms)."""
    per_array = [
        l2_norm({k: np.subtract(values[k], ref, dtype=np.float64)})
        for k, ref in learnt_weights(reference_values, skip).items()
    ]
    return l2_norm({"": np.asarray(per_array, dtype=np.float64)})


def metrics_problem(
    reply: Message,
    weight_key: str,
    usual: Signature | None,
    zero_weight_ok: bool = False,
    max_examples: int | None = None,
) -> str | None:
    """Why the reply's one MetricRecord cannot be aggregated (None when it can); ``max_examples``
    is the largest example count (the aggregation weight) accepted, when one is set."""
    records = reply.content.metric_records
    if len(records) != 1:
        return f"expected one MetricRecord, got {len(records)}"
    metrics = next(iter(records.values()))
    weight = metrics.get(weight_key)
    lowest = "non-negative" if zero_weight_ok else "positive"
    if not _is_number(weight) or not _finite(weight) or weight < 0 or (weight == 0 and not zero_weight_ok):
        return f"'{weight_key}' must be a {lowest} finite number, got {weight!r}"
    if weight > MAX_WEIGHT:
        return f"'{weight_key}' is {weight:.4g}, more than the largest accepted count 2^63"
    if max_examples is not None and weight > max_examples:
        return f"'{weight_key}' is {weight:.6g}, more than max_examples {max_examples}"
    for key, value in metrics.items():
        problem = _value_problem(key, value)
        if problem is not None:
            return problem
    if usual is not None and not usual <= metrics_signature(metrics):  # more metrics: the extra ones are dropped
        return f"metric keys {_describe(metrics_signature(metrics))} differ from the other clients' {_describe(usual)}"
    return None


def weight_of(reply: Message, weight_key: str) -> float:
    """The aggregation weight of a reply that passed ``metrics_problem``."""
    return float(next(iter(reply.content.metric_records.values()))[weight_key])


def canonical_copy(
    reply: Message, array_name: str | None, arrays: ArrayRecord | None, metric_name: str, usual: Signature | None
) -> Message:
    """A copy of an accepted ``reply`` with its records under the round's names (the arrays, if
    any, given in the global model's order), its metrics limited to the ``usual`` keys, and its
    other records unchanged."""
    content = reply.content
    records = {array_name: arrays} if array_name is not None and arrays is not None else {}
    metrics = next(iter(content.metric_records.values()))
    if usual is not None:
        metrics = MetricRecord({key: metrics[key] for key, _ in usual})
    records[metric_name] = metrics
    for name, record in content.config_records.items():
        records.setdefault(name, record)
    return Message(content=RecordDict(records), metadata=copy.copy(reply.metadata))


def ordered_like(reference: ArrayRecord, reply: Message) -> ArrayRecord:
    """The reply's (already checked) arrays in ``reference``'s key order, without re-encoding."""
    arrays = next(iter(reply.content.array_records.values()))
    return ArrayRecord({k: arrays[k] for k in reference})


def _value_problem(key: str, value: object) -> str | None:
    items = value if isinstance(value, list) else [value]
    if not all(_is_number(v) and _finite(v) for v in items):
        return f"metric '{key}' must hold finite numbers, got {_short(value)}"
    if key in NON_NEGATIVE and any(v < 0 for v in items):
        return f"metric '{key}' must not be negative, got {_short(value)}"
    if key in UNIT_INTERVAL and any(not 0 <= v <= 1 for v in items):
        return f"metric '{key}' must lie in [0, 1], got {_short(value)}"
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(signature: Signature) -> str:
    return str(sorted(k if n is None else f"{k}[{n}]" for k, n in signature))


def _most_common(counts: Counter, default: str) -> str:
    return counts.most_common(1)[0][0] if counts else default
