"""The state a server strategy builds up over rounds, captured for checkpoints without pickle.

Flower's strategies keep their state in plain attributes: FedAvgM its momentum buffer
(``momentum_vector``) and model copy (``current_arrays``), FedAdam/FedYogi/FedAdagrad ``m_t``,
``v_t`` and ``current_arrays`` (the step count is the server round), the encrypted FedAvg of
``--he`` the example counts it learnt (``counts``). ``StrategyState`` captures, for the strategy
and every strategy it wraps (``.strategy``, as in ``ValidatedStrategy`` and Flower's DP wrappers),
each attribute whose value changed since the strategy was built, provided it is data: None, bool,
int, float, str, numpy arrays and scalars, Flower ``ArrayRecord``s, lists, tuples, sets and dicts
of those (``OrderedDict``, ``Counter`` and ``defaultdict`` of a builtin type keep their type), and
random generators (``random.Random``, numpy's ``Generator`` and ``RandomState``: their state, so a
resumed run continues their streams). Settings that come from the run config are unchanged, so
they are not saved and a resumed run applies its (allowed) overrides. Values are stored as tagged JSON plus a safetensors file for
the binary parts; nothing is pickled, so loading a checkpoint never runs code.

A custom strategy whose state lives in other objects implements ``state_dict() -> dict`` and
``load_state_dict(state)`` (values of the data types above); then its attributes are not walked.
Attributes named in a ``checkpoint_exclude`` class attribute of its class or a base class
(per-round scratch) are skipped; nothing else is, whatever its name.
State that can be neither captured nor excluded is listed in ``uncaptured``: any other object that was
replaced, or changed in place (compared by its pickled bytes, in memory only, or by its repr when it
cannot be pickled); a resume refuses it.
"""

from __future__ import annotations

import copy
import hashlib
import math
import pickle
import random
from collections import Counter, OrderedDict, defaultdict
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

from ..errors import UserError

EXCLUDE_ATTRIBUTE = "checkpoint_exclude"
FLOWER_ROUND_SCRATCH = {DifferentialPrivacyFixedClippingBase: ("_pending_events",)}
"""Per-round attributes of Flower's strategies (which have no ``checkpoint_exclude`` of their own)."""
DICT_TYPES = {dict: "$dict", OrderedDict: "$ordereddict", Counter: "$counter"}
FACTORIES = {f.__name__: f for f in (int, float, str, bool, list, tuple, dict, set)}  # defaultdict's, by name
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")
RNG_TYPES = (random.Random, np.random.Generator, np.random.RandomState)


class StateError(UserError):
    """A strategy's state cannot be saved or restored."""


