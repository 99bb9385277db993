"""Short-lived in-process memory of who an API key is, and which model a request names, for the predict path.

Predict is the route a client calls many times a second with the same key and model; looking both up in the
database each time cost two queries and a thread hop per request. A key that authenticated is remembered
by its SHA-256 (never the key itself) for ``TTL_SECONDS``, a model row's owner, run folder and precision
likewise. The memory is per process and expires by time, so a key revoked (or a user or model deleted) by
any process, the CLI included, stops working within a second everywhere, with nothing to invalidate
across processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

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
    """A bounded mapping whose entries expire ``ttl`` seconds after they were put (monotonic clock).

    ``get_or_load`` reads an expired or missing entry once for everyone who asks meanwhile: when an entry of
    a busy key expires, the requests in flight for it (32 clients: 32 of them) would otherwise all miss in the
    same moment and each run its own database lookup on the threadpool, a burst every second that queued
    behind itself and lengthened the slowest requests."""

    def __init__(self, ttl: float = TTL_SECONDS, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = time.monotonic
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._loading: dict[str, asyncio.Future[V]] = {}  # used on the event loop only: no lock

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

    async def get_or_load(self, key: str, load: Callable[[], Awaitable[V]]) -> V:
        """The entry, or ``load()``'s value (remembered), with one ``load`` at a time per key. A load that
        raises reaches everyone waiting on it and is not remembered."""
        value = self.get(key)
        if value is not None:
            return value
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(key, load))
            pending.add_done_callback(_observed)  # its error is the callers' (if all left, nobody's)
            self._loading[key] = pending
        # Shielded: a caller that goes away (its client disconnected) does not cancel the others' lookup.
        return await asyncio.shield(pending)

    async def _load(self, key: str, load: Callable[[], Awaitable[V]]) -> V:
        me = asyncio.current_task()
        try:
            value = await load()
            if self._loading.get(key) is me:  # not discarded meanwhile: what was read is still current
                self.put(key, value)
            return value
        finally:
            if self._loading.get(key) is me:
                del self._loading[key]

    def discard(self, key: str) -> None:
        """Forget ``key``, and any lookup of it in flight (its value is not remembered; later callers read
        afresh)."""
        self._items.pop(key, None)
        self._loading.pop(key, None)

    def clear(self) -> None:
        self._items.clear()
        self._loading.clear()


def _observed(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class PredictLookups:
    """The two memories of one API process (``app.state.predict_lookups``)."""

    def __init__(self, ttl: float = TTL_SECONDS) -> None:
        self.keys: TtlCache[Principal] = TtlCache(ttl)
        self.models: TtlCache[ModelRef] = TtlCache(ttl)
