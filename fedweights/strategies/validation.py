"""Update validation: a Strategy wrapper that screens every reply before any aggregation.

``ValidatedStrategy(strategy, max_norm)`` wraps any Flower strategy (built-in or your own), the way
Flower's DP wrappers do. A training reply is excluded, with its reason logged and kept in
``rejected[server_round]``, when its update

- does not carry exactly one ArrayRecord with the global model's keys, shapes and dtypes (declared
  and actually encoded in each array's payload),
- holds a NaN or infinite value,
- moves the model further than ``max_norm`` (when a bound is set; the L2 norm of ``reply - global``
  over the learnt weights, as every norm here: integer arrays and the model's buffers
  (``buffer_keys``: BatchNorm's running statistics and counter, which follow the data, not the
  gradient, and dwarfed honest updates) are left out, though checked like the rest otherwise),
- lacks a positive, finite example count (the FedAvg weight, at most 2^63 and at most ``max_examples``
  when that is set: clients' counts are otherwise taken on trust), has a metric that is not
  a finite number (or a loss < 0), or lacks metrics most peers carry (a reply with more is
  accepted without the extra ones: ``reply_checks.usual_signature``),
- under record-level DP (``dp_bound``), moves the model further than DP-SGD with the run's settings
  can in one round (``dp_update_bound``: a bound an honest client exceeds with probability ~e^-18),
- moves the model more than ``max_model_norm_ratio`` times the global model's own norm (at least
  ``MIN_WEIGHT_RMS`` per weight; of the replies that passed the checks above, when at least one of
  them is within the bound): a scale no reply controls, so it also holds in rounds too small for the
  median screen below (2 sites, or most clients failed), where one huge update would otherwise
  overflow the average, or
- moves the model more than ``max_norm_ratio`` times as far as the round's median update (of the
  replies that passed the checks above, when there are at least 3 and their median norm is > 0):
  an update orders of magnitude larger than its peers' (a broken client, or a scaling attack)
  would otherwise drag or overflow the average and end the run in the next round.

Evaluation replies are screened the same way (one MetricRecord, a non-negative finite example count
within ``max_examples``,
finite metrics, ``eval_accuracy`` in [0, 1], ``eval_loss`` >= 0); rejected ones are kept in
``rejected_evaluation[server_round]`` and replies with 0 examples are left out of the average.

Only accepted replies reach the wrapped strategy, as canonical copies (``reply_checks``): the
round's usual record names and the global model's key order, so Flower's strategies, which pair
records by the first reply's names and arrays by position, never see one client's layout. Replies
that carry an error are dropped too (the round loop already reports them), so one bad client never
takes a round down. The new global model must have the old one's keys, shapes and finite values once
cast back to the old one's dtypes (else the round fails with the strategy named, before anything is
saved).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..errors import RunFailed
from ..privacy.distributed import l2_norm
from .dp_update_bound import DPUpdateBound
from .reply_checks import (
    canonical_copy,
    decoded_arrays,
    decoded_model,
    learnt_weights,
    metrics_problem,
    ordered_like,
    record_names,
    update_norm,
    usual_signature,
    weight_of,
)

REJECTED_PREFIX = "update rejected: "
DEFAULT_MAX_NORM_RATIO = 10.0
"""Honest updates measured on digits (10–30 clients, IID to Dirichlet α = 0.1, 1–3 local epochs)
were at most 5x the round's median norm, on Fashion-MNIST (10–30 clients, Dirichlet α = 0.1 and
0.5, shards of 17 to 13,142 examples) at most 2.2x."""
DEFAULT_MAX_MODEL_NORM_RATIO = 100.0
"""Honest updates measured on digits and Fashion-MNIST (2–10 clients, IID and Dirichlet α = 0.1, 1–5
local epochs) moved the model by at most 1.65x its norm (round 1, from the initial weights; under 1x
after), and 16x with a learning rate of 0.5 that diverges; a scaling attack that ends the run
(x10⁶ on digits: NaNs in the next round) is ~10⁶x."""
MIN_WEIGHT_RMS = 0.01
"""The least scale the model-relative bound judges by, per weight: a zero-initialised logistic
regression on Fashion-MNIST has a norm of 0.075 (its biases), and 5 of 10 honest clients moved it
by over 100x that in round 1 (5 local epochs, Dirichlet α = 0.1: up to 136x); 0.01 · √7850 = 0.89."""
MIN_UPDATES_FOR_RATIO = 3  # the median of 2 norms is their mean: an outlier would set its own scale
EVALUATION_REJECTED_PREFIX = "evaluation rejected: "


class ValidatedStrategy(Strategy):
    """Runs ``strategy`` on the training replies that pass validation against the global model."""

    checkpoint_exclude = ("rejected", "rejected_evaluation", "_global")  # they live within one round

    def __init__(
        self,
        strategy: Strategy,
        max_norm: float | None = None,
        max_norm_ratio: float | None = None,
        max_examples: int | None = None,
        max_model_norm_ratio: float | None = None,
        buffer_keys: Iterable[str] = (),
        dp_bound: DPUpdateBound | None = None,
    ) -> None:
        self.strategy = strategy
        self.dp_bound = dp_bound
        self.buffer_keys = frozenset(buffer_keys)
        self.max_norm = max_norm
        self.max_norm_ratio = max_norm_ratio
        self.max_model_norm_ratio = max_model_norm_ratio
        self.max_examples = max_examples
        self.rejected: dict[int, list[dict[str, str]]] = {}
        self.rejected_evaluation: dict[int, list[dict[str, str]]] = {}
        self._global: ArrayRecord | None = None

    def __repr__(self) -> str:
        return (f"ValidatedStrategy({self.strategy!r}, max_norm={self.max_norm}, "
                f"max_norm_ratio={self.max_norm_ratio}, max_examples={self.max_examples}, "
                f"max_model_norm_ratio={self.max_model_norm_ratio}, dp_bound={'on' if self.dp_bound else 'off'})")

    def summary(self) -> None:
        """Log the validation settings, then the wrapped strategy's."""
        log(INFO, "\t├──> Update validation: max_norm=%s, max_norm_ratio=%s, max_model_norm_ratio=%s, "
            "max_examples=%s, DP-SGD update bound=%s", self.max_norm, self.max_norm_ratio, self.max_model_norm_ratio,
            self.max_examples, "on" if self.dp_bound is not None else "off")
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the replies will be checked against, then delegate."""
        self._global = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the accepted replies with the wrapped strategy."""
        accepted, rejected = self.screen(replies, server_round)
        self.rejected[server_round] = rejected
        for item in rejected:
            log(WARNING, "round %d: node %s: %s", server_round, item["node"], item["reason"])
        arrays, metrics = self.strategy.aggregate_train(server_round, accepted)
        if arrays is None:
            return None, metrics
        if isinstance(arrays, ArrayRecord):  # checked as returned, and as kept: in the old model's dtypes
            problem = model_problem(arrays, self._global, same_dtypes=False)
            if problem is None:  # e.g. a float64 value beyond the float32 range turns infinite here
                arrays = _with_dtypes_of(self._global, arrays)
                problem = model_problem(arrays, self._global)
        else:
            problem = f"it is a {type(arrays).__name__}, not an ArrayRecord"
        if problem is not None:  # never checkpointed nor sent to clients
            raise RunFailed(f"round {server_round}: {type(self.strategy).__name__}.aggregate_train returned a new "
                            f"global model unlike the old one: {problem}. Fix the strategy; this round is not used")
        return arrays, metrics

    def screen(
        self, replies: Iterable[Message], server_round: int = 0
    ) -> tuple[list[Message], list[dict[str, str]]]:
        """Split training replies into canonical copies of the accepted ones and ``{"node", "reason"}``
        records of the rejected ones."""
        if self._global is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        candidates = [r for r in replies if not r.has_error()]
        weight_key = getattr(self.strategy, "weighted_by_key", "num-examples")
        usual = usual_signature(candidates)
        array_name, metric_name = record_names(candidates)
        reference = {k: a.numpy() for k, a in self._global.items()}
        passed, norms, rejected = [], [], []
        model_ratio = self.max_model_norm_ratio
        norm_needed = self.max_norm_ratio is not None or model_ratio is not None or self.dp_bound is not None
        weights = learnt_weights(reference, self.buffer_keys) if norm_needed else {}
        size = sum(w.size for w in weights.values())
        for reply in candidates:
            problem, norm = _checked_update(
                reply, self._global, self.max_norm, reference, norm_needed, self.buffer_keys
            )
            problem = problem or metrics_problem(reply, weight_key, usual, max_examples=self.max_examples)
            if problem is None and self.dp_bound is not None:
                problem = self.dp_bound.problem(reply, norm, size, weight_of(reply, weight_key))
            if problem is None:
                passed.append(reply)
                norms.append(norm)
            else:
                rejected.append({"node": str(reply.metadata.src_node_id), "reason": REJECTED_PREFIX + problem})
        global_norm = l2_norm(weights) if model_ratio is not None else 0.0
        too_large = model_norm_outliers(norms, global_norm, size, model_ratio, server_round)
        passed, norms = _without_outliers(passed, norms, too_large, rejected)
        passed, norms = _without_outliers(passed, norms, norm_outliers(norms, self.max_norm_ratio), rejected)
        accepted = [canonical_copy(r, array_name, ordered_like(self._global, r), metric_name, usual) for r in passed]
        return accepted, rejected

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate the accepted evaluation replies (those with examples) with the wrapped strategy."""
        weight_key = getattr(self.strategy, "weighted_by_key", "num-examples")
        accepted, self.rejected_evaluation[server_round] = screen_evaluation(
            server_round, replies, weight_key, self.max_examples
        )
        return self.strategy.aggregate_evaluate(server_round, accepted)


def screen_evaluation(
    server_round: int, replies: Iterable[Message], weight_key: str = "num-examples", max_examples: int | None = None
) -> tuple[list[Message], list[dict[str, str]]]:
    """Canonical copies of the evaluation replies that can be averaged (a reply with 0 examples is
    left out, not rejected: it has nothing to report), and ``{"node", "reason"}`` records of the
    rejected ones (logged). Used on the plaintext path and under ``--he`` alike."""
    candidates = [r for r in replies if not r.has_error()]
    usual = usual_signature(candidates)
    _, metric_name = record_names(candidates)
    accepted, rejected = [], []
    for reply in candidates:
        problem = metrics_problem(reply, weight_key, usual, zero_weight_ok=True, max_examples=max_examples)
        if problem is not None:
            node = str(reply.metadata.src_node_id)
            log(WARNING, "round %d: node %s: %s%s", server_round, node, EVALUATION_REJECTED_PREFIX, problem)
            rejected.append({"node": node, "reason": EVALUATION_REJECTED_PREFIX + problem})
        elif weight_of(reply, weight_key) > 0:
            accepted.append(canonical_copy(reply, None, None, metric_name, usual))
    return accepted, rejected


def _without_outliers(
    replies: list[Message], norms: list[float], reasons: list[str | None], rejected: list[dict[str, str]]
) -> tuple[list[Message], list[float]]:
    """The replies (and their norms) whose reason is None; the others are added to ``rejected``."""
    kept = []
    for reply, norm, reason in zip(replies, norms, reasons, strict=True):
        if reason is None:
            kept.append((reply, norm))
        else:
            rejected.append({"node": str(reply.metadata.src_node_id), "reason": REJECTED_PREFIX + reason})
    return [r for r, _ in kept], [n for _, n in kept]


def _checked_update(
    reply: Message,
    global_arrays: ArrayRecord,
    max_norm: float | None,
    reference: Mapping[str, np.ndarray],
    norm_needed: bool,
    buffer_keys: frozenset[str],
) -> tuple[str | None, float | None]:
    """Why a reply's arrays cannot be aggregated into ``global_arrays`` (None when they can), and the
    update's norm (None when they cannot, or when neither ``max_norm`` nor ``norm_needed`` asks for
    it); ``reference`` is ``global_arrays`` decoded; ``buffer_keys`` are left out of the norm."""
    values, problem = decoded_arrays(reply, global_arrays)
    if problem is not None or (max_norm is None and not norm_needed):
        return problem, None
    norm = update_norm(values, reference, buffer_keys)
    if max_norm is not None and norm > max_norm:
        return f"update norm {norm:.4g} exceeds max_norm {max_norm:g}", norm
    return None, norm


def model_norm_outliers(
    norms: list[float], model_norm: float, size: int, max_ratio: float | None, server_round: int = 0
) -> list[str | None]:
    """Per update norm, why it is too large next to the global model (None when it is not): more
    than ``max_ratio`` times its scale, the model's norm or, when that is smaller, ``MIN_WEIGHT_RMS``
    per weight (``size`` weights). Judged only when at least one update is within the bound: when
    every update exceeds it, the round's scale is what it is (e.g. every client diverging from a
    model gone bad), and rejecting them all would end the run."""
    if max_ratio is None or size == 0:
        return [None] * len(norms)
    floor = MIN_WEIGHT_RMS * math.sqrt(size)
    scale = max(model_norm, floor)
    bound = max_ratio * scale
    if all(norm > bound for norm in norms):
        if norms:
            log(WARNING, "round %d: every update's norm is over %gx the global model's scale %.4g "
                "(max_model_norm_ratio): none is rejected for it", server_round, max_ratio, scale)
        return [None] * len(norms)
    of = (f"the global model's norm {model_norm:.4g}" if model_norm >= floor else
          f"{scale:.4g} = {MIN_WEIGHT_RMS:g} per weight, the scale used when the global model's norm "
          f"({model_norm:.4g}) is smaller")
    return [
        None if norm <= bound else (
            f"update norm {norm:.4g} is {norm / scale:.3g}x {of} (max_model_norm_ratio {max_ratio:g}; raise it, "
            f"or 0 turns this check off, if such updates are expected)"
        )
        for norm in norms
    ]


def norm_outliers(norms: list[float], max_ratio: float | None) -> list[str | None]:
    """Per update norm, why it is too large next to the round's median norm (None when it is not):
    more than ``max_ratio`` times the median, judged only with ``MIN_UPDATES_FOR_RATIO`` updates or
    more and a positive median."""
    if max_ratio is None or len(norms) < MIN_UPDATES_FOR_RATIO:
        return [None] * len(norms)
    median = float(np.median(norms))
    if not median > 0:
        return [None] * len(norms)
    return [
        None if norm <= max_ratio * median else (
            f"update norm {norm:.4g} is {norm / median:.3g}x the round's median update norm {median:.4g} "
            f"(max_norm_ratio {max_ratio:g}; raise it, or 0 turns this check off, if such updates are expected)"
        )
        for norm in norms
    ]


def model_problem(arrays: ArrayRecord, reference: ArrayRecord, same_dtypes: bool = True) -> str | None:
    """Why ``arrays`` is not a model like ``reference`` (keys, shapes, dtypes, finite values), or None."""
    return decoded_model(arrays, reference, same_dtypes)[1]


def rejected_updates(strategy: Strategy, server_round: int) -> list[dict[str, str]]:
    """The replies ``strategy`` excluded in ``server_round``: any strategy that keeps them in a
    ``rejected`` dict by round (ValidatedStrategy, the --he EncryptedFedAvg); [] for others."""
    return _of_round(getattr(strategy, "rejected", None), server_round)


def rejected_evaluations(strategy: Strategy, server_round: int) -> list[dict[str, str]]:
    """The evaluation replies ``strategy`` excluded in ``server_round`` (ValidatedStrategy, the --he
    EncryptedFedAvg: ``rejected_evaluation``); [] for others."""
    return _of_round(getattr(strategy, "rejected_evaluation", None), server_round)


def _of_round(by_round: object, server_round: int) -> list[dict[str, str]]:
    return list(by_round.get(server_round, [])) if isinstance(by_round, dict) else []


def _with_dtypes_of(reference: ArrayRecord, arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` cast back to the global model's dtypes (e.g. Flower's FedAdam returns float64), so
    the next round's updates are checked against, and the model keeps, the dtypes it started with."""
    if all(k in reference and arrays[k].dtype == reference[k].dtype for k in arrays):
        return arrays
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: checked next
        return ArrayRecord(
            {k: Array(v.numpy().astype(reference[k].numpy().dtype)) if k in reference else v for k, v in arrays.items()}
        )