class StrategyState:
    """Captures and restores the round-to-round state of ``strategy`` and the strategies it wraps."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self._baseline = {path: _snapshot(obj) for path, obj in _chain(strategy)}

    @property
    def classes(self) -> list[str]:
        """Qualified class names of the strategy chain, outermost first."""
        return [f"{type(obj).__module__}.{type(obj).__qualname__}" for _, obj in _chain(self.strategy)]

    def capture(self) -> tuple[dict[str, Any], dict[str, np.ndarray], list[str]]:
        """(JSON tree, binary blobs, uncaptured attribute names) of the current state."""
        encoder = _Encoder()
        tree: dict[str, Any] = {}
        uncaptured: list[str] = []
        for path, obj in _chain(self.strategy):
            if _has_state_methods(obj):
                tree[path] = {"state_dict": encoder.encode(obj.state_dict(), f"{path}.state_dict()")}
                continue
            data_before, objects_before = self._baseline[path]
            changed = {}
            for name, value in _attributes(obj).items():
                if _is_data(value):
                    if name not in data_before or not _equal(value, data_before[name]):
                        changed[name] = encoder.encode(value, f"{path}.{name}")
                elif not callable(value) and objects_before.get(name) != _fingerprint(value):
                    uncaptured.append(f"{type(obj).__qualname__}.{name} ({type(value).__name__})")
            tree[path] = {"attributes": changed}
        return tree, encoder.blobs, uncaptured

    def restore(self, tree: dict[str, Any], blobs: dict[str, np.ndarray]) -> None:
        """Put captured state back into a freshly built strategy of the same classes."""
        chain = dict(_chain(self.strategy))
        for path, entry in tree.items():
            if path not in chain:
                raise StateError(f"the checkpoint holds state for {path!r}, which this run's strategy does not have")
            obj = chain[path]
            if "state_dict" in entry:
                if not _has_state_methods(obj):
                    raise StateError(f"the checkpoint holds a state_dict for {path!r}, but it has no load_state_dict()")
                obj.load_state_dict(_decode(entry["state_dict"], blobs))
                continue
            excluded = _excluded(obj)  # never restored, also from a checkpoint written before it was excluded
            for name, value in entry.get("attributes", {}).items():
                if name not in excluded:
                    setattr(obj, name, _decode(value, blobs))


def _chain(strategy: Any) -> list[tuple[str, Any]]:
    """(path, object) for the strategy and each strategy it wraps through ``.strategy``."""
    chain, path, obj = [], "strategy", strategy
    while obj is not None and all(obj is not seen for _, seen in chain):
        chain.append((path, obj))
        obj, path = getattr(obj, "strategy", None), f"{path}.strategy"
        if obj is not None and not hasattr(obj, "configure_train"):
            break
    return chain


def _excluded(obj: Any) -> set[str]:
    return {name for cls in type(obj).__mro__
            for name in (*vars(cls).get(EXCLUDE_ATTRIBUTE, ()), *FLOWER_ROUND_SCRATCH.get(cls, ()))}


def _attributes(obj: Any) -> dict[str, Any]:
    excluded = _excluded(obj)
    return {k: v for k, v in vars(obj).items() if k not in excluded and k != "strategy"}


def _has_state_methods(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _snapshot(obj: Any) -> tuple[dict[str, Any], dict[str, tuple[int, str]]]:
    data, objects = {}, {}
    for name, value in _attributes(obj).items():
        if _is_data(value):
            data[name] = copy.deepcopy(value)
        elif not callable(value):
            objects[name] = _fingerprint(value)
    return data, objects


def _fingerprint(value: Any) -> tuple[int, str]:
    """Identity and content of a non-data object: its pickled bytes (never stored), or its repr when it
    cannot be pickled (a container holding a lambda shows its items; a native handle, nothing)."""
    try:
        content = pickle.dumps(value)
    except Exception:  # noqa: BLE001 - pickling fails in many ways (locks, lambdas, native handles)
        content = repr(value).encode()
    return id(value), hashlib.sha256(content).hexdigest()


def _is_data(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, ArrayRecord)):
        return True
    if isinstance(value, (np.ndarray, np.generic)):
        return value.dtype.kind in "biuf"
    if type(value) in RNG_TYPES:
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_data(v) for v in value)
    if type(value) in (set, frozenset):
        return all(_is_key(v) for v in value)
    if isinstance(value, dict):
        if type(value) not in DICT_TYPES and _factory_name(value) is None:
            return False
        return all(_is_key(k) for k in value) and all(_is_data(v) for v in value.values())
    return False


def _factory_name(value: Any) -> str | None:
    """The name of a defaultdict's builtin default factory (None: not such a defaultdict)."""
    if type(value) is not defaultdict:
        return None
    name = getattr(value.default_factory, "__name__", None)
    return name if FACTORIES.get(name) is value.default_factory else None


def _rng_state(value: Any) -> Any:
    if isinstance(value, random.Random):
        return value.getstate()
    if isinstance(value, np.random.RandomState):
        return value.get_state(legacy=False)
    return value.bit_generator.state


def _is_key(key: Any) -> bool:
    return key is None or isinstance(key, (bool, int, float, str))


def _equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, ArrayRecord):
        return list(a) == list(b) and all(a[k] == b[k] for k in a)  # Array: dtype, shape, stype, data
    if isinstance(a, RNG_TYPES):
        return _equal(_rng_state(a), _rng_state(b))
    if isinstance(a, (set, frozenset)):
        return a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


