"""Short-lived in-process memory of who an API key is, and which model a request names, for the predict path.

Predict is the route a client calls many times a second with the same key and model; looking both up in the
database each time cost two queries and a thread hop per request. A key that authenticated is remembered
by its SHA-256 (never the key itself) for ``TTL_SECONDS``, a model row's owner, run folder and precision
likewise. The memory is per process and expires by time, so a key revoked (or a user or model deleted) by
any process, the CLI included, stops working within a second everywhere, with nothing to invalidate
across processes.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

TTL_SECONDS = 1.0
MAX_ENTRIES = 10_000

V = TypeVar("V")


@dataclass(frozen=True)
class Principal:
    """Who a request is from, as the predict path needs it (and as ``get_owned`` reads a user)."""

    id: str
    is_admin: bool


@dataclass(frozen=True)
class ModelRef:
    """What predict needs of a model row."""

    id: str
    owner_id: str
    run_key: str
    serving_precision: str
    threshold: float | None = None  # the owner's; None: the model's own (chosen on validation)


class TtlCache(Generic[V]):
    """A bounded mapping whose entries expire ``ttl`` seconds after they were put (monotonic clock)."""

    def __init__(self, ttl: float = TTL_SECONDS, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = time.monotonic
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self.clock():
            self._items.pop(key, None)
            return None
        return item[1]

    def put(self, key: str, value: V) -> None:
        self._items[key] = (self.clock() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def discard(self, key: str) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class PredictLookups:
    """The two memories of one API process (``app.state.predict_lookups``)."""

    def __init__(self, ttl: float = TTL_SECONDS) -> None:
        self.keys: TtlCache[Principal] = TtlCache(ttl)
        self.models: TtlCache[ModelRef] = TtlCache(ttl)