class _Encoder:
    """Encodes data values as tagged JSON; arrays and bytes go to ``blobs``."""

    def __init__(self) -> None:
        self.blobs: dict[str, np.ndarray] = {}

    def _blob(self, value: np.ndarray) -> str:
        name = f"b{len(self.blobs)}"
        self.blobs[name] = np.ascontiguousarray(value)
        return name

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, np.generic) and value.dtype.kind in "biuf":
            return {"$scalar": value.dtype.str, "blob": self._blob(np.asarray(value).reshape(1))}
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            return {"$ndarray": self._blob(value), "shape": list(value.shape)}
        if isinstance(value, ArrayRecord):
            items = [[k, {**self._array(a), "stype": a.stype}] for k, a in value.items()]
            return {"$arrayrecord": items}
        if type(value) in RNG_TYPES:
            return {"$rng": type(value).__name__, "state": self.encode(_rng_state(value), where)}
        if isinstance(value, (list, tuple)):
            return {"$tuple" if isinstance(value, tuple) else "$list": [self.encode(v, where) for v in value]}
        if type(value) in (set, frozenset):
            return {f"${type(value).__name__}": [self.encode(v, where) for v in value]}
        if isinstance(value, dict) and _is_data(value):
            items = [[self.encode(k, where), self.encode(v, where)] for k, v in value.items()]
            factory = _factory_name(value)
            return {"$defaultdict": items, "factory": factory} if factory else {DICT_TYPES[type(value)]: items}
        raise StateError(f"{where}: a {type(value).__name__} cannot be saved in a checkpoint (data types only)")

    def _array(self, array: Array) -> dict[str, Any]:
        return {"dtype": array.dtype, "shape": list(array.shape), "blob": self._blob(np.frombuffer(array.data, np.uint8))}


def _decode(value: Any, blobs: dict[str, np.ndarray]) -> Any:
    if not isinstance(value, dict):
        return value
    try:
        if "$float" in value:
            return float(value["$float"])
        if "$scalar" in value:
            return np.dtype(value["$scalar"]).type(blobs[value["blob"]][0])
        if "$ndarray" in value:
            return blobs[value["$ndarray"]].reshape(value["shape"]).copy()
        if "$arrayrecord" in value:
            return ArrayRecord({k: _decode_array(a, blobs) for k, a in value["$arrayrecord"]})
        if "$list" in value:
            return [_decode(v, blobs) for v in value["$list"]]
        if "$tuple" in value:
            return tuple(_decode(v, blobs) for v in value["$tuple"])
        for tag, kind in (("$set", set), ("$frozenset", frozenset)):
            if tag in value:
                return kind(_decode(v, blobs) for v in value[tag])
        for kind, tag in DICT_TYPES.items():
            if tag in value:
                return kind({_decode(k, blobs): _decode(v, blobs) for k, v in value[tag]})
        if "$defaultdict" in value:
            items = {_decode(k, blobs): _decode(v, blobs) for k, v in value["$defaultdict"]}
            return defaultdict(FACTORIES[value["factory"]], items)
        if "$rng" in value:
            return _decode_rng(value["$rng"], _decode(value["state"], blobs))
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"the checkpoint's strategy state is malformed ({type(exc).__name__}: {exc})") from None
    raise StateError(f"the checkpoint's strategy state holds an unknown entry {sorted(value)}")


def _decode_array(entry: dict[str, Any], blobs: dict[str, np.ndarray]) -> Array:
    data = blobs[entry["blob"]].tobytes()
    return Array(dtype=entry["dtype"], shape=tuple(entry["shape"]), stype=entry["stype"], data=data)


def _decode_rng(kind: str, state: Any) -> Any:
    if kind == "Random":
        rng = random.Random()
        rng.setstate(state)
        return rng
    if kind == "RandomState":
        legacy = np.random.RandomState()
        legacy.set_state(state)
        return legacy
    if kind == "Generator" and state.get("bit_generator") in BIT_GENERATORS:
        bit_generator = getattr(np.random, state["bit_generator"])()
        bit_generator.state = state
        return np.random.Generator(bit_generator)
    raise ValueError(f"unknown random generator {kind} ({state.get('bit_generator') if isinstance(state, dict) else ''})")
